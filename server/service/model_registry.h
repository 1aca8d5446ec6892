// Registered models: geometry, codec choice, loaded codebooks and the codec instances built on
// them. Models and codebooks live in memory for the life of the daemon (a restart starts empty;
// vqkvd can preload them from its YAML config).
// Thread-safety: thread-safe; Model objects are shared and internally locked.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/dtype.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/kv.h"

namespace vqkv::service {

// A model's KV geometry and codec (validated).
struct ModelConfig {
  std::string model_id;
  int32_t layers = 0, kv_heads = 0, head_dim = 0;
  DType dtype = DType::kF16;
  int32_t block_tokens = 0;
  kernels::CodecSpec codec;  // codebook left empty
  std::string codec_string;  // canonical, e.g. "scalar-2:group=32,sinks=4"

  bool rvq() const { return codec.name == "rvq"; }
  kernels::KvShape Shape(int32_t tokens) const { return {layers, tokens, kv_heads, head_dim}; }
  // Bytes of one layer (K and V) of a block of `tokens` tokens in `dt`.
  int64_t LayerBytes(int32_t tokens, DType dt) const {
    return int64_t{2} * tokens * kv_heads * head_dim * static_cast<int64_t>(DTypeSize(dt));
  }
  bool SameAs(const ModelConfig& o) const;
  std::string DebugString() const;
};

// Creates a codec from a spec (kernels::CreateCodec, or ServiceOptions::codec_factory).
using CodecFactory =
    std::function<absl::StatusOr<std::unique_ptr<kernels::Codec>>(const kernels::CodecSpec&)>;
// Creates a codec that runs on a GPU (ServiceOptions::device_codec_factory).
using DeviceCodecFactory = std::function<absl::StatusOr<std::unique_ptr<kernels::Codec>>(
    const kernels::CodecSpec&, int device)>;

// A codec ready to use, and the codebook id it is keyed under ("" for non-rvq). With several
// GPUs, one instance per device (each with its own device copy of the codebook).
struct ResolvedCodec {
  std::shared_ptr<const kernels::Codec> codec;  // the default: on the first device, or the CPU
  std::string codebook_id;
  std::vector<std::pair<int, std::shared_ptr<const kernels::Codec>>> on_device;

  // The instance that runs on `device`; `codec` for -1 or a device without one.
  const kernels::Codec& For(int device) const {
    for (const auto& [d, c] : on_device) {
      if (d == device) return *c;
    }
    return *codec;
  }
};

// Builds the codec instances of one spec (the default one and one per device).
using CodecBuilder = std::function<absl::StatusOr<ResolvedCodec>(const kernels::CodecSpec&)>;

class Model {
 public:
  Model(ModelConfig config, ResolvedCodec plain_codec, CodecBuilder builder)
      : config_(std::move(config)),
        plain_codec_(std::move(plain_codec)),
        builder_(std::move(builder)) {}
  const ModelConfig& config() const { return config_; }

  // The codec for `codebook_id` ("" = the active codebook for rvq; must be "" otherwise).
  // FailedPrecondition when an rvq model has no (such) codebook; InvalidArgument when a
  // codebook id is given for a non-rvq model.
  absl::StatusOr<ResolvedCodec> Resolve(const std::string& codebook_id) const;

  // Adds a codebook (geometry must match: InvalidArgument; non-rvq model: FailedPrecondition).
  // Returns whether it is active afterwards: with `activate`, or when it is the first one.
  absl::StatusOr<bool> AddCodebook(std::shared_ptr<const kernels::Codebook> codebook,
                                   bool activate);

  std::string active_codebook_id() const;
  std::vector<std::string> codebook_ids() const;

 private:
  const ModelConfig config_;
  const ResolvedCodec plain_codec_;  // non-rvq codecs
  const CodecBuilder builder_;       // builds rvq codecs per codebook
  mutable absl::Mutex mu_;
  std::map<std::string, ResolvedCodec> codebooks_ ABSL_GUARDED_BY(mu_);
  std::string active_ ABSL_GUARDED_BY(mu_);
};

// Validates a model description: positive geometry within limits, known dtype and codec with
// valid parameters. InvalidArgument naming the field otherwise; ResourceExhausted when one
// block of `block_tokens` tokens would exceed `max_block_bytes`.
absl::StatusOr<ModelConfig> MakeModelConfig(const std::string& model_id, int32_t layers,
                                            int32_t kv_heads, int32_t head_dim, DType dtype,
                                            int32_t block_tokens, const std::string& codec,
                                            int64_t max_block_bytes);

class ModelRegistry {
 public:
  // `factory` builds every codec (empty: kernels::CreateCodec). With `devices` and a
  // `device_factory`, each codec is also built once per device (ResolvedCodec::on_device) and
  // the default is the first device's.
  explicit ModelRegistry(CodecFactory factory = {}, std::vector<int> devices = {},
                         DeviceCodecFactory device_factory = {});
  // Registers `config`. Returns true if created, false if an identical model exists;
  // AlreadyExists if a different one does.
  absl::StatusOr<bool> Register(const ModelConfig& config);
  // The model, or nullptr.
  std::shared_ptr<Model> Find(const std::string& model_id) const;
  std::vector<std::shared_ptr<Model>> All() const;

 private:
  CodecBuilder builder_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Model>> models_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vqkv::service
