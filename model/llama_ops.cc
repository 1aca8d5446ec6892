#include "model/llama_ops.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common/parallel.h"
#include "common/simd.h"

namespace vqkv::model {
namespace {

using simd::Exp8;
using simd::ForRowGroups;
using simd::I8;
using simd::Load8;
using simd::Select;
using simd::Sum8;
using simd::V8;

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

namespace {

// p[0..len) = exp(p - max(p)); returns the sum. p has room for len rounded up to 8.
inline float SoftmaxNumerators(float* p, int64_t len) {
  const V8 neg_inf = V8{} - INFINITY;
  const int64_t full = len / 8 * 8;
  V8 mv = neg_inf;
  for (int64_t s = 0; s < full; s += 8) {
    const V8 v = Load8(p + s);
    mv = Select(v > mv, v, mv);
  }
  float mx = -INFINITY;
  for (int i = 0; i < 8; ++i) mx = std::max(mx, mv[i]);
  for (int64_t s = full; s < len; ++s) mx = std::max(mx, p[s]);
  V8 sum = V8{};
  for (int64_t s = 0; s < full; s += 8) {
    const V8 e = Exp8(Load8(p + s) - mx);
    std::memcpy(p + s, &e, sizeof(e));
    sum += e;
  }
  if (full < len) {
    V8 t = neg_inf;
    for (int64_t s = full; s < len; ++s) t[s - full] = p[s] - mx;
    const V8 e = Exp8(t);
    for (int64_t s = full; s < len; ++s) p[s] = e[s - full];
    sum += e;
  }
  return Sum8(sum);
}

// Attention scores of R query rows against 24 consecutive keys: sc[r][0..24) = q_r . kt[:, s..s+24)
// where kt is the head's keys transposed ([head_dim][ldk]). Broadcasting one query value
// against 3 vectors of 8 keys needs no horizontal sums; 4 x 3 accumulators + 3 loads + 1
// broadcast fit AVX2's 16 registers.
constexpr int kKeyTile = 24;
template <int R>
void ScoreTile(const float* const* q, const float* kt, int64_t ldk, int hd, float* const* sc) {
  V8 acc[R][3] = {};
  for (int i = 0; i < hd; ++i) {
    const float* kr = kt + i * ldk;
    const V8 k0 = Load8(kr), k1 = Load8(kr + 8), k2 = Load8(kr + 16);
    for (int r = 0; r < R; ++r) {
      const float qv = q[r][i];
      acc[r][0] += qv * k0;
      acc[r][1] += qv * k1;
      acc[r][2] += qv * k2;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < 3; ++c) std::memcpy(sc[r] + 8 * c, &acc[r][c], sizeof(V8));
  }
}

// Which keys row r reads exactly: s < lo[r] (sinks) or s >= hi[r] (recent window); the others
// come from the reconstruction. Plain attention: lo = 0, hi = past the end.
struct ExactRange {
  const int* lo;
  const int* hi;
  bool exact(int r, int64_t s) const { return s < lo[r] || s >= hi[r]; }
};

// out[r][d0..d0+8C) = sum over s < len of p[r][s] * v_r(s)[d0..d0+8C), where v_r(s) is the
// exact value row when row r reads s exactly and the reconstruction's otherwise (rows of stride
// hd). One running sum per output in key order, so a row that reads only exact keys gets
// exactly the plain path's result.
template <int R, int C>
void WeightedSumTile(const float* const* p, const float* vh, const float* ve, int hd, int d0,
                     int64_t len, const ExactRange& ex, float* const* out) {
  int64_t a = 0, b = len;  // [a, b): every row reads the reconstruction
  for (int r = 0; r < R; ++r) {
    a = std::max<int64_t>(a, ex.lo[r]);
    b = std::min<int64_t>(b, ex.hi[r]);
  }
  a = std::min(a, len);
  b = std::max(a, b);
  V8 acc[R][C] = {};
  auto mixed_step = [&](int64_t s) {
    V8 h[C], e[C];
    for (int c = 0; c < C; ++c) {
      h[c] = Load8(vh + s * hd + d0 + 8 * c);
      e[c] = Load8(ve + s * hd + d0 + 8 * c);
    }
    for (int r = 0; r < R; ++r) {
      const float w = p[r][s];
      const V8* src = ex.exact(r, s) ? e : h;
      for (int c = 0; c < C; ++c) acc[r][c] += w * src[c];
    }
  };
  for (int64_t s = 0; s < a; ++s) mixed_step(s);
  for (int64_t s = a; s < b; ++s) {
    V8 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = Load8(vh + s * hd + d0 + 8 * c);
    for (int r = 0; r < R; ++r) {
      const float w = p[r][s];
      for (int c = 0; c < C; ++c) acc[r][c] += w * vv[c];
    }
  }
  for (int64_t s = b; s < len; ++s) mixed_step(s);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) std::memcpy(out[r] + d0 + 8 * c, &acc[r][c], sizeof(V8));
  }
}

template <int R>
void WeightedSum(const float* const* p, const float* vh, const float* ve, int hd, int64_t len,
                 const ExactRange& ex, float* const* out) {
  int d = 0;
  for (; d + 16 <= hd; d += 16) WeightedSumTile<R, 2>(p, vh, ve, hd, d, len, ex, out);
  for (; d + 8 <= hd; d += 8) WeightedSumTile<R, 1>(p, vh, ve, hd, d, len, ex, out);
  for (; d < hd; ++d) {
    for (int r = 0; r < R; ++r) {
      float acc = 0;
      for (int64_t s = 0; s < len; ++s) acc += p[r][s] * (ex.exact(r, s) ? ve : vh)[s * hd + d];
      out[r][d] = acc;
    }
  }
}

}  // namespace

void CausalAttention(const AttentionArgs& a) {
  const int group = a.heads / a.kv_heads;
  const int hd = a.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t kv_stride = static_cast<int64_t>(a.kv_heads) * hd;
  const bool mixed = a.k_hat != nullptr;
  const int64_t total = static_cast<int64_t>(a.pos0) + a.n;
  const int64_t ldk = (total + kKeyTile - 1) / kKeyTile * kKeyTile;

  // Per KV head: keys transposed to [head_dim][ldk] (zero padded) and values made contiguous
  // [total][head_dim], for the exact cache and (when mixed) the reconstruction. Scores and
  // weighted sums then run as small register-tiled matrix products.
  const int copies = mixed ? 2 : 1;  // copy 0: exact, copy 1: reconstruction
  std::vector<float> kt(static_cast<size_t>(copies) * a.kv_heads * hd * ldk, 0.0f);
  std::vector<float> vc(static_cast<size_t>(copies) * a.kv_heads * total * hd);
  auto kt_of = [&](int copy, int64_t kvh) {
    return kt.data() + (static_cast<int64_t>(copy) * a.kv_heads + kvh) * hd * ldk;
  };
  auto vc_of = [&](int copy, int64_t kvh) {
    return vc.data() + (static_cast<int64_t>(copy) * a.kv_heads + kvh) * total * hd;
  };
  ParallelFor(int64_t{copies} * a.kv_heads, 1, [&](int64_t hb, int64_t he) {
    for (int64_t item = hb; item < he; ++item) {
      const int copy = static_cast<int>(item / a.kv_heads);
      const int64_t kvh = item % a.kv_heads;
      const float* ksrc = copy == 0 ? a.k : a.k_hat;
      const float* vsrc = copy == 0 ? a.v : a.v_hat;
      float* kth = kt_of(copy, kvh);
      float* vch = vc_of(copy, kvh);
      for (int64_t s = 0; s < total; ++s) {
        const float* kr = ksrc + s * kv_stride + kvh * hd;
        for (int i = 0; i < hd; ++i) kth[i * ldk + s] = kr[i];
        std::memcpy(vch + s * hd, vsrc + s * kv_stride + kvh * hd, sizeof(float) * hd);
      }
    }
  });

  // Work items: (KV head, block of kQ query positions) x the group's query heads as rows. Blocks
  // are visited small, large, small... so that contiguous chunks carry similar causal work.
  constexpr int kQ = 8;
  const int64_t blocks = (a.n + kQ - 1) / kQ;
  const int64_t items = blocks * a.kv_heads;
  ParallelFor(items, 1, [&](int64_t begin, int64_t end) {
    const int max_rows = kQ * group;
    std::vector<float> sc(static_cast<size_t>(max_rows) * ldk);
    std::vector<float> qs(static_cast<size_t>(max_rows) * hd);
    std::vector<float*> sc_rows(max_rows), out_rows(max_rows);
    std::vector<const float*> q_rows(max_rows);
    std::vector<int> row_pos(max_rows), lo(max_rows), hi(max_rows);
    std::vector<float> row_sum(max_rows);
    for (int64_t item = begin; item < end; ++item) {
      const int kvh = static_cast<int>(item % a.kv_heads);
      const int64_t j = item / a.kv_heads;
      const int64_t qb = (j % 2 == 0) ? j / 2 : blocks - 1 - j / 2;
      const int t0 = static_cast<int>(qb * kQ), t1 = std::min(a.n, t0 + kQ);
      const int rows = (t1 - t0) * group;
      for (int r = 0; r < rows; ++r) {
        const int t = t0 + r / group, h = kvh * group + r % group;
        const int pos = a.pos0 + t;
        row_pos[r] = pos;
        lo[r] = mixed ? std::min(a.sink_tokens, pos + 1) : 0;
        hi[r] = mixed ? std::max(lo[r], pos - a.recent_tokens + 1) : INT_MAX;
        const float* qr = a.q + (static_cast<int64_t>(t) * a.heads + h) * hd;
        for (int i = 0; i < hd; ++i) qs[static_cast<size_t>(r) * hd + i] = qr[i] * scale;
        q_rows[r] = qs.data() + static_cast<size_t>(r) * hd;
        sc_rows[r] = sc.data() + static_cast<size_t>(r) * ldk;
        out_rows[r] = a.out + (static_cast<int64_t>(t) * a.heads + h) * hd;
      }
      const float* kte = kt_of(0, kvh);
      const float* kth = kt_of(copies - 1, kvh);
      const float* vce = vc_of(0, kvh);
      const float* vch = vc_of(copies - 1, kvh);
      const int64_t keys = a.pos0 + t1;  // the block's last query reads keys [0, keys)
      ForRowGroups(0, rows, [&](int64_t r0, auto rn) {
        constexpr int R = decltype(rn)::value;
        const ExactRange ex{&lo[r0], &hi[r0]};
        int64_t all_hat_lo = 0, all_hat_hi = keys;  // keys every row reads reconstructed
        for (int r = 0; r < R; ++r) {
          all_hat_lo = std::max<int64_t>(all_hat_lo, lo[r0 + r]);
          all_hat_hi = std::min<int64_t>(all_hat_hi, hi[r0 + r]);
        }
        float tmp[R][kKeyTile];
        float* tmp_rows[R];
        for (int r = 0; r < R; ++r) tmp_rows[r] = tmp[r];
        for (int64_t s = 0; s < keys; s += kKeyTile) {
          float* dst[R];
          for (int r = 0; r < R; ++r) dst[r] = sc_rows[r0 + r] + s;
          const bool hat_only = s >= all_hat_lo && s + kKeyTile <= all_hat_hi;
          ScoreTile<R>(&q_rows[r0], (hat_only ? kth : kte) + s, ldk, hd, dst);
          if (!mixed || hat_only) continue;
          // The tile holds keys some rows read exactly (dst) and others reconstructed.
          ScoreTile<R>(&q_rows[r0], kth + s, ldk, hd, tmp_rows);
          for (int r = 0; r < R; ++r) {
            for (int c = 0; c < kKeyTile; ++c) {
              if (!ex.exact(r, s + c)) dst[r][c] = tmp[r][c];
            }
          }
        }
      });
      for (int r = 0; r < rows; ++r) {
        float* p = sc_rows[r];
        const int pos = row_pos[r];
        row_sum[r] = SoftmaxNumerators(p, pos + 1);
        std::fill(p + pos + 1, p + keys, 0.0f);
      }
      ForRowGroups(0, rows, [&](int64_t r0, auto rn) {
        constexpr int R = decltype(rn)::value;
        int64_t len = 0;
        for (int r = 0; r < R; ++r) len = std::max<int64_t>(len, row_pos[r0 + r] + 1);
        WeightedSum<R>(&sc_rows[r0], vch, vce, hd, len, ExactRange{&lo[r0], &hi[r0]},
                       &out_rows[r0]);
      });
      for (int r = 0; r < rows; ++r) {
        const float inv = 1.0f / row_sum[r];
        for (int i = 0; i < hd; ++i) out_rows[r][i] *= inv;
      }
    }
  });
}

}  // namespace vqkv::model
