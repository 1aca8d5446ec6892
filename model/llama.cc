#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/llama_ops.h"

namespace vqkv::model {
namespace {

// The rest of a decoder layer after attention, for `n` rows: x += o_proj(attn), then
// x += down(silu(gate(norm(x))) * up(norm(x))). h and tmp hold [n, hidden], gate and up [n, ff].
void AttentionOutputAndMlp(const LlamaLayerWeights& w, float eps, int n, int hidden,
                           const float* attn, float* x, std::vector<float>* h,
                           std::vector<float>* tmp, std::vector<float>* gate,
                           std::vector<float>* up) {
  const size_t xs = static_cast<size_t>(n) * hidden;
  LinearForward(attn, n, w.o_proj, tmp->data());
  for (size_t i = 0; i < xs; ++i) x[i] += (*tmp)[i];
  RmsNorm(x, n, hidden, w.post_attention_layernorm.data(), eps, h->data());
  LinearForward(h->data(), n, w.gate_proj, gate->data());
  LinearForward(h->data(), n, w.up_proj, up->data());
  for (size_t i = 0; i < gate->size(); ++i) {
    const float g = (*gate)[i];
    (*gate)[i] = g / (1.0f + std::exp(-g)) * (*up)[i];
  }
  LinearForward(gate->data(), n, w.down_proj, tmp->data());
  for (size_t i = 0; i < xs; ++i) x[i] += (*tmp)[i];
}

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

absl::StatusOr<std::vector<std::vector<int>>> LlamaModel::Sample(
    const std::vector<std::vector<int>>& prompts, int max_new_tokens,
    const SampleOptions& opts) const {
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (absl::Status st = CheckTokens(prompts[i]); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("prompt ", i, ": ", st.message()));
    }
  }
  if (max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  if (!(opts.temperature >= 0) || !std::isfinite(opts.temperature)) {
    return absl::InvalidArgumentError("temperature must be a finite number >= 0");
  }
  if (!(opts.top_p > 0 && opts.top_p <= 1)) {
    return absl::InvalidArgumentError("top_p must be in (0, 1]");
  }
  if (opts.batch < 1) return absl::InvalidArgumentError("batch must be >= 1");
  const int limit = config_.max_position_embeddings, vocab = config_.vocab_size;
  std::vector<std::vector<int>> out(prompts.size());
  std::vector<double> probs;
  std::vector<int> order(vocab);
  // Draws the next token of prompt i from one row of logits.
  auto draw = [&](const float* row, std::mt19937_64* rng) {
    if (opts.temperature == 0) return static_cast<int>(std::max_element(row, row + vocab) - row);
    const float mx = *std::max_element(row, row + vocab);
    probs.resize(vocab);
    double z = 0;
    for (int j = 0; j < vocab; ++j) {
      probs[j] = std::exp(static_cast<double>(row[j] - mx) / opts.temperature);
      z += probs[j];
    }
    std::iota(order.begin(), order.end(), 0);
    int keep = vocab;
    if (opts.top_p < 1) {
      // Sort only the tokens within e^-20 of the most likely one: the rest hold less than
      // vocab * 2e-9 of the mass, never part of a nucleus.
      keep = static_cast<int>(
          std::partition(order.begin(), order.end(), [&](int j) { return probs[j] > 2e-9; }) -
          order.begin());
      std::sort(order.begin(), order.begin() + keep,
                [&](int a, int b) { return probs[a] != probs[b] ? probs[a] > probs[b] : a < b; });
      const int candidates = keep;
      double mass = 0;
      keep = 0;
      while (keep < candidates && mass < opts.top_p * z) mass += probs[order[keep++]];
      z = mass;
    }
    const double u = std::uniform_real_distribution<double>(0, z)(*rng);
    double c = 0;
    for (int j = 0; j < keep; ++j) {
      c += probs[order[j]];
      if (u < c) return order[j];
    }
    return order[keep - 1];
  };
  for (size_t b0 = 0; b0 < prompts.size(); b0 += size_t(opts.batch)) {
    const size_t b1 = std::min(prompts.size(), b0 + size_t(opts.batch));
    const int n = static_cast<int>(b1 - b0);
    std::vector<DecodeCache> caches(n);
    std::vector<std::mt19937_64> rngs;
    std::vector<int> next(n), pos(n);
    std::vector<bool> done(n, false);
    const ForwardOptions plain;
    std::vector<float> logits;
    for (int i = 0; i < n; ++i) {
      const std::vector<int>& p = prompts[b0 + i];
      std::seed_seq seq{static_cast<uint32_t>(opts.seed), static_cast<uint32_t>(opts.seed >> 32),
                        static_cast<uint32_t>(b0 + i)};
      rngs.emplace_back(seq);
      pos[i] = static_cast<int>(p.size());
      if (max_new_tokens == 0 || pos[i] >= limit) {
        done[i] = true;
        continue;
      }
      VQKV_RETURN_IF_ERROR(Run(p.data(), static_cast<int>(p.size()), 0, &caches[i], plain,
                               /*last_only=*/true, &logits));
      next[i] = draw(logits.data(), &rngs[i]);
    }
    while (true) {
      // Record the drawn tokens; the sequences still running take one step together.
      std::vector<int> live_tokens, live_pos, live_index;
      std::vector<DecodeCache*> live_caches;
      for (int i = 0; i < n; ++i) {
        if (done[i]) continue;
        std::vector<int>& o = out[b0 + i];
        o.push_back(next[i]);
        if (config_.IsEos(next[i]) || static_cast<int>(o.size()) >= max_new_tokens ||
            pos[i] + 1 >= limit) {
          done[i] = true;
          caches[i] = DecodeCache{};
          continue;
        }
        live_tokens.push_back(next[i]);
        live_pos.push_back(pos[i]);
        live_caches.push_back(&caches[i]);
        live_index.push_back(i);
      }
      if (live_index.empty()) break;
      VQKV_RETURN_IF_ERROR(Step(live_tokens.data(), live_pos.data(), live_caches.data(),
                                static_cast<int>(live_index.size()), &logits));
      for (size_t r = 0; r < live_index.size(); ++r) {
        const int i = live_index[r];
        ++pos[i];
        next[i] = draw(logits.data() + static_cast<int64_t>(r) * vocab, &rngs[i]);
      }
    }
  }
  return out;
}

absl::Status LlamaModel::Step(const int* tokens, const int* pos, DecodeCache* const* caches, int n,
                              std::vector<float>* logits) const {
  const LlamaConfig& c = config_;
  const int hidden = c.hidden_size, heads = c.num_attention_heads, kv_heads = c.num_key_value_heads,
            hd = c.head_dim, ff = c.intermediate_size, layers = c.num_hidden_layers;
  const int qd = heads * hd, kvd = kv_heads * hd;
  std::vector<float> x(static_cast<size_t>(n) * hidden), h(x.size()), tmp(x.size());
  std::vector<float> q(static_cast<size_t>(n) * qd), attn(q.size());
  std::vector<float> k_new(static_cast<size_t>(n) * kvd), v_new(k_new.size());
  std::vector<float> gate(static_cast<size_t>(n) * ff), up(gate.size());
  for (int t = 0; t < n; ++t) {
    std::copy_n(weights_.embed_tokens.begin() + static_cast<int64_t>(tokens[t]) * hidden, hidden,
                x.begin() + static_cast<int64_t>(t) * hidden);
    caches[t]->k.resize(layers);
    caches[t]->v.resize(layers);
  }
  for (int l = 0; l < layers; ++l) {
    const LlamaLayerWeights& w = weights_.layers[l];
    RmsNorm(x.data(), n, hidden, w.input_layernorm.data(), c.rms_norm_eps, h.data());
    LinearForward(h.data(), n, w.q_proj, q.data());
    LinearForward(h.data(), n, w.k_proj, k_new.data());
    LinearForward(h.data(), n, w.v_proj, v_new.data());
    for (int t = 0; t < n; ++t) {
      float* qt = q.data() + static_cast<int64_t>(t) * qd;
      float* kt = k_new.data() + static_cast<int64_t>(t) * kvd;
      ApplyRope(qt, 1, heads, hd, pos[t], inv_freq_);
      ApplyRope(kt, 1, kv_heads, hd, pos[t], inv_freq_);
      std::vector<float>& kc = caches[t]->k[l];
      std::vector<float>& vc = caches[t]->v[l];
      kc.resize(static_cast<size_t>(pos[t] + 1) * kvd);
      vc.resize(kc.size());
      std::copy_n(kt, kvd, kc.data() + static_cast<int64_t>(pos[t]) * kvd);
      std::copy_n(v_new.data() + static_cast<int64_t>(t) * kvd, kvd,
                  vc.data() + static_cast<int64_t>(pos[t]) * kvd);
      AttentionArgs args;
      args.q = qt;
      args.k = kc.data();
      args.v = vc.data();
      args.n = 1;
      args.pos0 = pos[t];
      args.heads = heads;
      args.kv_heads = kv_heads;
      args.head_dim = hd;
      args.out = attn.data() + static_cast<int64_t>(t) * qd;
      CausalAttention(args);
    }
    AttentionOutputAndMlp(w, c.rms_norm_eps, n, hidden, attn.data(), x.data(), &h, &tmp, &gate,
                          &up);
  }
  RmsNorm(x.data(), n, hidden, weights_.norm.data(), c.rms_norm_eps, h.data());
  logits->resize(static_cast<size_t>(n) * c.vocab_size);
  const float* head =
      weights_.lm_head.w.empty() ? weights_.embed_tokens.data() : weights_.lm_head.w.data();
  LinearForward(h.data(), n, head, nullptr, hidden, c.vocab_size, logits->data());
  return absl::OkStatus();
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
    AttentionOutputAndMlp(w, c.rms_norm_eps, n, hidden, attn.data(), x.data(), &h, &tmp, &gate,
                          &up);
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
