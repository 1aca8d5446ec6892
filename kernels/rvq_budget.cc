#include "kernels/rvq_budget.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/parallel.h"
#include "common/simd.h"
#include "common/status_macros.h"
#include "kernels/fidelity.h"
#include "kernels/vq_search.h"

namespace vqkv::kernels {
namespace {

// Reconstructions of `x_in` ([n, heads, dim], row t at positions[t]) after 1..stages stages:
// out[i] for i+1 stages, mapped back from the codebook's code space.
std::vector<std::vector<float>> PrefixReconstructions(const Codebook& cb, int layer, int kind,
                                                      const std::vector<float>& x_in,
                                                      absl::Span<const int64_t> positions) {
  std::vector<float> x = x_in;
  const int64_t rows = int64_t(x.size()) / (int64_t{cb.config().kv_heads} * cb.config().head_dim);
  const auto pos = positions.subspan(0, size_t(rows));
  ToCodeSpace(cb.code_space(), layer, kind, cb.config().kv_heads, cb.config().head_dim, pos,
              x.data());
  const RvqConfig& cfg = cb.config();
  const int dim = cfg.head_dim, heads = cfg.kv_heads;
  const StageConfig& sc = cfg.at(layer, kind);
  const int64_t n = int64_t(x.size()) / dim;  // vectors (token, head)
  std::vector<std::vector<float>> out;
  std::vector<float> r = x, recon(x.size(), 0.f);
  std::vector<int32_t> idx(n);
  for (int i = 0; i < sc.stages; ++i) {
    if (cfg.per_head) {
      std::vector<float> sub;
      for (int h = 0; h < heads; ++h) {
        const int64_t m = n / heads;
        sub.resize(m * dim);
        for (int64_t v = 0; v < m; ++v)
          std::memcpy(&sub[v * dim], &r[(v * heads + h) * dim], dim * 4);
        std::vector<int32_t> sidx(m);
        NearestCodewords(sub.data(), m, dim, cb.Table(layer, kind, h, i),
                         cb.Norms(layer, kind, h, i), sc.size, sidx.data(), nullptr);
        for (int64_t v = 0; v < m; ++v) idx[v * heads + h] = sidx[v];
      }
    } else {
      NearestCodewords(r.data(), n, dim, cb.Table(layer, kind, 0, i), cb.Norms(layer, kind, 0, i),
                       sc.size, idx.data(), nullptr);
    }
    for (int64_t v = 0; v < n; ++v) {
      const int g = cfg.per_head ? int(v % heads) : 0;
      const float* cw = cb.Table(layer, kind, g, i) + int64_t{idx[v]} * dim;
      for (int d = 0; d < dim; ++d) {
        r[v * dim + d] -= cw[d];
        recon[v * dim + d] += cw[d];
      }
    }
    out.push_back(recon);
    FromCodeSpace(cb.code_space(), layer, kind, heads, dim, pos, out.back().data());
  }
  return out;
}

struct PairErrors {
  std::vector<double> err2;  // [a * B + b]: squared attention-output error, summed
  double ref2 = 0;           // squared exact attention output, summed
};

inline float Dot(const float* a, const float* b, int n) {
  simd::V8 acc = {};
  int i = 0;
  for (; i + 8 <= n; i += 8) acc += simd::Load8(a + i) * simd::Load8(b + i);
  float s = simd::Sum8(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Attention-output errors of one layer for every (K prefix a, V prefix b) pair, as a decoder
// with a compressed cache sees them (sinks and the recent window exact). Per query the exact
// output is computed once, the reconstructed probabilities once per K prefix, and only the
// weighted value sum per pair: the work is A*n*dim + A*B*n*dim per query, not 4*A*B*n*dim.
PairErrors MeasurePairErrors(const KvSamples& calib, int l,
                             const std::vector<std::vector<float>>& kr,
                             const std::vector<std::vector<float>>& vr,
                             const std::vector<int64_t>& seq_lens, const BudgetOptions& opts) {
  const int dim = calib.head_dim, kvh_n = calib.kv_heads, qh_n = calib.q_heads;
  const int group = qh_n / kvh_n;
  const size_t A = kr.size(), B = vr.size();
  const float scale = float(1.0 / std::sqrt(double(dim)));
  const int64_t min_pos = opts.sink_tokens + opts.recent_tokens;
  struct Job {
    int64_t off, t;
    int h;
  };
  std::vector<Job> jobs;
  int64_t off = 0;
  for (int64_t len : seq_lens) {
    int64_t stride = std::max<int64_t>(1, opts.query_stride);
    if (opts.max_queries > 0)
      stride = std::max<int64_t>(stride, (len - min_pos) / opts.max_queries);
    if (len > min_pos) {
      for (int64_t t = len - 1; t >= min_pos; t -= stride) {
        for (int h = 0; h < qh_n; ++h) jobs.push_back({off, t, h});
      }
    }
    off += len;
  }
  PairErrors total;
  total.err2.assign(A * B, 0.0);
  std::mutex mu;
  ParallelFor(int64_t(jobs.size()), 2, [&](int64_t jb, int64_t je) {
    std::vector<double> err2(A * B, 0.0);
    double ref2 = 0;
    std::vector<float> lg, p, ph, o(dim), oe(dim), oh(dim);
    for (int64_t j = jb; j < je; ++j) {
      const Job& job = jobs[j];
      const int64_t n = job.t + 1;
      const int kvh = job.h / group;
      const float* q = calib.q[l].data() + ((job.off + job.t) * qh_n + job.h) * dim;
      auto row = [&](const float* base, int64_t s) {
        return base + ((job.off + s) * kvh_n + kvh) * dim;
      };
      const float* k = calib.k[l].data();
      const float* v = calib.v[l].data();
      lg.resize(n);
      p.resize(n);
      ph.resize(n);
      float mx = -INFINITY;
      for (int64_t s = 0; s < n; ++s) {
        lg[s] = Dot(q, row(k, s), dim) * scale;
        mx = std::max(mx, lg[s]);
      }
      double z = 0;
      for (int64_t s = 0; s < n; ++s) z += (p[s] = std::exp(lg[s] - mx));
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t s = 0; s < n; ++s) {
        const float w = float(p[s] / z);
        p[s] = w;
        const float* vs = row(v, s);
        for (int d = 0; d < dim; ++d) o[d] += w * vs[d];
      }
      for (int d = 0; d < dim; ++d) ref2 += double(o[d]) * o[d];
      // Compressed positions: [sink_tokens, t - recent_tokens].
      const int64_t c0 = std::min<int64_t>(opts.sink_tokens, n);
      const int64_t c1 = std::max<int64_t>(c0, job.t - opts.recent_tokens + 1);
      for (size_t a = 0; a < A; ++a) {
        const float* khat = kr[a].data();
        float mh = -INFINITY;
        for (int64_t s = 0; s < n; ++s) {
          ph[s] = (s >= c0 && s < c1) ? Dot(q, row(khat, s), dim) * scale : lg[s];
          mh = std::max(mh, ph[s]);
        }
        double zh = 0;
        for (int64_t s = 0; s < n; ++s) zh += (ph[s] = std::exp(ph[s] - mh));
        const float iz = float(1.0 / zh);
        std::fill(oe.begin(), oe.end(), 0.f);
        for (int64_t s = 0; s < n; ++s) {
          ph[s] *= iz;
          if (s >= c0 && s < c1) continue;
          const float* vs = row(v, s);
          for (int d = 0; d < dim; ++d) oe[d] += ph[s] * vs[d];
        }
        for (size_t b = 0; b < B; ++b) {
          const float* vhat = vr[b].data();
          oh = oe;
          for (int64_t s = c0; s < c1; ++s) {
            const float w = ph[s];
            const float* vs = row(vhat, s);
            for (int d = 0; d < dim; ++d) oh[d] += w * vs[d];
          }
          double e = 0;
          for (int d = 0; d < dim; ++d) e += double(o[d] - oh[d]) * (o[d] - oh[d]);
          err2[a * B + b] += e;
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < err2.size(); ++i) total.err2[i] += err2[i];
    total.ref2 += ref2;
  });
  return total;
}

}  // namespace

RvqConfig MaxStagesConfig(int layers, int kv_heads, int head_dim, const BudgetOptions& opts,
                          bool per_head) {
  const int kb = StageConfig{1, opts.k_size}.bits(), vb = StageConfig{1, opts.v_size}.bits();
  const double pair_bits = 2.0 * opts.bits_per_element * head_dim * opts.max_share;
  const int max_k = std::max(1, int((pair_bits - vb) / kb));
  const int max_v = std::max(1, int((pair_bits - kb) / vb));
  return RvqConfig::Uniform(layers, kv_heads, head_dim, {max_k, opts.k_size}, {max_v, opts.v_size},
                            per_head);
}

absl::StatusOr<SplitErrors> MeasureSplitErrors(const Codebook& full, const KvSamples& calib,
                                               const BudgetOptions& opts) {
  const RvqConfig& cfg = full.config();
  if (calib.layers != cfg.layers || calib.kv_heads != cfg.kv_heads ||
      calib.head_dim != cfg.head_dim) {
    return absl::InvalidArgumentError(
        "choose split: calibration samples do not match the codebook geometry");
  }
  if (calib.q_heads <= 0 || int(calib.q.size()) != calib.layers ||
      calib.q_heads % calib.kv_heads != 0) {
    return absl::InvalidArgumentError(
        "choose split: calibration samples carry no queries (q, q_heads)");
  }
  const int L = cfg.layers;
  std::vector<int64_t> seq_lens = calib.seq_lens;
  if (seq_lens.empty()) seq_lens.push_back(calib.tokens(0));
  // err[l][nk-1][nv-1]
  std::vector<std::vector<std::vector<double>>> err(L);
  int64_t step = 0;
  const int64_t total = int64_t{L} * cfg.k[0].stages;
  const std::vector<int64_t> positions = SamplePositions(calib);
  for (int l = 0; l < L; ++l) {
    const auto kr = PrefixReconstructions(full, l, 0, calib.k[l], positions);
    const auto vr = PrefixReconstructions(full, l, 1, calib.v[l], positions);
    err[l].assign(kr.size(), std::vector<double>(vr.size(), 0));
    const PairErrors pe = MeasurePairErrors(calib, l, kr, vr, seq_lens, opts);
    for (size_t a = 0; a < kr.size(); ++a) {
      for (size_t b = 0; b < vr.size(); ++b) {
        const double e2 = pe.err2[a * vr.size() + b];
        err[l][a][b] = pe.ref2 > 0 ? std::sqrt(e2 / pe.ref2) : 0;
      }
      ++step;
      if (opts.progress)
        opts.progress(step, total, absl::StrCat("split: layer ", l, " K stages ", a + 1));
    }
  }
  return SplitErrors{std::move(err)};
}

absl::StatusOr<std::pair<KvSamples, KvSamples>> HoldOutSequences(const KvSamples& s,
                                                                 double holdout) {
  const size_t n = s.seq_lens.size();
  if (n < 2) {
    return absl::InvalidArgumentError(
        "hold-out: need at least two calibration sequences (one to fit, one to choose on)");
  }
  if (!(holdout > 0 && holdout < 1)) {
    return absl::InvalidArgumentError("hold-out fraction must be in (0, 1)");
  }
  const size_t held = std::clamp<size_t>(size_t(std::lround(holdout * double(n))), 1, n - 1);
  const size_t keep = n - held;
  int64_t keep_tokens = 0;
  for (size_t i = 0; i < keep; ++i) keep_tokens += s.seq_lens[i];
  KvSamples a, b;
  for (KvSamples* o : {&a, &b}) {
    o->layers = s.layers;
    o->kv_heads = s.kv_heads;
    o->head_dim = s.head_dim;
    o->q_heads = s.q_heads;
  }
  const int64_t kv_row = int64_t{s.kv_heads} * s.head_dim, q_row = int64_t{s.q_heads} * s.head_dim;
  auto cut = [](const std::vector<float>& x, int64_t at, std::vector<float>* lo,
                std::vector<float>* hi) {
    lo->assign(x.begin(), x.begin() + at);
    hi->assign(x.begin() + at, x.end());
  };
  for (int l = 0; l < s.layers; ++l) {
    a.k.emplace_back(), a.v.emplace_back(), b.k.emplace_back(), b.v.emplace_back();
    cut(s.k[l], keep_tokens * kv_row, &a.k.back(), &b.k.back());
    cut(s.v[l], keep_tokens * kv_row, &a.v.back(), &b.v.back());
    if (l < int(s.q.size())) {
      a.q.emplace_back(), b.q.emplace_back();
      cut(s.q[l], keep_tokens * q_row, &a.q.back(), &b.q.back());
    }
  }
  a.seq_lens.assign(s.seq_lens.begin(), s.seq_lens.begin() + keep);
  b.seq_lens.assign(s.seq_lens.begin() + keep, s.seq_lens.end());
  if (!s.seq_starts.empty()) {
    a.seq_starts.assign(s.seq_starts.begin(), s.seq_starts.begin() + keep);
    b.seq_starts.assign(s.seq_starts.begin() + keep, s.seq_starts.end());
  }
  return std::make_pair(std::move(a), std::move(b));
}

absl::StatusOr<std::vector<double>> ParseLayerWeights(absl::string_view text) {
  std::vector<double> w;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    double v = 0;
    if (!absl::SimpleAtod(line, &v) || !std::isfinite(v) || v < 0) {
      return absl::InvalidArgumentError(absl::StrCat("layer weights, line ", line_no, ": '", line,
                                                     "' is not a finite number >= 0"));
    }
    w.push_back(v);
  }
  if (w.empty()) return absl::InvalidArgumentError("layer weights: no weights");
  return w;
}

std::string FormatLayerWeights(const std::vector<double>& weights, absl::string_view comment) {
  std::string s;
  for (absl::string_view line : absl::StrSplit(comment, '\n', absl::SkipEmpty()))
    absl::StrAppend(&s, "# ", line, "\n");
  for (double v : weights) absl::StrAppend(&s, absl::StrFormat("%.9g\n", v));
  return s;
}

absl::StatusOr<BudgetChoice> ChooseSplit(const Codebook& full, const KvSamples& calib,
                                         const BudgetOptions& opts) {
  VQKV_ASSIGN_OR_RETURN(SplitErrors errors, MeasureSplitErrors(full, calib, opts));
  return ChooseSplitFromErrors(full.config(), errors, opts);
}

absl::StatusOr<BudgetChoice> ChooseSplitFromErrors(const RvqConfig& cfg, const SplitErrors& errors,
                                                   const BudgetOptions& opts) {
  const int L = cfg.layers, dim = cfg.head_dim;
  if (!opts.layer_weights.empty() && int(opts.layer_weights.size()) != L) {
    return absl::InvalidArgumentError(absl::StrCat("choose split: ", opts.layer_weights.size(),
                                                   " layer weights for ", L, " layers"));
  }
  for (double w : opts.layer_weights) {
    if (!(w >= 0) || !std::isfinite(w))
      return absl::InvalidArgumentError("choose split: layer weights must be finite and >= 0");
  }
  // The objective per layer and pair: the error itself, or its weighted square.
  std::vector<std::vector<std::vector<double>>> weighted;
  if (!opts.layer_weights.empty()) {
    weighted = errors.err;
    for (int l = 0; l < L && l < int(weighted.size()); ++l) {
      for (auto& row : weighted[l]) {
        for (double& e : row) e = opts.layer_weights[l] * e * e;
      }
    }
  }
  const auto& err = opts.layer_weights.empty() ? errors.err : weighted;
  const int kb = cfg.k[0].bits(), vb = cfg.v[0].bits();
  if (int(err.size()) != L)
    return absl::InvalidArgumentError("choose split: error grid does not match the config");
  // Budget in code bits per token per head, summed over layers.
  const int64_t budget =
      static_cast<int64_t>(std::floor(opts.bits_per_element * 2 * dim * L + 1e-9));
  const double inf = std::numeric_limits<double>::infinity();
  BudgetChoice best;
  best.config = cfg;
  auto describe = [&](const RvqConfig& c) {
    std::string t;
    for (int l = 0; l < L; ++l) {
      absl::StrAppend(&t, "layer ", l, ": K ", c.k[l].stages, "x", c.k[l].size, " V ",
                      c.v[l].stages, "x", c.v[l].size, " calib attention-output error ",
                      errors.err[l][c.k[l].stages - 1][c.v[l].stages - 1],
                      opts.layer_weights.empty() ? std::string()
                                                 : absl::StrCat(" weight ", opts.layer_weights[l]),
                      "\n");
    }
    return t;
  };
  if (!opts.per_layer) {
    double best_err = inf;
    int bk = 0, bv = 0;
    for (size_t a = 0; a < err[0].size(); ++a) {
      for (size_t b = 0; b < err[0][a].size(); ++b) {
        if (int64_t(L) * ((a + 1) * kb + (b + 1) * vb) > budget) continue;
        double e = 0;
        for (int l = 0; l < L; ++l) e += err[l][a][b];
        if (e < best_err) {
          best_err = e;
          bk = int(a) + 1;
          bv = int(b) + 1;
        }
      }
    }
    if (best_err == inf)
      return absl::FailedPreconditionError("choose split: budget too small for 1 K + 1 V stage");
    for (int l = 0; l < L; ++l) {
      best.config.k[l].stages = bk;
      best.config.v[l].stages = bv;
    }
    best.calib_error = best_err;
    best.table = describe(best.config);
    return best;
  }
  // dp[l][bits] = least error of layers < l using exactly <= bits; choice recorded for backtrack.
  std::vector<std::vector<double>> dp(L + 1, std::vector<double>(budget + 1, inf));
  std::vector<std::vector<std::pair<int, int>>> pick(
      L + 1, std::vector<std::pair<int, int>>(budget + 1, {0, 0}));
  std::fill(dp[0].begin(), dp[0].end(), 0.0);
  for (int l = 0; l < L; ++l) {
    for (int64_t used = 0; used <= budget; ++used) {
      for (size_t a = 0; a < err[l].size(); ++a) {
        for (size_t b = 0; b < err[l][a].size(); ++b) {
          const int64_t cost = int64_t(a + 1) * kb + int64_t(b + 1) * vb;
          if (cost > used || dp[l][used - cost] == inf) continue;
          const double e = dp[l][used - cost] + err[l][a][b];
          if (e < dp[l + 1][used]) {
            dp[l + 1][used] = e;
            pick[l + 1][used] = {int(a) + 1, int(b) + 1};
          }
        }
      }
    }
  }
  if (dp[L][budget] == inf)
    return absl::FailedPreconditionError(
        "choose split: budget too small for 1 K + 1 V stage per layer");
  int64_t used = budget;
  for (int l = L; l > 0; --l) {
    const auto [a, b] = pick[l][used];
    best.config.k[l - 1].stages = a;
    best.config.v[l - 1].stages = b;
    used -= int64_t(a) * kb + int64_t(b) * vb;
  }
  best.calib_error = dp[L][budget];
  best.table = describe(best.config);
  return best;
}

}  // namespace vqkv::kernels
