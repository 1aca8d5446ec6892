#include "kernels/fidelity.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <numeric>
#include <vector>

#include "common/parallel.h"

namespace vqkv::kernels {

VectorError CompareVectors(const float* x, const float* x_hat, int64_t n, int dim) {
  VectorError e;
  double err = 0, ref = 0, cos = 0;
  for (int64_t i = 0; i < n; ++i) {
    double dot = 0, a = 0, b = 0;
    for (int d = 0; d < dim; ++d) {
      const double xv = x[i * dim + d], yv = x_hat[i * dim + d];
      err += (xv - yv) * (xv - yv);
      dot += xv * yv;
      a += xv * xv;
      b += yv * yv;
    }
    ref += a;
    cos += (a > 0 && b > 0) ? dot / std::sqrt(a * b) : (a == b ? 1.0 : 0.0);
  }
  e.rel_error = ref > 0 ? err / ref : 0;
  e.cosine = n > 0 ? cos / double(n) : 1;
  e.vectors = n;
  return e;
}

void AttentionAccumulator::Add(const AttentionInputs& in) {
  const int group = in.q_heads / in.kv_heads;
  const double scale = 1.0 / std::sqrt(double(in.dim));
  std::vector<int64_t> positions;
  for (int64_t t = in.tokens - 1; t >= in.min_position;
       t -= std::max<int64_t>(1, in.query_stride)) {
    positions.push_back(t);
  }
  std::mutex mu;
  ParallelFor(int64_t(positions.size()) * in.q_heads, 8, [&](int64_t b, int64_t e) {
    AttentionAccumulator local;
    std::vector<double> l(in.tokens), lh(in.tokens), p(in.tokens), ph(in.tokens);
    std::vector<int> order(in.tokens), order_h(in.tokens);
    for (int64_t w = b; w < e; ++w) {
      const int64_t t = positions[w / in.q_heads];
      const int h = static_cast<int>(w % in.q_heads);
      const int kvh = h / group;
      const float* q = in.q + (t * in.q_heads + h) * in.dim;
      const int64_t n = t + 1;
      double mx = -1e300, mxh = -1e300;
      for (int64_t s = 0; s < n; ++s) {
        const float* k = in.k + (s * in.kv_heads + kvh) * in.dim;
        const bool exact = s < in.sink_tokens || s > t - in.recent_tokens;
        const float* kh = (exact ? in.k : in.k_hat) + (s * in.kv_heads + kvh) * in.dim;
        double a = 0, c = 0;
        for (int d = 0; d < in.dim; ++d) {
          a += double(q[d]) * k[d];
          c += double(q[d]) * kh[d];
        }
        l[s] = a * scale;
        lh[s] = c * scale;
        local.logit_err2 += (l[s] - lh[s]) * (l[s] - lh[s]);
        local.logit_ref2 += l[s] * l[s];
        mx = std::max(mx, l[s]);
        mxh = std::max(mxh, lh[s]);
      }
      double z = 0, zh = 0;
      for (int64_t s = 0; s < n; ++s) {
        p[s] = std::exp(l[s] - mx);
        ph[s] = std::exp(lh[s] - mxh);
        z += p[s];
        zh += ph[s];
      }
      double kl = 0;
      for (int64_t s = 0; s < n; ++s) {
        p[s] /= z;
        ph[s] /= zh;
        if (!in.output_only && p[s] > 0)
          kl += p[s] * (std::log(p[s]) - std::log(std::max(ph[s], 1e-300)));
      }
      local.kl += std::max(0.0, kl);
      for (int d = 0; d < in.dim; ++d) {
        double o = 0, oh = 0;
        for (int64_t s = 0; s < n; ++s) {
          o += p[s] * in.v[(s * in.kv_heads + kvh) * in.dim + d];
          const bool exact = s < in.sink_tokens || s > t - in.recent_tokens;
          oh += ph[s] * (exact ? in.v : in.v_hat)[(s * in.kv_heads + kvh) * in.dim + d];
        }
        local.out_err2 += (o - oh) * (o - oh);
        local.out_ref2 += o * o;
      }
      ++local.queries;
      if (in.output_only) continue;
      const int k = static_cast<int>(std::min<int64_t>(in.topk, n));
      std::iota(order.begin(), order.begin() + n, 0);
      std::iota(order_h.begin(), order_h.begin() + n, 0);
      std::partial_sort(order.begin(), order.begin() + k, order.begin() + n,
                        [&](int a, int c) { return p[a] > p[c] || (p[a] == p[c] && a < c); });
      std::partial_sort(order_h.begin(), order_h.begin() + k, order_h.begin() + n,
                        [&](int a, int c) { return ph[a] > ph[c] || (ph[a] == ph[c] && a < c); });
      int common = 0;
      for (int i = 0; i < k; ++i) {
        for (int j = 0; j < k; ++j) common += order[i] == order_h[j];
      }
      local.topk += double(common) / k;
    }
    std::lock_guard<std::mutex> lock(mu);
    logit_err2 += local.logit_err2;
    logit_ref2 += local.logit_ref2;
    out_err2 += local.out_err2;
    out_ref2 += local.out_ref2;
    topk += local.topk;
    kl += local.kl;
    queries += local.queries;
  });
}

AttentionFidelity AttentionAccumulator::Finish() const {
  AttentionFidelity f;
  f.queries = queries;
  if (queries == 0) return f;
  f.logit_rel_error = logit_ref2 > 0 ? std::sqrt(logit_err2 / logit_ref2) : 0;
  f.output_rel_error = out_ref2 > 0 ? std::sqrt(out_err2 / out_ref2) : 0;
  f.topk_agreement = topk / double(queries);
  f.kl = kl / double(queries);
  return f;
}

}  // namespace vqkv::kernels
