#include "kernels/rvq_budget.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/status_macros.h"
#include "kernels/fidelity.h"
#include "kernels/vq_search.h"

namespace vqkv::kernels {
namespace {

// Reconstructions of `x` ([n, heads, dim]) after 1..stages stages: out[i] for i+1 stages.
std::vector<std::vector<float>> PrefixReconstructions(const Codebook& cb, int layer, int kind,
                                                      const std::vector<float>& x) {
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
  }
  return out;
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
  const int L = cfg.layers, dim = cfg.head_dim;
  std::vector<int64_t> seq_lens = calib.seq_lens;
  if (seq_lens.empty()) seq_lens.push_back(calib.tokens(0));
  // err[l][nk-1][nv-1]
  std::vector<std::vector<std::vector<double>>> err(L);
  int64_t step = 0;
  const int64_t total = int64_t{L} * cfg.k[0].stages;
  for (int l = 0; l < L; ++l) {
    const auto kr = PrefixReconstructions(full, l, 0, calib.k[l]);
    const auto vr = PrefixReconstructions(full, l, 1, calib.v[l]);
    err[l].assign(kr.size(), std::vector<double>(vr.size(), 0));
    for (size_t a = 0; a < kr.size(); ++a) {
      for (size_t b = 0; b < vr.size(); ++b) {
        AttentionAccumulator acc;
        int64_t off = 0;
        for (int64_t len : seq_lens) {
          AttentionInputs in;
          const int64_t kvo = off * calib.kv_heads * dim;
          in.q = calib.q[l].data() + off * calib.q_heads * dim;
          in.k = calib.k[l].data() + kvo;
          in.v = calib.v[l].data() + kvo;
          in.k_hat = kr[a].data() + kvo;
          in.v_hat = vr[b].data() + kvo;
          in.tokens = len;
          in.q_heads = calib.q_heads;
          in.kv_heads = calib.kv_heads;
          in.dim = dim;
          in.min_position = opts.sink_tokens + opts.recent_tokens;
          in.query_stride = opts.query_stride;
          if (opts.max_queries > 0) {
            in.query_stride =
                std::max<int64_t>(in.query_stride, (len - in.min_position) / opts.max_queries);
          }
          in.sink_tokens = opts.sink_tokens;
          in.recent_tokens = opts.recent_tokens;
          in.output_only = true;
          if (len > in.min_position) acc.Add(in);
          off += len;
        }
        err[l][a][b] = acc.Finish().output_rel_error;
      }
      ++step;
      if (opts.progress)
        opts.progress(step, total, absl::StrCat("split: layer ", l, " K stages ", a + 1));
    }
  }
  return SplitErrors{std::move(err)};
}

absl::StatusOr<BudgetChoice> ChooseSplit(const Codebook& full, const KvSamples& calib,
                                         const BudgetOptions& opts) {
  VQKV_ASSIGN_OR_RETURN(SplitErrors errors, MeasureSplitErrors(full, calib, opts));
  return ChooseSplitFromErrors(full.config(), errors, opts);
}

absl::StatusOr<BudgetChoice> ChooseSplitFromErrors(const RvqConfig& cfg, const SplitErrors& errors,
                                                   const BudgetOptions& opts) {
  const auto& err = errors.err;
  const int L = cfg.layers, dim = cfg.head_dim;
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
                      err[l][c.k[l].stages - 1][c.v[l].stages - 1], "\n");
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
