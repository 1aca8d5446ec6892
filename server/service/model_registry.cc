#include "server/service/model_registry.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace vqkv::service {
namespace {

absl::Status CheckRange(const char* field, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.", field, " must be in [", lo, ", ", hi, "], got ", v));
  }
  return absl::OkStatus();
}

}  // namespace

bool ModelConfig::SameAs(const ModelConfig& o) const {
  return model_id == o.model_id && layers == o.layers && kv_heads == o.kv_heads &&
         head_dim == o.head_dim && dtype == o.dtype && block_tokens == o.block_tokens &&
         codec_string == o.codec_string;
}

std::string ModelConfig::DebugString() const {
  return absl::StrCat(model_id, " (layers=", layers, ", kv_heads=", kv_heads,
                      ", head_dim=", head_dim, ", dtype=", std::string(DTypeName(dtype)),
                      ", block_tokens=", block_tokens, ", codec=", codec_string, ")");
}

absl::StatusOr<ModelConfig> MakeModelConfig(const std::string& model_id, int32_t layers,
                                            int32_t kv_heads, int32_t head_dim, DType dtype,
                                            int32_t block_tokens, const std::string& codec,
                                            int64_t max_block_bytes) {
  if (model_id.empty() || model_id.size() > 256) {
    return absl::InvalidArgumentError("model.model_id must be 1..256 bytes");
  }
  VQKV_RETURN_IF_ERROR(CheckRange("layers", layers, 1, 1024));
  VQKV_RETURN_IF_ERROR(CheckRange("kv_heads", kv_heads, 1, 1024));
  VQKV_RETURN_IF_ERROR(CheckRange("head_dim", head_dim, 1, 4096));
  VQKV_RETURN_IF_ERROR(CheckRange("block_tokens", block_tokens, 1, 1 << 20));
  ModelConfig c;
  c.model_id = model_id;
  c.layers = layers;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.dtype = dtype;
  c.block_tokens = block_tokens;
  VQKV_ASSIGN_OR_RETURN(c.codec, kernels::ParseCodecSpec(codec.empty() ? "raw" : codec));
  c.codec_string = kernels::CodecSpecString(c.codec);
  const int64_t block_bytes = c.LayerBytes(block_tokens, dtype) * layers;
  if (block_bytes > max_block_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("model: one block is ", block_bytes,
                                                     " bytes, over the daemon's max_block_bytes (",
                                                     max_block_bytes, ")"));
  }
  return c;
}

absl::StatusOr<ResolvedCodec> Model::Resolve(const std::string& codebook_id) const {
  if (!config_.rvq()) {
    if (!codebook_id.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("model ", config_.model_id, " uses codec ",
                                                     config_.codec_string,
                                                     ", which takes no codebook"));
    }
    return plain_codec_;
  }
  absl::MutexLock l(&mu_);
  const std::string& id = codebook_id.empty() ? active_ : codebook_id;
  if (id.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model ", config_.model_id, " uses rvq and has no codebook: upload or fit one first"));
  }
  auto it = codebooks_.find(id);
  if (it == codebooks_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("model ", config_.model_id, " has no codebook ", id));
  }
  return it->second;
}

absl::StatusOr<bool> Model::AddCodebook(std::shared_ptr<const kernels::Codebook> codebook,
                                        bool activate) {
  if (!config_.rvq()) {
    return absl::FailedPreconditionError(absl::StrCat("model ", config_.model_id, " uses codec ",
                                                      config_.codec_string, ", not rvq"));
  }
  const kernels::RvqConfig& rc = codebook->config();
  if (rc.layers != config_.layers || rc.kv_heads != config_.kv_heads ||
      rc.head_dim != config_.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "codebook ", codebook->id(), " is for layers=", rc.layers, ", kv_heads=", rc.kv_heads,
        ", head_dim=", rc.head_dim, "; model ", config_.DebugString(), " differs"));
  }
  kernels::CodecSpec spec = config_.codec;
  spec.codebook = codebook;
  VQKV_ASSIGN_OR_RETURN(ResolvedCodec codec, builder_(spec));
  absl::MutexLock l(&mu_);
  const std::string id = codebook->id();
  if (!codebooks_.contains(id)) {
    codec.codebook_id = id;
    codebooks_[id] = std::move(codec);
  }
  if (activate || active_.empty()) active_ = id;
  return active_ == id;
}

std::string Model::active_codebook_id() const {
  absl::MutexLock l(&mu_);
  return active_;
}

std::vector<std::string> Model::codebook_ids() const {
  absl::MutexLock l(&mu_);
  std::vector<std::string> ids;
  for (const auto& [id, c] : codebooks_) ids.push_back(id);
  return ids;
}

ModelRegistry::ModelRegistry(CodecFactory factory, std::vector<int> devices,
                             DeviceCodecFactory device_factory) {
  if (!factory) factory = &kernels::CreateCodec;
  if (devices.empty() || !device_factory) {
    builder_ = [factory](const kernels::CodecSpec& spec) -> absl::StatusOr<ResolvedCodec> {
      VQKV_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Codec> c, factory(spec));
      ResolvedCodec r;
      r.codec = std::move(c);
      return r;
    };
    return;
  }
  builder_ = [devices,
              device_factory](const kernels::CodecSpec& spec) -> absl::StatusOr<ResolvedCodec> {
    ResolvedCodec r;
    for (int d : devices) {
      VQKV_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Codec> c, device_factory(spec, d));
      r.on_device.emplace_back(d, std::move(c));
    }
    r.codec = r.on_device.front().second;
    return r;
  };
}

absl::StatusOr<bool> ModelRegistry::Register(const ModelConfig& config) {
  ResolvedCodec plain;
  if (!config.rvq()) {
    // Building the codec now validates its parameters (e.g. scalar bits) at registration.
    VQKV_ASSIGN_OR_RETURN(plain, builder_(config.codec));
  }
  absl::MutexLock l(&mu_);
  auto it = models_.find(config.model_id);
  if (it != models_.end()) {
    if (it->second->config().SameAs(config)) return false;
    return absl::AlreadyExistsError(absl::StrCat("model ", config.model_id, " is registered as ",
                                                 it->second->config().DebugString(), "; refusing ",
                                                 config.DebugString()));
  }
  models_[config.model_id] = std::make_shared<Model>(config, std::move(plain), builder_);
  return true;
}

std::shared_ptr<Model> ModelRegistry::Find(const std::string& model_id) const {
  absl::MutexLock l(&mu_);
  auto it = models_.find(model_id);
  return it == models_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<Model>> ModelRegistry::All() const {
  absl::MutexLock l(&mu_);
  std::vector<std::shared_ptr<Model>> out;
  for (const auto& [id, m] : models_) out.push_back(m);
  return out;
}

}  // namespace vqkv::service
