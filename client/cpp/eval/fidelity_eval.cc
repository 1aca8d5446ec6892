#include "client/cpp/eval/fidelity_eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/parallel.h"
#include "common/status_macros.h"
#include "model/scoring.h"
#include "model/text_data.h"

namespace vqkv::eval {

int64_t Corpus::tokens() const {
  int64_t n = 0;
  for (const auto& s : seqs) n += int64_t(s.size());
  return n;
}

Corpus BuildCorpus(const model::Tokenizer& tok, const std::vector<std::string>& stories,
                   int max_tokens, int min_tokens, int max_seqs, bool pack) {
  Corpus c;
  std::vector<int> cur;
  auto flush = [&] {
    if (int(cur.size()) >= min_tokens) c.seqs.push_back(cur);
    cur.clear();
  };
  for (const auto& s : stories) {
    if (max_seqs > 0 && int(c.seqs.size()) >= max_seqs) break;
    std::vector<int> ids = tok.EncodeForScoring(s);
    if (int(ids.size()) > max_tokens) ids.resize(max_tokens);
    if (!pack) {
      cur = std::move(ids);
      flush();
      continue;
    }
    if (cur.size() + ids.size() > size_t(max_tokens)) flush();
    cur.insert(cur.end(), ids.begin(), ids.end());
  }
  if (!cur.empty() && (max_seqs <= 0 || int(c.seqs.size()) < max_seqs)) flush();
  return c;
}

absl::StatusOr<kernels::KvSamples> CaptureSamples(const model::LlamaModel& m, const Corpus& c) {
  const auto& cfg = m.config();
  kernels::KvSamples s;
  s.layers = cfg.num_hidden_layers;
  s.kv_heads = cfg.num_key_value_heads;
  s.head_dim = cfg.head_dim;
  s.q_heads = cfg.num_attention_heads;
  s.k.resize(s.layers);
  s.v.resize(s.layers);
  s.q.resize(s.layers);
  for (const auto& seq : c.seqs) {
    model::KvCache cache;
    model::ForwardOptions opts;
    opts.capture = &cache;
    VQKV_RETURN_IF_ERROR(m.Forward(seq, opts).status());
    for (int l = 0; l < s.layers; ++l) {
      s.k[l].insert(s.k[l].end(), cache.k[l].begin(), cache.k[l].end());
      s.v[l].insert(s.v[l].end(), cache.v[l].begin(), cache.v[l].end());
      s.q[l].insert(s.q[l].end(), cache.q[l].begin(), cache.q[l].end());
    }
    s.seq_lens.push_back(int64_t(seq.size()));
  }
  return s;
}

absl::StatusOr<std::vector<std::string>> GenerateStories(const model::LlamaModel& m,
                                                         const model::Tokenizer& tok,
                                                         const std::vector<std::string>& seeds,
                                                         const GenerateOptions& opts) {
  if (seeds.empty()) return absl::InvalidArgumentError("GenerateStories: no seed stories");
  if (opts.tokens <= 0 || opts.prompt_tokens < 1 || opts.max_story_tokens <= opts.prompt_tokens) {
    return absl::InvalidArgumentError(
        "GenerateStories: tokens and prompt_tokens must be > 0 and max_story_tokens > "
        "prompt_tokens");
  }
  std::vector<std::string> stories;
  int64_t done = 0;
  size_t next_seed = 0;
  for (uint64_t round = 0; done < opts.tokens; ++round) {
    std::vector<std::vector<int>> prompts;
    for (int i = 0; i < opts.sample.batch; ++i) {
      std::vector<int> ids = tok.EncodeForScoring(seeds[next_seed++ % seeds.size()]);
      ids.resize(std::min<size_t>(ids.size(), size_t(opts.prompt_tokens)));
      prompts.push_back(std::move(ids));
    }
    model::SampleOptions so = opts.sample;
    so.seed = opts.sample.seed + round * 0x9E3779B97F4A7C15ull;
    VQKV_ASSIGN_OR_RETURN(std::vector<std::vector<int>> gen,
                          m.Sample(prompts, opts.max_story_tokens - opts.prompt_tokens, so));
    for (size_t i = 0; i < gen.size() && done < opts.tokens; ++i) {
      std::vector<int> ids(prompts[i].begin() + (tok.bos_id() >= 0 ? 1 : 0), prompts[i].end());
      for (int t : gen[i]) {
        if (m.config().IsEos(t)) break;
        ids.push_back(t);
      }
      std::string text = tok.Decode(ids);
      // As a story file holds it (model/text_data.h SplitStories): no separator inside, no
      // surrounding whitespace, so the stories written to a file load back unchanged.
      for (size_t at; (at = text.find(model::kStorySeparator)) != std::string::npos;) {
        text.erase(at, model::kStorySeparator.size());
      }
      text = std::string(absl::StripAsciiWhitespace(text));
      if (text.empty()) continue;
      done += int64_t(ids.size()) + 1;
      stories.push_back(std::move(text));
    }
    if (opts.progress) {
      opts.progress(std::min(done, opts.tokens), opts.tokens,
                    absl::StrCat(stories.size(), " stories"));
    }
  }
  return stories;
}

absl::StatusOr<kernels::KvSamples> ConcatSamples(const kernels::KvSamples& a,
                                                 const kernels::KvSamples& b) {
  if (a.layers != b.layers || a.kv_heads != b.kv_heads || a.head_dim != b.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("ConcatSamples: geometries differ (", a.layers, "x", a.kv_heads, "x",
                     a.head_dim, " vs ", b.layers, "x", b.kv_heads, "x", b.head_dim, ")"));
  }
  kernels::KvSamples s = a;
  auto lens = [](const kernels::KvSamples& x) {
    return x.seq_lens.empty() ? std::vector<int64_t>{x.tokens(0)} : x.seq_lens;
  };
  auto starts = [&](const kernels::KvSamples& x) {
    return x.seq_starts.empty() ? std::vector<int64_t>(lens(x).size(), 0) : x.seq_starts;
  };
  s.seq_lens = lens(a);
  const std::vector<int64_t> lb = lens(b);
  s.seq_lens.insert(s.seq_lens.end(), lb.begin(), lb.end());
  if (!a.seq_starts.empty() || !b.seq_starts.empty()) {
    s.seq_starts = starts(a);
    const std::vector<int64_t> sb = starts(b);
    s.seq_starts.insert(s.seq_starts.end(), sb.begin(), sb.end());
  }
  const bool queries = !a.q.empty() && !b.q.empty() && a.q_heads == b.q_heads;
  if (!queries) {
    s.q.clear();
    s.q_heads = 0;
  }
  for (int l = 0; l < s.layers; ++l) {
    s.k[l].insert(s.k[l].end(), b.k[l].begin(), b.k[l].end());
    s.v[l].insert(s.v[l].end(), b.v[l].begin(), b.v[l].end());
    if (queries) s.q[l].insert(s.q[l].end(), b.q[l].begin(), b.q[l].end());
  }
  return s;
}

absl::StatusOr<Reference> ComputeReference(const model::LlamaModel& m, const Corpus& c) {
  Reference r;
  for (const auto& seq : c.seqs) {
    VQKV_ASSIGN_OR_RETURN(std::vector<float> logits, m.Forward(seq, {}));
    r.logits.push_back(std::move(logits));
  }
  return r;
}

namespace {

// Log-softmax of one row.
void LogSoftmax(const float* x, int n, std::vector<double>* out) {
  out->resize(n);
  const double mx = *std::max_element(x, x + n);
  double z = 0;
  for (int i = 0; i < n; ++i) z += std::exp(double(x[i]) - mx);
  const double lz = std::log(z) + mx;
  for (int i = 0; i < n; ++i) (*out)[i] = double(x[i]) - lz;
}

}  // namespace

absl::StatusOr<EvalRow> Evaluate(const model::LlamaModel& m, const Corpus& c, const Reference& ref,
                                 const kernels::Codec& codec, int64_t codebook_bytes,
                                 const EvalOptions& opts) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto& cfg = m.config();
  const int L = cfg.num_hidden_layers, H = cfg.num_key_value_heads, D = cfg.head_dim;
  const int V = cfg.vocab_size;
  EvalRow row;
  row.codec = codec.Label();
  double k_err = 0, k_ref = 0, v_err = 0, v_ref = 0, k_cos = 0, v_cos = 0;
  int64_t vec = 0;
  kernels::AttentionAccumulator attn;
  double nll_ref = 0, nll = 0, kl = 0;
  int64_t scored = 0, agree = 0;
  int64_t stored_bytes = 0, code_bytes = 0, compressed_elems = 0;
  const int first = opts.sink_tokens + opts.recent_tokens;
  for (size_t si = 0; si < c.seqs.size(); ++si) {
    const auto& seq = c.seqs[si];
    const int T = int(seq.size());
    std::vector<std::vector<float>> k_hat(L), v_hat(L);
    model::KvCache cache;
    model::ForwardOptions fo;
    fo.capture = &cache;
    fo.sink_tokens = opts.sink_tokens;
    fo.recent_tokens = opts.recent_tokens;
    fo.transform = [&](int layer, const std::vector<float>& k, const std::vector<float>& v,
                       std::vector<float>* kh, std::vector<float>* vh) -> absl::Status {
      if (!opts.compress_layers.empty() &&
          (layer >= int(opts.compress_layers.size()) || !opts.compress_layers[layer])) {
        *kh = k;
        *vh = v;
        k_hat[layer] = k;
        v_hat[layer] = v;
        return absl::OkStatus();
      }
      // Store the layer as blocks of block_tokens, as the service would, and read it back.
      const int64_t row_elems = int64_t{H} * D;
      for (int b0 = 0; b0 < T; b0 += opts.block_tokens) {
        const int n = std::min(opts.block_tokens, T - b0);
        std::vector<float> blk(size_t(2) * n * row_elems);
        std::memcpy(blk.data(), k.data() + b0 * row_elems, n * row_elems * 4);
        std::memcpy(blk.data() + n * row_elems, v.data() + b0 * row_elems, n * row_elems * 4);
        const kernels::KvShape shape{1, n, H, D};
        std::vector<std::string> payload;
        VQKV_RETURN_IF_ERROR(codec.Encode({{shape, DType::kF32, blk.data(), b0, layer}}, &payload));
        VQKV_ASSIGN_OR_RETURN(std::vector<float> back, codec.DecodeToFloat(payload[0]));
        std::memcpy(kh->data() + b0 * row_elems, back.data(), n * row_elems * 4);
        std::memcpy(vh->data() + b0 * row_elems, back.data() + n * row_elems, n * row_elems * 4);
        // Accounting on the fp16 basis a serving engine would send.
        stored_bytes += codec.PayloadBytes(shape, DType::kF16, b0, layer);
        const int sinks = int(std::max<int64_t>(0, std::min<int64_t>(opts.sink_tokens - b0, n)));
        code_bytes += codec.PayloadBytes(shape, DType::kF16, b0, layer) -
                      int64_t(sizeof(kernels::PayloadHeader)) - int64_t{2} * sinks * row_elems * 2;
        compressed_elems += int64_t{2} * (n - sinks) * row_elems;
      }
      for (int t = 0; t < T && !opts.exact_token_ids.empty(); ++t) {
        if (std::find(opts.exact_token_ids.begin(), opts.exact_token_ids.end(), seq[t]) ==
            opts.exact_token_ids.end()) {
          continue;
        }
        std::memcpy(kh->data() + t * row_elems, k.data() + t * row_elems, row_elems * 4);
        std::memcpy(vh->data() + t * row_elems, v.data() + t * row_elems, row_elems * 4);
      }
      k_hat[layer] = *kh;
      v_hat[layer] = *vh;
      return absl::OkStatus();
    };
    VQKV_ASSIGN_OR_RETURN(std::vector<float> logits, m.Forward(seq, fo));
    for (int l = 0; l < L; ++l) {
      const int64_t skip = int64_t{std::min(opts.sink_tokens, T)} * H * D;
      const int64_t nvec = int64_t{T - std::min(opts.sink_tokens, T)} * H;
      const auto ke =
          kernels::CompareVectors(cache.k[l].data() + skip, k_hat[l].data() + skip, nvec, D);
      const auto ve =
          kernels::CompareVectors(cache.v[l].data() + skip, v_hat[l].data() + skip, nvec, D);
      double kr = 0, vr = 0;
      for (int64_t i = skip; i < int64_t(cache.k[l].size()); ++i) {
        kr += double(cache.k[l][i]) * cache.k[l][i];
        vr += double(cache.v[l][i]) * cache.v[l][i];
      }
      k_err += ke.rel_error * kr;
      k_ref += kr;
      v_err += ve.rel_error * vr;
      v_ref += vr;
      k_cos += ke.cosine * nvec;
      v_cos += ve.cosine * nvec;
      vec += nvec;
      kernels::AttentionInputs in;
      in.q = cache.q[l].data();
      in.k = cache.k[l].data();
      in.v = cache.v[l].data();
      in.k_hat = k_hat[l].data();
      in.v_hat = v_hat[l].data();
      in.tokens = T;
      in.q_heads = cfg.num_attention_heads;
      in.kv_heads = H;
      in.dim = D;
      in.min_position = first;
      in.sink_tokens = opts.sink_tokens;
      in.recent_tokens = opts.recent_tokens;
      if (opts.max_attention_queries > 0) {
        in.query_stride = std::max<int64_t>(1, (T - first) / opts.max_attention_queries);
      }
      if (T > first) attn.Add(in);
    }
    VQKV_ASSIGN_OR_RETURN(model::TokenScores sc, model::ScoreTokens(logits, seq, first));
    VQKV_ASSIGN_OR_RETURN(model::TokenScores sr, model::ScoreTokens(ref.logits[si], seq, first));
    nll += sc.mean_nll * sc.scored;
    nll_ref += sr.mean_nll * sr.scored;
    for (int t = first; t < T - 1; ++t) agree += sc.argmax[t] == sr.argmax[t];
    std::mutex mu;
    ParallelFor(std::max(0, T - 1 - first), 16, [&](int64_t b, int64_t e) {
      std::vector<double> lp, lq;
      double local = 0;
      for (int64_t t = first + b; t < first + e; ++t) {
        LogSoftmax(ref.logits[si].data() + t * V, V, &lp);
        LogSoftmax(logits.data() + t * V, V, &lq);
        double d = 0;
        for (int i = 0; i < V; ++i) d += std::exp(lp[i]) * (lp[i] - lq[i]);
        local += std::max(0.0, d);
      }
      std::lock_guard<std::mutex> lock(mu);
      kl += local;
    });
    scored += sc.scored;
  }
  if (scored == 0)
    return absl::InvalidArgumentError("evaluate: no sequence longer than sinks + recent window");
  row.k.rel_error = k_ref > 0 ? k_err / k_ref : 0;
  row.v.rel_error = v_ref > 0 ? v_err / v_ref : 0;
  row.k.cosine = k_cos / double(vec);
  row.v.cosine = v_cos / double(vec);
  row.k.vectors = row.v.vectors = vec;
  row.attention = attn.Finish();
  row.ppl_ref = std::exp(nll_ref / double(scored));
  row.ppl = std::exp(nll / double(scored));
  row.ppl_delta_pct = (row.ppl / row.ppl_ref - 1) * 100;
  row.top1_pct = 100.0 * double(agree) / double(scored);
  row.kl = kl / double(scored);
  row.scored = scored;
  const double elems = double(c.tokens()) * L * 2 * H * D;
  const double cb_share =
      double(codebook_bytes) * double(c.tokens()) / double(opts.amortise_tokens);
  row.bits_all_in = (double(stored_bytes) + cb_share) * 8 / elems;
  row.bits_codes = compressed_elems > 0 ? double(code_bytes) * 8 / double(compressed_elems) : 0;
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return row;
}

absl::StatusOr<LayerSensitivity> MeasureLayerSensitivity(
    const model::LlamaModel& m, const Corpus& c, const Reference& ref, const kernels::Codec& codec,
    const EvalOptions& opts,
    const std::function<void(int64_t, int64_t, const std::string&)>& progress) {
  const int L = m.config().num_hidden_layers;
  LayerSensitivity out;
  EvalOptions one = opts;
  one.max_attention_queries = 1;  // attention metrics are not needed here
  for (int l = 0; l <= L; ++l) {
    // l == L: every layer compressed.
    one.compress_layers.assign(L, l == L);
    if (l < L) one.compress_layers[l] = true;
    VQKV_ASSIGN_OR_RETURN(EvalRow row, Evaluate(m, c, ref, codec, 0, one));
    if (l < L) {
      out.kl.push_back(row.kl);
    } else {
      out.all_kl = row.kl;
    }
    if (progress) progress(l + 1, L + 1, absl::StrCat("layer ", l, " KL ", row.kl));
  }
  return out;
}

absl::StatusOr<EvalRow> EvaluateOnSamples(const kernels::KvSamples& s, const kernels::Codec& codec,
                                          int64_t codebook_bytes, const EvalOptions& opts) {
  const auto t0 = std::chrono::steady_clock::now();
  EvalRow row;
  row.codec = codec.Label();
  std::vector<int64_t> lens = s.seq_lens;
  if (lens.empty()) lens.push_back(s.tokens(0));
  const int H = s.kv_heads, D = s.head_dim;
  const int64_t rowe = int64_t{H} * D;
  double k_err = 0, k_ref = 0, v_err = 0, v_ref = 0, k_cos = 0, v_cos = 0;
  int64_t stored = 0, vec = 0;
  kernels::AttentionAccumulator attn;
  for (int l = 0; l < s.layers; ++l) {
    int64_t off = 0;
    for (int64_t len : lens) {
      std::vector<float> blk(2 * len * rowe);
      std::memcpy(blk.data(), s.k[l].data() + off * rowe, len * rowe * 4);
      std::memcpy(blk.data() + len * rowe, s.v[l].data() + off * rowe, len * rowe * 4);
      const kernels::KvShape shape{1, int(len), H, D};
      std::vector<std::string> payload;
      VQKV_RETURN_IF_ERROR(codec.Encode({{shape, DType::kF32, blk.data(), 0, l}}, &payload));
      stored += codec.PayloadBytes(shape, DType::kF16, 0, l);
      VQKV_ASSIGN_OR_RETURN(std::vector<float> back, codec.DecodeToFloat(payload[0]));
      const int64_t skip = std::min<int64_t>(opts.sink_tokens, len);
      const auto ke = kernels::CompareVectors(blk.data() + skip * rowe, back.data() + skip * rowe,
                                              (len - skip) * H, D);
      const auto ve = kernels::CompareVectors(
          blk.data() + (len + skip) * rowe, back.data() + (len + skip) * rowe, (len - skip) * H, D);
      double kr = 0, vr = 0;
      for (int64_t i = skip * rowe; i < len * rowe; ++i) {
        kr += double(blk[i]) * blk[i];
        vr += double(blk[len * rowe + i]) * blk[len * rowe + i];
      }
      k_err += ke.rel_error * kr;
      k_ref += kr;
      v_err += ve.rel_error * vr;
      v_ref += vr;
      k_cos += ke.cosine * double(ke.vectors);
      v_cos += ve.cosine * double(ve.vectors);
      vec += ke.vectors;
      if (!s.q.empty() && len > opts.sink_tokens + opts.recent_tokens) {
        kernels::AttentionInputs in;
        in.q = s.q[l].data() + off * s.q_heads * D;
        in.k = blk.data();
        in.v = blk.data() + len * rowe;
        in.k_hat = back.data();
        in.v_hat = back.data() + len * rowe;
        in.tokens = len;
        in.q_heads = s.q_heads;
        in.kv_heads = H;
        in.dim = D;
        in.min_position = opts.sink_tokens + opts.recent_tokens;
        in.sink_tokens = opts.sink_tokens;
        in.recent_tokens = opts.recent_tokens;
        attn.Add(in);
      }
      off += len;
    }
  }
  row.k.rel_error = k_ref > 0 ? k_err / k_ref : 0;
  row.v.rel_error = v_ref > 0 ? v_err / v_ref : 0;
  row.k.cosine = vec > 0 ? k_cos / double(vec) : 1;
  row.v.cosine = vec > 0 ? v_cos / double(vec) : 1;
  row.k.vectors = row.v.vectors = vec;
  row.attention = attn.Finish();
  row.ppl_ref = row.ppl = row.ppl_delta_pct = row.top1_pct = row.kl = std::nan("");
  const double elems = double(s.tokens(0)) * s.layers * 2 * rowe;
  row.bits_all_in = (double(stored) +
                     double(codebook_bytes) * double(s.tokens(0)) / double(opts.amortise_tokens)) *
                    8 / elems;
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return row;
}

kernels::KvSamples SyntheticSamples(int layers, int kv_heads, int q_heads, int head_dim, int seqs,
                                    int seq_len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  kernels::KvSamples s;
  s.layers = layers;
  s.kv_heads = kv_heads;
  s.q_heads = q_heads;
  s.head_dim = head_dim;
  s.k.resize(layers);
  s.v.resize(layers);
  s.q.resize(layers);
  for (int i = 0; i < seqs; ++i) s.seq_lens.push_back(seq_len);
  const int64_t n = int64_t{seqs} * seq_len;
  for (int l = 0; l < layers; ++l) {
    // Keys: per-channel offsets with a few large outlier channels, rotated by position like
    // RoPE; values: plain noise with a mild per-channel scale; queries correlate with keys.
    std::vector<float> off(head_dim), scale(head_dim);
    for (int d = 0; d < head_dim; ++d) {
      off[d] = (d % 7 == 0 ? 4.f : 0.5f) * nd(rng);
      scale[d] = 0.5f + std::abs(nd(rng));
    }
    s.k[l].resize(n * kv_heads * head_dim);
    s.v[l].resize(n * kv_heads * head_dim);
    s.q[l].resize(n * q_heads * head_dim);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = t % seq_len;
      for (int h = 0; h < kv_heads; ++h) {
        float* k = &s.k[l][(t * kv_heads + h) * head_dim];
        float* v = &s.v[l][(t * kv_heads + h) * head_dim];
        for (int d = 0; d < head_dim; ++d) {
          k[d] = off[d] + scale[d] * nd(rng);
          v[d] = scale[d] * nd(rng);
        }
        for (int d = 0; d + 1 < head_dim; d += 2) {
          const double th = pos * std::pow(10000.0, -double(d) / head_dim);
          const float a = k[d], b = k[d + 1];
          k[d] = float(a * std::cos(th) - b * std::sin(th));
          k[d + 1] = float(a * std::sin(th) + b * std::cos(th));
        }
      }
      for (int h = 0; h < q_heads; ++h) {
        const float* k = &s.k[l][(t * kv_heads + h / (q_heads / kv_heads)) * head_dim];
        float* q = &s.q[l][(t * q_heads + h) * head_dim];
        for (int d = 0; d < head_dim; ++d) q[d] = 0.5f * k[d] + nd(rng);
      }
    }
  }
  return s;
}

std::string FormatTable(const std::vector<EvalRow>& rows) {
  bool with_context = false;
  for (const auto& r : rows) with_context |= r.context > 0;
  std::string s = absl::StrCat(
      with_context ? "| context " : "",
      "| codec | split | bits/elem all-in | bits/elem codes | K rel err | V rel err | K cos | "
      "attn-out err | attn top-8 agree | ppl | ppl delta % | top-1 agree % | KL nats |\n",
      with_context ? "|---" : "", "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    if (with_context) absl::StrAppend(&s, "| ", r.context, " ");
    auto num = [](double v, const char* fmt) {
      if (std::isnan(v)) return std::string("n/a");
      char buf[64];
      std::snprintf(buf, sizeof buf, fmt, v);
      return std::string(buf);
    };
    absl::StrAppend(&s,
                    absl::StrFormat("| %s | %s | %.3f | %.3f | %.4f | %.4f | %.4f | %.4f | %.3f | ",
                                    r.codec, r.split.empty() ? "-" : r.split, r.bits_all_in,
                                    r.bits_codes, r.k.rel_error, r.v.rel_error, r.k.cosine,
                                    r.attention.output_rel_error, r.attention.topk_agreement),
                    num(r.ppl, "%.3f"), " | ", num(r.ppl_delta_pct, "%+.2f"), " | ",
                    num(r.top1_pct, "%.1f"), " | ", num(r.kl, "%.5f"), " |\n");
  }
  return s;
}

}  // namespace vqkv::eval
