// UploadCodebook and FitCodebook sessions.
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/rvq_fit.h"
#include "server/service/service_core.h"

namespace vqkv::service {
namespace {

// Registers a codebook with its model and fills the common response fields.
absl::StatusOr<bool> AddToModel(Model& model, kernels::Codebook cb, bool activate) {
  auto shared = std::make_shared<const kernels::Codebook>(std::move(cb));
  return model.AddCodebook(std::move(shared), activate);
}

class UploadSessionImpl final : public UploadSession {
 public:
  UploadSessionImpl(ServiceCore* core, const CallContext& ctx)
      : core_(core), ctx_(ctx), hold_(&core->budget) {}

  absl::Status Add(v1::UploadCodebookRequest& msg) override {
    if (model_ == nullptr) {
      VQKV_ASSIGN_OR_RETURN(model_, FindModel(*core_, msg.model_id(), true));
      if (!model_->config().rvq()) {
        return absl::FailedPreconditionError(
            absl::StrCat("UploadCodebook: model ", msg.model_id(), " uses codec ",
                         model_->config().codec_string, "; codebooks are for rvq models"));
      }
      activate_ = msg.activate();
    }
    const int64_t n = static_cast<int64_t>(msg.data().size());
    if (static_cast<int64_t>(bytes_.size()) + n > core_->options.max_codebook_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "UploadCodebook: larger than ", core_->options.max_codebook_bytes, " bytes"));
    }
    if (!hold_.TryAdd(n)) return Busy(*core_, n);
    bytes_.append(msg.data());
    return CheckDeadline(ctx_);
  }

  absl::Status Finish(v1::UploadCodebookResponse* response) override {
    if (model_ == nullptr) return absl::InvalidArgumentError("UploadCodebook: empty stream");
    absl::StatusOr<kernels::Codebook> cb =
        kernels::Codebook::FromBytes(std::move(bytes_), "uploaded codebook");
    if (!cb.ok()) {
      // A damaged or foreign file is bad input, whatever the loader called it.
      return absl::InvalidArgumentError(std::string(cb.status().message()));
    }
    response->set_codebook_id(cb->id());
    response->set_config(cb->config().ToString());
    VQKV_ASSIGN_OR_RETURN(bool active, AddToModel(*model_, *std::move(cb), activate_));
    response->set_active(active);
    return absl::OkStatus();
  }

 private:
  ServiceCore* const core_;
  const CallContext ctx_;
  BudgetHold hold_;
  std::shared_ptr<Model> model_;
  bool activate_ = false;
  std::string bytes_;
};

class FitSessionImpl final : public FitSession {
 public:
  FitSessionImpl(ServiceCore* core, const CallContext& ctx)
      : core_(core), ctx_(ctx), hold_(&core->budget) {}

  absl::Status Add(v1::FitCodebookRequest& msg) override {
    if (model_ == nullptr) {
      if (!msg.has_params()) {
        return absl::InvalidArgumentError("FitCodebook: the first message must carry params");
      }
      params_ = msg.params();
      VQKV_ASSIGN_OR_RETURN(model_, FindModel(*core_, params_.model_id(), true));
      const ModelConfig& mc = model_->config();
      if (!mc.rvq()) {
        return absl::FailedPreconditionError(absl::StrCat("FitCodebook: model ", mc.model_id,
                                                          " uses codec ", mc.codec_string,
                                                          "; codebooks are for rvq models"));
      }
      VQKV_ASSIGN_OR_RETURN(kernels::StageConfig k, kernels::ParseStageConfig(params_.k_stages()));
      VQKV_ASSIGN_OR_RETURN(kernels::StageConfig v, kernels::ParseStageConfig(params_.v_stages()));
      config_ = kernels::RvqConfig::Uniform(mc.layers, mc.kv_heads, mc.head_dim, k, v,
                                            params_.per_head());
      VQKV_RETURN_IF_ERROR(config_.Validate());
      samples_.layers = mc.layers;
      samples_.kv_heads = mc.kv_heads;
      samples_.head_dim = mc.head_dim;
      samples_.k.resize(mc.layers);
      samples_.v.resize(mc.layers);
      return absl::OkStatus();
    }
    if (!msg.has_samples()) {
      return absl::InvalidArgumentError("FitCodebook: params may only be sent once");
    }
    VQKV_RETURN_IF_ERROR(CheckDeadline(ctx_));
    return AddSampleChunk(msg.samples());
  }

  absl::Status Finish(const std::function<void(const v1::FitCodebookResponse&)>& progress,
                      v1::FitCodebookResponse* final) override {
    if (model_ == nullptr) return absl::InvalidArgumentError("FitCodebook: empty stream");
    if (cur_received_ != cur_total_) {
      return absl::InvalidArgumentError(
          absl::StrCat("FitCodebook: sample ", cur_sample_, " is incomplete"));
    }
    if (params_.use_stored_blocks() > 0) VQKV_RETURN_IF_ERROR(AddStoredBlocks());
    if (samples_.tokens(0) == 0) {
      return absl::InvalidArgumentError("FitCodebook: no samples (send some or use stored ones)");
    }
    kernels::FitOptions opts;
    if (params_.iterations() > 0) opts.iterations = params_.iterations();
    if (params_.seed() != 0) opts.seed = params_.seed();
    if (params_.max_vectors() > 0) opts.max_vectors = params_.max_vectors();
    if (params_.key_rope_theta() > 0) {
      const int dim = config_.head_dim;
      if (!(params_.key_rope_theta() > 1) || dim % 2 != 0) {
        return absl::InvalidArgumentError(
            "FitCodebook: key_rope_theta must be > 1 (the model's rope_theta), head_dim even");
      }
      kernels::CodeSpaceOptions co;
      for (int i = 0; i < dim / 2; ++i) {
        co.key_rope_inv_freq.push_back(float(std::pow(params_.key_rope_theta(), -2.0 * i / dim)));
      }
      VQKV_ASSIGN_OR_RETURN(opts.code_space, kernels::ComputeCodeSpace(samples_, co));
    } else if (params_.key_rope_theta() < 0) {
      return absl::InvalidArgumentError("FitCodebook: key_rope_theta must be >= 0");
    }
    opts.progress = [&](int64_t done, int64_t total, const std::string& detail) {
      v1::FitCodebookResponse p;
      p.set_done(done);
      p.set_total(total);
      p.set_detail(detail);
      progress(p);
    };
    absl::StatusOr<kernels::Codebook> cb =
        core_->options.fit_codebook ? core_->options.fit_codebook(config_, samples_, opts)
                                    : kernels::FitCodebook(config_, samples_, opts);
    if (!cb.ok()) return Annotate(cb.status(), "FitCodebook");
    final->set_codebook_id(cb->id());
    final->set_config(cb->config().ToString());
    final->set_sample_vectors(samples_.tokens(0) * samples_.kv_heads);
    final->set_detail("done");
    VQKV_ASSIGN_OR_RETURN(bool active, AddToModel(*model_, *std::move(cb), params_.activate()));
    (void)active;
    return absl::OkStatus();
  }

 private:
  absl::Status AddSampleChunk(const v1::SampleChunk& c) {
    const ModelConfig& mc = model_->config();
    if (cur_received_ == cur_total_) {  // a new sample tensor starts
      if (c.offset() != 0 || c.tokens() < 1) {
        return absl::InvalidArgumentError(absl::StrCat("FitCodebook: sample ", c.sample(),
                                                       " must start at offset 0 with tokens >= 1"));
      }
      VQKV_ASSIGN_OR_RETURN(cur_dtype_, FromProto(c.dtype(), mc.dtype));
      cur_sample_ = c.sample();
      cur_tokens_ = c.tokens();
      if (c.first_token() < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("FitCodebook: sample ", c.sample(), " has a negative first_token"));
      }
      cur_first_token_ = c.first_token();
      cur_total_ = mc.LayerBytes(cur_tokens_, cur_dtype_) * mc.layers;
      cur_received_ = 0;
      if (cur_total_ > core_->options.max_block_bytes * 4) {
        return absl::ResourceExhaustedError("FitCodebook: sample tensor too large; split it");
      }
      buf_.resize(cur_total_);
    }
    if (c.sample() != cur_sample_ || c.offset() != cur_received_ ||
        cur_received_ + static_cast<int64_t>(c.data().size()) > cur_total_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "FitCodebook: sample chunks must arrive in order and fit the sample (sample ", c.sample(),
          ", offset ", c.offset(), ", ", c.data().size(), " bytes, expected offset ", cur_received_,
          " of ", cur_total_, ")"));
    }
    std::memcpy(buf_.data() + cur_received_, c.data().data(), c.data().size());
    cur_received_ += static_cast<int64_t>(c.data().size());
    if (cur_received_ == cur_total_) {
      const int64_t floats = mc.Shape(cur_tokens_).elements();
      if (!hold_.TryAdd(floats * 4)) return Busy(*core_, floats * 4);
      if (hold_.held() > core_->options.max_codebook_bytes) {
        return absl::ResourceExhaustedError("FitCodebook: sample set larger than allowed");
      }
      std::vector<float> x(floats);
      ToFloat(cur_dtype_, buf_.data(), floats, x.data());
      AppendTensor(x, cur_tokens_, cur_first_token_);
    }
    return absl::OkStatus();
  }

  void AppendTensor(const std::vector<float>& x, int32_t tokens, int64_t first_token) {
    const kernels::KvShape s = model_->config().Shape(tokens);
    const size_t plane = size_t(tokens) * s.kv_heads * s.head_dim;
    for (int l = 0; l < s.layers; ++l) {
      const float* k = x.data() + s.Offset(l, 0, 0, 0);
      const float* v = x.data() + s.Offset(l, 1, 0, 0);
      samples_.k[l].insert(samples_.k[l].end(), k, k + plane);
      samples_.v[l].insert(samples_.v[l].end(), v, v + plane);
    }
    samples_.seq_lens.push_back(tokens);
    samples_.seq_starts.push_back(first_token);
  }

  absl::Status AddStoredBlocks() {
    const ModelConfig& mc = model_->config();
    VQKV_ASSIGN_OR_RETURN(std::string tenant, TenantOf(params_.tenant()));
    std::vector<store::BlockKey> keys =
        core_->store->ListKeys(tenant, mc.model_id, params_.use_stored_blocks());
    auto leases = core_->store->Acquire(keys);
    for (size_t i = 0; i < keys.size(); ++i) {
      if (!leases[i].has_value()) continue;  // deleted meanwhile
      absl::StatusOr<ResolvedCodec> codec = model_->Resolve(keys[i].codebook_id);
      if (!codec.ok()) continue;
      VQKV_RETURN_IF_ERROR(CheckDeadline(ctx_));
      const int64_t floats = mc.Shape(leases[i]->meta().tokens).elements();
      if (!hold_.TryAdd(floats * 4)) return Busy(*core_, floats * 4);
      VQKV_ASSIGN_OR_RETURN(std::vector<float> x, codec->codec->DecodeToFloat(leases[i]->bytes()));
      AppendTensor(x, leases[i]->meta().tokens, leases[i]->meta().first_token);
    }
    return absl::OkStatus();
  }

  ServiceCore* const core_;
  const CallContext ctx_;
  BudgetHold hold_;
  std::shared_ptr<Model> model_;
  v1::FitParams params_;
  kernels::RvqConfig config_;
  kernels::KvSamples samples_;
  std::string buf_;
  int32_t cur_sample_ = 0, cur_tokens_ = 0;
  DType cur_dtype_ = DType::kF16;
  int64_t cur_total_ = 0, cur_received_ = 0, cur_first_token_ = 0;
};

}  // namespace

std::unique_ptr<UploadSession> NewUploadSession(ServiceCore* core, const CallContext& ctx) {
  return std::make_unique<UploadSessionImpl>(core, ctx);
}

std::unique_ptr<FitSession> NewFitSession(ServiceCore* core, const CallContext& ctx) {
  return std::make_unique<FitSessionImpl>(core, ctx);
}

}  // namespace vqkv::service
