#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/llama_ops.h"

namespace vqkv::model {
namespace {

absl::Status CheckLinear(const LinearWeights& l, const std::string& name, int out, int in,
                         bool bias) {
  if (l.in != in || l.out != out || l.w.size() != static_cast<size_t>(out) * in ||
      l.b.size() != (bias ? static_cast<size_t>(out) : 0)) {
    return absl::InvalidArgumentError(absl::StrCat("weights ", name, ": expected [", out, ", ", in,
                                                   "]", bias ? " with bias" : ""));
  }
  return absl::OkStatus();
}

absl::Status CheckVector(const std::vector<float>& v, const std::string& name, size_t size) {
  if (v.size() != size) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights ", name, ": ", v.size(), " values, expected ", size));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaModel> LlamaModel::Load(const std::string& dir) {
  if (!std::filesystem::is_directory(dir)) {
    return absl::NotFoundError(absl::StrCat("model directory not found: ", dir));
  }
  VQKV_ASSIGN_OR_RETURN(LlamaConfig config,
                        LoadLlamaConfig((std::filesystem::path(dir) / "config.json").string()));
  VQKV_ASSIGN_OR_RETURN(LlamaWeights weights, LoadLlamaWeights(dir, config));
  return Create(std::move(config), std::move(weights));
}

absl::StatusOr<LlamaModel> LlamaModel::Create(LlamaConfig c, LlamaWeights w) {
  const int h = c.hidden_size, qd = c.num_attention_heads * c.head_dim,
            kvd = c.num_key_value_heads * c.head_dim, ff = c.intermediate_size;
  if (h <= 0 || c.head_dim <= 0 || c.head_dim % 2 != 0 || c.num_key_value_heads <= 0 ||
      c.num_attention_heads % c.num_key_value_heads != 0 || c.vocab_size <= 0 ||
      c.max_position_embeddings <= 0) {
    return absl::InvalidArgumentError("inconsistent LlamaConfig");
  }
  const size_t vh = static_cast<size_t>(c.vocab_size) * h;
  VQKV_RETURN_IF_ERROR(CheckVector(w.embed_tokens, "embed_tokens", vh));
  VQKV_RETURN_IF_ERROR(CheckVector(w.norm, "norm", h));
  if (!w.lm_head.w.empty() || !c.tie_word_embeddings) {
    VQKV_RETURN_IF_ERROR(CheckLinear(w.lm_head, "lm_head", c.vocab_size, h, false));
  }
  if (w.layers.size() != static_cast<size_t>(c.num_hidden_layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights: ", w.layers.size(), " layers, expected ", c.num_hidden_layers));
  }
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const LlamaLayerWeights& l = w.layers[i];
    const std::string p = absl::StrCat("layer ", i, " ");
    const bool ab = c.attention_bias, mb = c.mlp_bias;
    VQKV_RETURN_IF_ERROR(CheckVector(l.input_layernorm, p + "input_layernorm", h));
    VQKV_RETURN_IF_ERROR(
        CheckVector(l.post_attention_layernorm, p + "post_attention_layernorm", h));
    VQKV_RETURN_IF_ERROR(CheckLinear(l.q_proj, p + "q_proj", qd, h, ab));
    VQKV_RETURN_IF_ERROR(CheckLinear(l.k_proj, p + "k_proj", kvd, h, ab));
    VQKV_RETURN_IF_ERROR(CheckLinear(l.v_proj, p + "v_proj", kvd, h, ab));
    VQKV_RETURN_IF_ERROR(CheckLinear(l.o_proj, p + "o_proj", h, qd, ab));
    VQKV_RETURN_IF_ERROR(CheckLinear(l.gate_proj, p + "gate_proj", ff, h, mb));
    VQKV_RETURN_IF_ERROR(CheckLinear(l.up_proj, p + "up_proj", ff, h, mb));
    VQKV_RETURN_IF_ERROR(CheckLinear(l.down_proj, p + "down_proj", h, ff, mb));
  }
  return LlamaModel(std::move(c), std::move(w));
}

absl::Status LlamaModel::CheckTokens(const std::vector<int>& tokens) const {
  if (tokens.empty()) return absl::InvalidArgumentError("empty token sequence");
  if (tokens.size() > static_cast<size_t>(config_.max_position_embeddings)) {
    return absl::InvalidArgumentError(absl::StrCat(
        tokens.size(), " tokens exceed max_position_embeddings ", config_.max_position_embeddings));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at position ", i,
                                                     " outside [0, ", config_.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> LlamaModel::Forward(const std::vector<int>& tokens,
                                                       const ForwardOptions& opts) const {
  VQKV_RETURN_IF_ERROR(CheckTokens(tokens));
  if (opts.sink_tokens < 0 || opts.recent_tokens < 0) {
    return absl::InvalidArgumentError("sink_tokens and recent_tokens must be >= 0");
  }
  DecodeCache cache;
  std::vector<float> logits;
  VQKV_RETURN_IF_ERROR(Run(tokens.data(), static_cast<int>(tokens.size()), 0, &cache, opts,
                           /*last_only=*/false, &logits));
  return logits;
}

absl::StatusOr<std::vector<int>> LlamaModel::Generate(const std::vector<int>& prompt,
                                                      int max_new_tokens) const {
  VQKV_RETURN_IF_ERROR(CheckTokens(prompt));
  if (max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  std::vector<int> out;
  const int limit = config_.max_position_embeddings;
  if (max_new_tokens == 0 || static_cast<int>(prompt.size()) >= limit) return out;
  DecodeCache cache;
  std::vector<float> logits;
  const ForwardOptions plain;
  VQKV_RETURN_IF_ERROR(Run(prompt.data(), static_cast<int>(prompt.size()), 0, &cache, plain,
                           /*last_only=*/true, &logits));
  int pos = static_cast<int>(prompt.size());
  while (true) {
    const int next =
        static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    if (config_.IsEos(next) || static_cast<int>(out.size()) >= max_new_tokens || pos + 1 >= limit) {
      break;
    }
    VQKV_RETURN_IF_ERROR(Run(&next, 1, pos, &cache, plain, /*last_only=*/true, &logits));
    ++pos;
  }
  return out;
}

absl::Status LlamaModel::Run(const int* tokens, int n, int pos0, DecodeCache* cache,
                             const ForwardOptions& opts, bool last_only,
                             std::vector<float>* logits) const {
  const LlamaConfig& c = config_;
  const int hidden = c.hidden_size, heads = c.num_attention_heads, kv_heads = c.num_key_value_heads,
            hd = c.head_dim, ff = c.intermediate_size, layers = c.num_hidden_layers;
  const int qd = heads * hd, kvd = kv_heads * hd;
  const int64_t total = static_cast<int64_t>(pos0) + n;
  const bool hooked = pos0 == 0 && static_cast<bool>(opts.transform);
  KvCache* capture = pos0 == 0 ? opts.capture : nullptr;

  std::vector<float> x(static_cast<size_t>(n) * hidden), h(x.size()), tmp(x.size());
  std::vector<float> q(static_cast<size_t>(n) * qd), attn(q.size());
  std::vector<float> gate(static_cast<size_t>(n) * ff), up(gate.size());
  for (int t = 0; t < n; ++t) {
    std::copy_n(weights_.embed_tokens.begin() + static_cast<int64_t>(tokens[t]) * hidden, hidden,
                x.begin() + static_cast<int64_t>(t) * hidden);
  }
  cache->k.resize(layers);
  cache->v.resize(layers);
  if (capture != nullptr) {
    *capture = KvCache{};
    capture->layers = layers;
    capture->tokens = n;
    capture->heads = heads;
    capture->kv_heads = kv_heads;
    capture->head_dim = hd;
    capture->k.resize(layers);
    capture->v.resize(layers);
    if (opts.capture_queries) capture->q.resize(layers);
  }
  std::vector<float> k_hat, v_hat;

  for (int l = 0; l < layers; ++l) {
    const LlamaLayerWeights& w = weights_.layers[l];
    std::vector<float>& kc = cache->k[l];
    std::vector<float>& vc = cache->v[l];
    kc.resize(total * kvd);
    vc.resize(total * kvd);
    float* k_new = kc.data() + static_cast<int64_t>(pos0) * kvd;
    float* v_new = vc.data() + static_cast<int64_t>(pos0) * kvd;

    RmsNorm(x.data(), n, hidden, w.input_layernorm.data(), c.rms_norm_eps, h.data());
    LinearForward(h.data(), n, w.q_proj, q.data());
    LinearForward(h.data(), n, w.k_proj, k_new);
    LinearForward(h.data(), n, w.v_proj, v_new);
    ApplyRope(q.data(), n, heads, hd, pos0, inv_freq_);
    ApplyRope(k_new, n, kv_heads, hd, pos0, inv_freq_);
    if (capture != nullptr) {
      capture->k[l] = kc;
      capture->v[l] = vc;
      if (opts.capture_queries) capture->q[l] = q;
    }

    AttentionArgs args;
    args.q = q.data();
    args.k = kc.data();
    args.v = vc.data();
    args.n = n;
    args.pos0 = pos0;
    args.heads = heads;
    args.kv_heads = kv_heads;
    args.head_dim = hd;
    args.out = attn.data();
    if (hooked) {
      k_hat.assign(kc.size(), 0.0f);
      v_hat.assign(vc.size(), 0.0f);
      VQKV_RETURN_IF_ERROR(opts.transform(l, kc, vc, &k_hat, &v_hat));
      if (k_hat.size() != kc.size() || v_hat.size() != vc.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("KvTransform for layer ", l, " resized k_hat/v_hat to ", k_hat.size(), "/",
                         v_hat.size(), ", expected ", kc.size()));
      }
      args.k_hat = k_hat.data();
      args.v_hat = v_hat.data();
      args.sink_tokens = opts.sink_tokens;
      args.recent_tokens = opts.recent_tokens;
    }
    CausalAttention(args);
    LinearForward(attn.data(), n, w.o_proj, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];

    RmsNorm(x.data(), n, hidden, w.post_attention_layernorm.data(), c.rms_norm_eps, h.data());
    LinearForward(h.data(), n, w.gate_proj, gate.data());
    LinearForward(h.data(), n, w.up_proj, up.data());
    for (size_t i = 0; i < gate.size(); ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
    LinearForward(gate.data(), n, w.down_proj, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
  }

  const int rows = last_only ? 1 : n;
  const float* last = x.data() + static_cast<int64_t>(n - rows) * hidden;
  RmsNorm(last, rows, hidden, weights_.norm.data(), c.rms_norm_eps, h.data());
  logits->resize(static_cast<size_t>(rows) * c.vocab_size);
  const float* head =
      weights_.lm_head.w.empty() ? weights_.embed_tokens.data() : weights_.lm_head.w.data();
  LinearForward(h.data(), rows, head, nullptr, hidden, c.vocab_size, logits->data());
  return absl::OkStatus();
}

}  // namespace vqkv::model
