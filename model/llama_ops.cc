#include "model/llama_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/parallel.h"

namespace vqkv::model {
namespace {

// Eight independent accumulators let the compiler keep two SIMD registers busy without
// -ffast-math reassociation.
inline float Dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Work items per chunk such that each chunk holds at least ~64k multiply-adds, so that small
// decode steps do not pay for thread start-up.
int64_t MinChunk(int64_t cost_per_item) {
  constexpr int64_t kMinWork = 1 << 16;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, cost_per_item));
}

// y[kTileT rows (stride ldy), 4 cols] = x[kTileT rows, in] . w[4 rows, in]^T (+ b);
// in % 8 == 0. 3 x 4 accumulators plus 4 W vectors fill AVX2's 16 registers (x is read as a
// memory operand); measured faster than 2 x 4 and than 4 x 4 (which spills).
constexpr int kTileT = 3;
using V8 = float __attribute__((vector_size(32)));
inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline float Sum8(V8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
void Tile(const float* x, const float* w, int in, const float* b, float* y, int64_t ldy) {
  V8 acc[kTileT][4] = {};
  for (int i = 0; i < in; i += 8) {
    V8 wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = Load8(w + static_cast<int64_t>(c) * in + i);
    for (int r = 0; r < kTileT; ++r) {
      const V8 xv = Load8(x + static_cast<int64_t>(r) * in + i);
      for (int c = 0; c < 4; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < kTileT; ++r) {
    for (int c = 0; c < 4; ++c) y[r * ldy + c] = Sum8(acc[r][c]) + (b ? b[c] : 0.0f);
  }
}

}  // namespace

void LinearForward(const float* x, int n, const float* w, const float* b, int in, int out,
                   float* y) {
  // Threads split the output features so each streams its own slice of W once per token
  // block; token blocks keep the x rows hot in cache. Inside, kTileT tokens x 4 outputs are
  // computed together so that each loaded 8-float vector feeds several multiply-adds (a plain dot
  // product per output is load-bound and made a 2k-token prefill take about a minute).
  constexpr int kTokenBlock = 32;
  ParallelFor(out, MinChunk(static_cast<int64_t>(n) * in), [&](int64_t ob, int64_t oe) {
    for (int t0 = 0; t0 < n; t0 += kTokenBlock) {
      const int t1 = std::min(n, t0 + kTokenBlock);
      int64_t o = ob;
      if (in % 8 == 0) {
        for (; o + 4 <= oe; o += 4) {
          int t = t0;
          for (; t + kTileT <= t1; t += kTileT) {
            Tile(x + static_cast<int64_t>(t) * in, w + o * in, in, b ? b + o : nullptr,
                 y + static_cast<int64_t>(t) * out + o, out);
          }
          for (; t < t1; ++t) {
            for (int64_t k = o; k < o + 4; ++k) {
              y[static_cast<int64_t>(t) * out + k] =
                  Dot(x + static_cast<int64_t>(t) * in, w + k * in, in) + (b ? b[k] : 0.0f);
            }
          }
        }
      }
      for (; o < oe; ++o) {
        const float* wr = w + o * in;
        const float bias = b ? b[o] : 0.0f;
        for (int t = t0; t < t1; ++t) {
          y[static_cast<int64_t>(t) * out + o] =
              Dot(x + static_cast<int64_t>(t) * in, wr, in) + bias;
        }
      }
    }
  });
}

void RmsNorm(const float* x, int n, int dim, const float* w, float eps, float* y) {
  for (int t = 0; t < n; ++t) {
    const float* xr = x + static_cast<int64_t>(t) * dim;
    float* yr = y + static_cast<int64_t>(t) * dim;
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
    for (int i = 0; i < dim; ++i) yr[i] = xr[i] * r * w[i];
  }
}

void ApplyRope(float* x, int n, int heads, int head_dim, int pos0,
               const std::vector<double>& inv_freq) {
  const int half = head_dim / 2;
  std::vector<float> cs(half), sn(half);
  for (int t = 0; t < n; ++t) {
    const double pos = pos0 + t;
    for (int i = 0; i < half; ++i) {
      cs[i] = static_cast<float>(std::cos(pos * inv_freq[i]));
      sn[i] = static_cast<float>(std::sin(pos * inv_freq[i]));
    }
    for (int h = 0; h < heads; ++h) {
      float* v = x + (static_cast<int64_t>(t) * heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void CausalAttention(const AttentionArgs& a) {
  const int group = a.heads / a.kv_heads;
  const int hd = a.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t kv_stride = static_cast<int64_t>(a.kv_heads) * hd;
  const bool mixed = a.k_hat != nullptr;
  const int64_t items = static_cast<int64_t>(a.n) * a.heads;
  const int64_t cost = static_cast<int64_t>(a.pos0 + a.n) * hd;
  ParallelFor(items, MinChunk(cost), [&](int64_t begin, int64_t end) {
    std::vector<float> p(a.pos0 + a.n);
    std::vector<float> acc(hd);
    for (int64_t item = begin; item < end; ++item) {
      const int t = static_cast<int>(item / a.heads), h = static_cast<int>(item % a.heads);
      const int pos = a.pos0 + t;
      const int kvh = h / group;
      const float* qr = a.q + (static_cast<int64_t>(t) * a.heads + h) * hd;
      auto exact = [&](int s) { return !mixed || s < a.sink_tokens || s > pos - a.recent_tokens; };
      float mx = -INFINITY;
      for (int s = 0; s <= pos; ++s) {
        const float* kr = (exact(s) ? a.k : a.k_hat) + s * kv_stride + kvh * hd;
        p[s] = Dot(qr, kr, hd) * scale;
        mx = std::max(mx, p[s]);
      }
      float sum = 0;
      for (int s = 0; s <= pos; ++s) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int s = 0; s <= pos; ++s) {
        const float* vr = (exact(s) ? a.v : a.v_hat) + s * kv_stride + kvh * hd;
        const float w = p[s];
        for (int i = 0; i < hd; ++i) acc[i] += w * vr[i];
      }
      float* o = a.out + (static_cast<int64_t>(t) * a.heads + h) * hd;
      const float inv = 1.0f / sum;
      for (int i = 0; i < hd; ++i) o[i] = acc[i] * inv;
    }
  });
}

}  // namespace vqkv::model
