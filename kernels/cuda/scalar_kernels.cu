// Scalar (KIVI-style) quantize / dequantize on the GPU, bit-compatible with the CPU codec: the
// same fp16 rounding of scale and zero, the same IEEE quotient and round-half-away-from-zero,
// so codes are identical and dequantized values equal.
//
// Quantize, fast paths (fp16/bf16, groups of 32; see the section "fast quantize paths"):
//  - K: one thread per (channel pair, group of 32 tokens), 32 rows of pairs in registers, the
//    group's scale/zero made once per channel; taken when every block's K runs start on a word
//    (tokens * bits % 32 == 0) and rows are 4-byte aligned.
//  - V: one thread per 32-channel group (four 16-byte loads), when head_dim % 32 == 0 and the
//    data is 16-byte aligned.
//  Both store whole code words; per element the work is the code step (one fma and one floor
//  for each of two floors, a funnel-shift pack) plus a share of the group's parameters.
// Quantize, other shapes: K one thread per (4 bytes of channels, group), rows up to 32 in
// registers (QuantizeKVec), or one thread per group (any group size, head dim and alignment);
// V one lane per 16 bytes with shuffles among a group's lanes, or one thread per group.
// Dequantize: K one thread per (16 bytes of channels, group), 16-byte row stores; V one lane per
// 16 bytes; other shapes one thread per group.
//
// Codes: `round(x - zero) / scale` half away from zero = floor(y + 1/2); y is taken as a product
// with 1/scale, floored twice (at y + 1/2 -/+ 1e-5, by adding 1.5 * 2^23 rounding down); the two
// floors differ only within 1e-5 of a rounding boundary (or for NaN), where the code is redone
// with the exact IEEE division (fast paths: only the undecided codes; others: the word). The
// generic paths write runs of codes a word at a time: words entirely inside a run are stored,
// words shared by two runs are merged with atomicAnd/atomicOr on the run's own bits, so the body
// needs no zeroing; the stream's zero padding is written by the last run.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/scalar_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 32;            // K rows kept in registers per pass
constexpr int kVUnroll = 4;           // V chunks per lane per iteration (loads in flight)
constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: adding it leaves an integer in the low bits
constexpr float kTieEps = 1e-5f;

__device__ __forceinline__ float ToF(float v) { return v; }
__device__ __forceinline__ float ToF(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T FromF(float v);
template <>
__device__ __forceinline__ float FromF<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromF<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// min/max that return NaN when either input is NaN (a NaN makes the group's params NaN: flagged).
__device__ __forceinline__ float MinNan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float MaxNan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
// Read-only global loads of 2, 4, 8 or 16 bytes.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> LoadVec(const T* p) {
  constexpr int kBytes = sizeof(T) * N;
  Vec<T, N> v;
  if constexpr (kBytes == 16) {
    *reinterpret_cast<uint4*>(&v) = __ldg(reinterpret_cast<const uint4*>(p));
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(&v) = __ldg(reinterpret_cast<const uint2*>(p));
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<unsigned*>(&v) = __ldg(reinterpret_cast<const unsigned*>(p));
  } else {
    *reinterpret_cast<unsigned short*>(&v) = __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  return v;
}
template <typename T, int N>
__device__ __forceinline__ void StoreVec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Per-element min/max of rows of N values; NaN propagates.
template <typename T>
struct Packed2 {};
template <>
struct Packed2<__half> {
  using type = __half2;
  static __device__ __forceinline__ type Splat(float v) { return __float2half2_rn(v); }
};
template <>
struct Packed2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type Splat(float v) { return __float2bfloat162_rn(v); }
};

template <typename T, int N, bool kPacked = (sizeof(T) == 2 && N % 2 == 0)>
struct MinMax {
  float lo[N], hi[N];
  __device__ __forceinline__ MinMax() {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      lo[j] = INFINITY;
      hi[j] = -INFINITY;
    }
  }
  __device__ __forceinline__ void Add(const Vec<T, N>& r) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      lo[j] = MinNan(lo[j], ToF(r.v[j]));
      hi[j] = MaxNan(hi[j], ToF(r.v[j]));
    }
  }
  __device__ __forceinline__ float Lo(int j) const { return lo[j]; }
  __device__ __forceinline__ float Hi(int j) const { return hi[j]; }
  __device__ __forceinline__ float2 All() const {
    float a = lo[0], b = hi[0];
#pragma unroll
    for (int j = 1; j < N; ++j) {
      a = MinNan(a, lo[j]);
      b = MaxNan(b, hi[j]);
    }
    return make_float2(a, b);
  }
};

template <typename T, int N>
struct MinMax<T, N, true> {
  using P = Packed2<T>;
  using H2 = typename P::type;
  H2 lo[N / 2], hi[N / 2];
  __device__ __forceinline__ MinMax() {
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      lo[j] = P::Splat(INFINITY);
      hi[j] = P::Splat(-INFINITY);
    }
  }
  __device__ __forceinline__ void Add(const Vec<T, N>& r) {
    const H2* h = reinterpret_cast<const H2*>(r.v);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      lo[j] = __hmin2_nan(lo[j], h[j]);
      hi[j] = __hmax2_nan(hi[j], h[j]);
    }
  }
  __device__ __forceinline__ float Lo(int j) const {
    return j % 2 == 0 ? __low2float(lo[j / 2]) : __high2float(lo[j / 2]);
  }
  __device__ __forceinline__ float Hi(int j) const {
    return j % 2 == 0 ? __low2float(hi[j / 2]) : __high2float(hi[j / 2]);
  }
  __device__ __forceinline__ float2 All() const {
    H2 a = lo[0], b = hi[0];
#pragma unroll
    for (int j = 1; j < N / 2; ++j) {
      a = __hmin2_nan(a, lo[j]);
      b = __hmax2_nan(b, hi[j]);
    }
    return make_float2(MinNan(__low2float(a), __high2float(a)),
                       MaxNan(__low2float(b), __high2float(b)));
  }
};

// The CPU's std::min/std::max scan, which keeps the first of equal values: it decides the sign of
// a zero minimum or maximum. Only called when the fast min or max is +-0.
template <typename T>
__device__ __noinline__ float2 CpuMinMax(const T* x, int64_t stride, int n) {
  float lo = ToF(x[0]), hi = lo;
  for (int k = 1; k < n; ++k) {
    const float v = ToF(x[k * stride]);
    lo = v < lo ? v : lo;
    hi = hi < v ? v : hi;
  }
  return make_float2(lo, hi);
}

struct QParams {
  float zero, scale, inv;
  uint32_t word;  // scale | zero << 16 (fp16 bits), the body's param pair
  bool ok;
};

// (hi - lo) / levels in float, rounded once, then to fp16: as the CPU. The float quotient is
// taken from a double product with 1/levels: a float divided by 3 or 15 is never within 2^-26
// (relative) of a float rounding boundary, and the double product is within 2^-52 of the
// quotient, so rounding it to float gives the IEEE float quotient. 1/scale needs no exact
// rounding: rcp.approx (1 ulp) keeps y within 5e-6 of the quotient for |y| <= 16, inside the
// 1e-5 tie window of QuickCode.
__device__ __forceinline__ QParams MakeParams(float lo, float hi, int levels) {
  QParams g;
  const float q = __double2float_rn(double(__fsub_rn(hi, lo)) * (1.0 / double(levels)));
  const __half s = __float2half_rn(q);
  const __half z = __float2half_rn(lo);
  g.word = uint32_t(__half_as_ushort(s)) | (uint32_t(__half_as_ushort(z)) << 16);
  g.scale = __half2float(s);
  g.zero = __half2float(z);
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(g.scale));  // scale >= 2^-24: no subnormals
  g.inv = g.scale > 0.f ? r : 0.f;
  g.ok = isfinite(g.scale) && isfinite(g.zero);
  return g;
}

// clamp(floor((x - zero) * inv + 1/2), 0, levels); `tie` becomes non-zero when the exact
// quotient could round the other way. (NaN inputs are caught by the NaN-propagating min/max.)
template <int BITS>
__device__ __forceinline__ uint32_t QuickCode(float x, float zero, float inv, uint32_t& tie) {
  const float a = __fsub_rn(x, zero);
  const float tl = __fadd_rd(__fmaf_rn(a, inv, 0.5f - kTieEps), kMagic);
  const float th = __fadd_rd(__fmaf_rn(a, inv, 0.5f + kTieEps), kMagic);
  tie |= __float_as_uint(tl) ^ __float_as_uint(th);
  const float c = fminf(fmaxf(tl, kMagic), kMagic + float((1 << BITS) - 1));
  return __float_as_uint(c) & ((1u << BITS) - 1u);
}

struct Exact {
  uint32_t word;
  bool bad;
};
// The CPU's codes for `count` values (lround of the IEEE quotient), packed LSB-first.
template <typename T, int BITS>
__device__ __noinline__ Exact ExactCodes(const T* x, int64_t stride, int count, float zero,
                                         float scale) {
  Exact e{0u, false};
  for (int k = 0; k < count; ++k) {
    const float v = ToF(x[k * stride]);
    e.bad = e.bad || !isfinite(v);
    int q = scale > 0.f ? static_cast<int>(lroundf(__fdiv_rn(__fsub_rn(v, zero), scale))) : 0;
    q = q < 0 ? 0 : (q > (1 << BITS) - 1 ? (1 << BITS) - 1 : q);
    e.word |= uint32_t(q) << (k * BITS);
  }
  return e;
}

__device__ __forceinline__ float Dequant(uint32_t q, float scale, float zero) {
  const float qf = __fsub_rn(__uint_as_float(0x4B000000u | q), 8388608.f);  // exact
  return __fadd_rn(zero, __fmul_rn(scale, qf));
}
__device__ __forceinline__ float ParamScale(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float ParamZero(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// Writes `nbits` bits (LSB-first in cw) at bit `pos` of `words`. When the run ends at
// `region_end`, it also clears the padding up to the next multiple of `pad` bits.
template <int NW>
__device__ __forceinline__ void WriteRun(uint32_t* words, int64_t pos, const uint32_t (&cw)[NW],
                                         int nbits, int64_t region_end, int pad) {
  int64_t end = pos + nbits;
  if (end == region_end) end = (end + pad - 1) / pad * pad;
  const int off = static_cast<int>(pos & 31);
  const int64_t w0 = pos >> 5;
#pragma unroll
  for (int j = 0; j <= NW; ++j) {
    const int64_t wb = (w0 + j) << 5;
    if (wb < end) {
      const uint32_t val = __funnelshift_l(j > 0 ? cw[j - 1] : 0u, j < NW ? cw[j] : 0u, off);
      const int lo = j == 0 ? off : 0;
      const int hi = end - wb >= 32 ? 32 : static_cast<int>(end - wb);
      if (lo == 0 && hi == 32) {
        words[w0 + j] = val;
      } else {
        const uint32_t mask = (hi == 32 ? ~0u : (1u << hi) - 1u) & (~0u << lo);
        atomicAnd(words + w0 + j, ~mask);
        atomicOr(words + w0 + j, val & mask);
      }
    }
  }
}

// Reads `nbits` (> 0) bits at bit `pos` into cw, LSB-first (bits past nbits are unspecified).
template <int NW>
__device__ __forceinline__ void ReadRun(const uint32_t* words, int64_t pos, int nbits,
                                        uint32_t (&cw)[NW]) {
  const int off = static_cast<int>(pos & 31);
  const int64_t w0 = pos >> 5, wl = (pos + nbits - 1) >> 5;
  uint32_t r[NW + 1];
#pragma unroll
  for (int j = 0; j <= NW; ++j) r[j] = w0 + j <= wl ? __ldg(words + w0 + j) : 0u;
#pragma unroll
  for (int j = 0; j < NW; ++j) cw[j] = __funnelshift_r(r[j], r[j + 1], off);
}

template <int BITS>
__device__ __forceinline__ uint32_t CodeAt(const uint32_t (&cw)[BITS], int k) {
  constexpr int kCpw = 32 / BITS;
  return (cw[k / kCpw] >> ((k % kCpw) * BITS)) & ((1u << BITS) - 1u);
}

// One group of n values x[k * stride] (any n, stride, alignment): params, then codes 32 at a
// time. Returns true when the group cannot be encoded (non-finite values or params).
template <typename T, int BITS>
__device__ __forceinline__ bool QuantRun(const T* x, int64_t stride, int n, uint32_t* body,
                                         int64_t param_word, int64_t bitpos, int64_t region_end,
                                         int pad) {
  constexpr int kCpw = 32 / BITS;
  float lo = INFINITY, hi = -INFINITY;
  for (int k = 0; k < n; ++k) {
    const float v = ToF(x[k * stride]);
    lo = MinNan(lo, v);
    hi = MaxNan(hi, v);
  }
  if (lo == 0.f || hi == 0.f) {
    const float2 r = CpuMinMax(x, stride, n);
    lo = r.x;
    hi = r.y;
  }
  const QParams g = MakeParams(lo, hi, (1 << BITS) - 1);
  body[param_word] = g.word;
  bool bad = !g.ok;
  for (int k0 = 0; k0 < n; k0 += kChunk) {
    const int m = min(kChunk, n - k0);
    uint32_t cw[BITS];
#pragma unroll
    for (int w = 0; w < BITS; ++w) {
      uint32_t word = 0, tie = 0;
#pragma unroll
      for (int j = 0; j < kCpw; ++j) {
        const int k = w * kCpw + j;
        if (k < m) {
          word += QuickCode<BITS>(ToF(x[(k0 + k) * stride]), g.zero, g.inv, tie) << (j * BITS);
        }
      }
      if (tie != 0) {
        const Exact e = ExactCodes<T, BITS>(x + (k0 + w * kCpw) * stride, stride,
                                            min(kCpw, m - w * kCpw), g.zero, g.scale);
        word = e.word;
        bad = bad || e.bad;
      }
      cw[w] = word;
    }
    WriteRun<BITS>(body, bitpos + int64_t(k0) * BITS, cw, m * BITS, region_end, pad);
  }
  return bad;
}

template <typename T, int BITS>
__device__ __forceinline__ void DequantRun(T* y, int64_t stride, int n, const uint32_t* body,
                                           int64_t param_word, int64_t bitpos) {
  const uint32_t pw = __ldg(body + param_word);
  const float s = ParamScale(pw), z = ParamZero(pw);
  for (int k0 = 0; k0 < n; k0 += kChunk) {
    const int m = min(kChunk, n - k0);
    uint32_t cw[BITS];
    ReadRun<BITS>(body, bitpos + int64_t(k0) * BITS, m * BITS, cw);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (k < m) y[(k0 + k) * stride] = FromF<T>(Dequant(CodeAt<BITS>(cw, k), s, z));
    }
  }
}

// Per-block geometry shared by the kernels (grid: x work, y block, z layer).
struct Geo {
  int t1, HD, nkg, gv, nvg;
  ScalarBodyLayout lay;
  int64_t k_bit0, k_end, v_bit0, v_end;  // bit offsets of the code regions
};
template <int BITS>
__device__ __forceinline__ Geo MakeGeo(const ScalarParams& p, const ScalarBlock& blk) {
  Geo g;
  g.t1 = blk.tokens - blk.sinks;
  g.HD = p.heads * p.dim;
  g.nkg = (g.t1 + p.group - 1) / p.group;
  g.gv = p.group < p.dim ? p.group : p.dim;
  g.nvg = (p.dim + g.gv - 1) / g.gv;
  g.lay = ComputeScalarBodyLayout(p.layers, g.t1, p.heads, p.dim, BITS, p.group);
  const int64_t n = int64_t(p.layers) * g.t1 * g.HD * BITS;
  g.k_bit0 = g.lay.k_codes * 8;
  g.k_end = g.k_bit0 + n;
  g.v_bit0 = g.lay.v_codes * 8;
  g.v_end = g.v_bit0 + n;
  return g;
}

// ---- K quantize ------------------------------------------------------------------------------

// One (VEC channels, group) item of the K vector kernel. kFull: the group has exactly kChunk
// rows (no per-row predicates).
template <typename T, int BITS, int VEC, bool kFull>
__device__ __forceinline__ bool QuantizeKItem(const T* x0, int HD, int n, uint32_t* body,
                                              int64_t param0, int nkg, int64_t bit0, int t1,
                                              int64_t k_end) {
  constexpr int kCpw = 32 / BITS;
  bool bad = false;
  Vec<T, VEC> raw[kChunk];
  MinMax<T, VEC> mm;
  if (!kFull && n > kChunk) {
    for (int k = 0; k < n; ++k) mm.Add(LoadVec<T, VEC>(x0 + int64_t(k) * HD));
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (kFull || k < n) raw[k] = LoadVec<T, VEC>(x0 + int64_t(k) * HD);
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (kFull || k < n) mm.Add(raw[k]);
    }
  }
  float zero[VEC], scale[VEC], inv[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    float lo = mm.Lo(v), hi = mm.Hi(v);
    if (lo == 0.f || hi == 0.f) {
      const float2 r = CpuMinMax(x0 + v, HD, n);
      lo = r.x;
      hi = r.y;
    }
    const QParams g = MakeParams(lo, hi, (1 << BITS) - 1);
    bad = bad || !g.ok;
    body[param0 + int64_t(v) * nkg] = g.word;
    zero[v] = g.zero;
    scale[v] = g.scale;
    inv[v] = g.inv;
  }
  for (int k0 = 0; k0 < n; k0 += kChunk) {
    const int m = kFull ? kChunk : min(kChunk, n - k0);
    if (!kFull && n > kChunk) {
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if (k < m) raw[k] = LoadVec<T, VEC>(x0 + int64_t(k0 + k) * HD);
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      uint32_t cw[BITS];
#pragma unroll
      for (int w = 0; w < BITS; ++w) {
        uint32_t word = 0, tie = 0;
#pragma unroll
        for (int j = 0; j < kCpw; ++j) {
          const int k = w * kCpw + j;
          if (kFull || k < m) {
            word += QuickCode<BITS>(ToF(raw[k].v[v]), zero[v], inv[v], tie) << (j * BITS);
          }
        }
        if (tie != 0) {
          const Exact e = ExactCodes<T, BITS>(x0 + v + int64_t(k0 + w * kCpw) * HD, HD,
                                              min(kCpw, m - w * kCpw), zero[v], scale[v]);
          word = e.word;
          bad = bad || e.bad;
        }
        cw[w] = word;
      }
      WriteRun<BITS>(body, bit0 + (int64_t(v) * t1 + k0) * BITS, cw, m * BITS, k_end, 8);
    }
  }
  return bad;
}

// One thread per (VEC channels, group of G tokens); VEC * sizeof(T) == 4, rows 4-byte aligned.
template <typename T, int BITS, int VEC>
__global__ void __launch_bounds__(kThreads, 2) QuantizeKVec(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  if (blk.tokens - blk.sinks <= 0) return;
  const Geo geo = MakeGeo<BITS>(p, blk);
  const int l = blockIdx.z, HD = geo.HD, t1 = geo.t1, G = p.group, nkg = geo.nkg;
  const int nq = HD / VEC;
  const int64_t items = int64_t(nkg) * nq;
  const T* in = static_cast<const T*>(blk.in) + (int64_t(l) * 2 * blk.tokens + blk.sinks) * HD;
  bool bad = false;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items;
       i += int64_t(gridDim.x) * kThreads) {
    const int kg = static_cast<int>(i / nq), q = static_cast<int>(i - int64_t(kg) * nq);
    const int c = q * VEC, t0 = kg * G, n = min(G, t1 - t0);
    const T* x0 = in + int64_t(t0) * HD + c;
    const int64_t col = int64_t(l) * HD + c;
    const int64_t bit0 = geo.k_bit0 + (col * t1 + t0) * BITS;
    if (n == kChunk) {
      bad = QuantizeKItem<T, BITS, VEC, true>(x0, HD, n, blk.body, col * nkg + kg, nkg, bit0, t1,
                                              geo.k_end) ||
            bad;
    } else {
      bad = QuantizeKItem<T, BITS, VEC, false>(x0, HD, n, blk.body, col * nkg + kg, nkg, bit0, t1,
                                               geo.k_end) ||
            bad;
    }
  }
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
}

// One thread per (channel, group): any head dim and alignment.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) QuantizeKGeneric(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  if (blk.tokens - blk.sinks <= 0) return;
  const Geo geo = MakeGeo<BITS>(p, blk);
  const int l = blockIdx.z, HD = geo.HD, t1 = geo.t1, G = p.group, nkg = geo.nkg;
  const int64_t items = int64_t(nkg) * HD;
  const T* in = static_cast<const T*>(blk.in) + (int64_t(l) * 2 * blk.tokens + blk.sinks) * HD;
  bool bad = false;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items;
       i += int64_t(gridDim.x) * kThreads) {
    const int kg = static_cast<int>(i / HD), c = static_cast<int>(i - int64_t(kg) * HD);
    const int t0 = kg * G;
    const int64_t col = int64_t(l) * HD + c;
    bad = QuantRun<T, BITS>(in + int64_t(t0) * HD + c, HD, min(G, t1 - t0), blk.body,
                            col * nkg + kg, geo.k_bit0 + (col * t1 + t0) * BITS, geo.k_end, 8) ||
          bad;
  }
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
}

// ---- V quantize ------------------------------------------------------------------------------

// The lane-per-16-bytes V path applies: groups are whole, a power-of-two number of lanes, and
// every layer's codes start on a word.
template <typename T, int BITS>
__device__ __forceinline__ bool VFast(const ScalarParams& p, const Geo& geo) {
  constexpr int VEC = 16 / sizeof(T);
  const int lpg = geo.gv / VEC;
  return p.align >= 16 && p.dim % geo.gv == 0 && geo.gv % VEC == 0 && lpg <= 32 &&
         (lpg & (lpg - 1)) == 0 && geo.lay.v_codes % 4 == 0 &&
         (int64_t(geo.t1) * geo.HD * BITS) % 32 == 0;
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads, 3) QuantizeV(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  if (blk.tokens - blk.sinks <= 0) return;
  const Geo geo = MakeGeo<BITS>(p, blk);
  const int l = blockIdx.z, HD = geo.HD, t1 = geo.t1;
  const T* in =
      static_cast<const T*>(blk.in) + ((int64_t(l) * 2 + 1) * blk.tokens + blk.sinks) * HD;
  uint32_t* params = blk.body + geo.lay.v_params / 4;
  bool bad = false;
  if (VFast<T, BITS>(p, geo)) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int kLaneBits = VEC * BITS;  // 8, 16 or 32
    constexpr int kLpw = 32 / kLaneBits;   // lanes per code word
    const int lpg = geo.gv / VEC, lpg_shift = __ffs(lpg) - 1;
    const int64_t cpl = int64_t(t1) * HD / VEC;  // 16-byte chunks in this layer
    const int64_t c0 = int64_t(l) * cpl;         // chunk index of the layer's first chunk
    uint32_t* codes = blk.body + geo.lay.v_codes / 4;
    const int lane = threadIdx.x & 31;
    const int64_t step = int64_t(gridDim.x) * kThreads * kVUnroll;
    for (int64_t base = (int64_t(blockIdx.x) * kThreads + (threadIdx.x & ~31)) * kVUnroll;
         base < cpl; base += step) {
      Vec<T, VEC> r[kVUnroll];
#pragma unroll
      for (int u = 0; u < kVUnroll; ++u) {
        const int64_t j = base + u * 32 + lane;
        if (j < cpl) {
          r[u] = LoadVec<T, VEC>(in + j * VEC);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) r[u].v[k] = FromF<T>(1.f);
        }
      }
#pragma unroll
      for (int u = 0; u < kVUnroll; ++u) {
        const int64_t j = base + u * 32 + lane;
        const bool valid = j < cpl;  // whole groups and words are valid or not
        MinMax<T, VEC> mm;
        mm.Add(r[u]);
        float2 lh = mm.All();
        for (int o = 1; o < lpg; o <<= 1) {
          lh.x = MinNan(lh.x, __shfl_xor_sync(~0u, lh.x, o));
          lh.y = MaxNan(lh.y, __shfl_xor_sync(~0u, lh.y, o));
        }
        const int64_t first = j - (lane & (lpg - 1));  // the group's first chunk
        if (valid && (lh.x == 0.f || lh.y == 0.f)) lh = CpuMinMax(in + first * VEC, 1, geo.gv);
        const QParams g = MakeParams(lh.x, lh.y, (1 << BITS) - 1);
        uint32_t code = 0, tie = 0;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          code += QuickCode<BITS>(ToF(r[u].v[k]), g.zero, g.inv, tie) << (k * BITS);
        }
        if (valid) {
          bad = bad || !g.ok;
          if (tie != 0) {
            const Exact e = ExactCodes<T, BITS>(in + j * VEC, 1, VEC, g.zero, g.scale);
            code = e.word;
            bad = bad || e.bad;
          }
          if ((lane & (lpg - 1)) == 0) params[(c0 + j) >> lpg_shift] = g.word;
        }
        uint32_t word = code << ((lane % kLpw) * kLaneBits);
#pragma unroll
        for (int o = 1; o < kLpw; o <<= 1) word |= __shfl_xor_sync(~0u, word, o);
        if (valid && lane % kLpw == 0) codes[(c0 + j) / kLpw] = word;
      }
    }
  } else {
    const int D = p.dim, gv = geo.gv, nvg = geo.nvg;
    const int64_t items = int64_t(t1) * p.heads * nvg;
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items;
         i += int64_t(gridDim.x) * kThreads) {
      const int vg = static_cast<int>(i % nvg);
      const int64_t row = i / nvg;  // t * H + h
      const int d0 = vg * gv;
      const int64_t e0 = row * D + d0;  // element within the layer's [t1, H, D]
      bad = QuantRun<T, BITS>(in + e0, 1, min(gv, D - d0), blk.body,
                              geo.lay.v_params / 4 + int64_t(l) * t1 * p.heads * nvg + i,
                              geo.v_bit0 + (int64_t(l) * t1 * HD + e0) * BITS, geo.v_end, 32) ||
            bad;
    }
  }
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
}

// ---- fast quantize paths: 2-byte elements, groups of 32 -------------------------------------
//
// Per element the work is the bit-exact code step and little else: a group's scale and zero are
// made once (one thread owns whole groups: K one channel pair of 32 tokens, V one 32-channel run
// of a token), index math is 32-bit per thread, and codes are floors without clamping, packed
// with one funnel shift each:
//   code = floor(y + 1/2 -/+ kTieEps) with y = (x - zero) * inv, the two floors differing only
//   near a rounding boundary (those codes alone are redone by FixCodes).
// Clamping is dropped by checking the group's extremes: the floors are monotone in x, so when the
// minimum's low floor and the maximum's high floor lie in [0, levels], every code does ("safe";
// other groups are redone whole by FixCodes, which clamps). When |zero * inv| <= kFoldLimit for
// every lane of a warp, the subtraction folds into the fma's addend, x * inv + (c - zero * inv).
// Error budget of y against the CPU's fl(fl(x - zero) / scale), |y| <= 15.5 in a safe group:
// rcp.approx and the CPU's two roundings 15.5 * 3 * 2^-24 (2.8e-6), the fma's rounding 2^-20
// (1e-6), and with the fold the addend's rounding 32.5 * 2^-24 (1.9e-6) plus the CPU's rounding
// of x - zero that the fold skips (1e-6 more): 6.7e-6 < kTieEps, so the tie test covers it.

constexpr float kFoldLimit = 32.f;
constexpr int kFastThreads = 128;  // small CTAs: a CTA's slot frees as soon as its 4 warps end
constexpr float kLowAdd = 0.5f - kTieEps;
constexpr float kHighAdd = 0.5f + kTieEps;
constexpr uint32_t kMagicBits = 0x4B400000u;  // bits of kMagic

template <typename T>
__device__ __forceinline__ typename Packed2<T>::type AsPair(uint32_t u) {
  typename Packed2<T>::type h;
  static_assert(sizeof(h) == 4, "pair of 2-byte elements");
  memcpy(&h, &u, 4);
  return h;
}
__device__ __forceinline__ float Lane(__half2 h, int v) {
  return v ? __high2float(h) : __low2float(h);
}
__device__ __forceinline__ float Lane(__nv_bfloat162 h, int v) {
  return v ? __high2float(h) : __low2float(h);
}

// Bits of kMagic + floor(y + add); kFold: x * inv already holds -zero * inv in `add`.
template <bool kFold>
__device__ __forceinline__ uint32_t Floor(float x, float zero, float inv, float add) {
  const float a = kFold ? x : __fsub_rn(x, zero);
  return __float_as_uint(__fadd_rd(__fmaf_rn(a, inv, add), kMagic));
}

struct Coder {
  QParams g;
  float cl = kLowAdd, ch = kHighAdd;  // addends of the low and high floor
  bool fold_ok = false;               // |zero * inv| <= kFoldLimit
  bool safe = false;                  // every code in [0, levels] without clamping
};

template <int BITS>
__device__ __forceinline__ Coder MakeCoder(float lo, float hi) {
  Coder c;
  c.g = MakeParams(lo, hi, (1 << BITS) - 1);
  c.fold_ok = fabsf(c.g.zero * c.g.inv) <= kFoldLimit;  // false for NaN
  return c;
}

// Sets the addends for the warp's choice and checks the group's extremes.
template <int BITS>
__device__ __forceinline__ void Arm(Coder& c, bool fold, float lo, float hi) {
  constexpr uint32_t kLevels = (1u << BITS) - 1u;
  uint32_t a, b;
  if (fold) {
    c.cl = __fmaf_rn(-c.g.zero, c.g.inv, kLowAdd);
    c.ch = __fmaf_rn(-c.g.zero, c.g.inv, kHighAdd);
    a = Floor<true>(lo, c.g.zero, c.g.inv, c.cl);
    b = Floor<true>(hi, c.g.zero, c.g.inv, c.ch);
  } else {
    a = Floor<false>(lo, c.g.zero, c.g.inv, c.cl);
    b = Floor<false>(hi, c.g.zero, c.g.inv, c.ch);
  }
  c.safe = a - kMagicBits <= kLevels && b - kMagicBits <= kLevels;
}

// Redoes the fields of `word` where `diff` is non-zero (the two floors disagreed, or every field
// for a group that needs clamping) with the CPU's arithmetic; x: the word's values at `stride`.
// Exact ties are not rare in fp16 data (x - zero a multiple of scale / 2), so only the undecided
// codes pay for a division.
template <typename T, int BITS>
__device__ __noinline__ Exact FixCodes(uint32_t word, uint32_t diff, const T* x, int64_t stride,
                                       int count, float zero, float scale) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  Exact e{word, false};
  while (diff != 0) {
    const int j = (__ffs(diff) - 1) / BITS;
    diff &= ~(kMask << (j * BITS));
    if (j >= count) break;
    const float v = ToF(x[j * stride]);
    e.bad = e.bad || !isfinite(v);
    int q = scale > 0.f ? static_cast<int>(lroundf(__fdiv_rn(__fsub_rn(v, zero), scale))) : 0;
    q = q < 0 ? 0 : (q > int(kMask) ? int(kMask) : q);
    e.word = (e.word & ~(kMask << (j * BITS))) | (uint32_t(q) << (j * BITS));
  }
  return e;
}

// One code word: the 32 / BITS values get(0..), LSB-first. Fields of `tie` are non-zero where
// the code may be off.
template <int BITS, bool kFold, typename Get>
__device__ __forceinline__ uint32_t CodeWord(const Get& get, const Coder& c, uint32_t& tie) {
  uint32_t wl = 0, wh = 0;
#pragma unroll
  for (int j = 0; j < 32 / BITS; ++j) {
    const float x = get(j);
    wl = __funnelshift_r(wl, Floor<kFold>(x, c.g.zero, c.g.inv, c.cl), BITS);
    wh = __funnelshift_r(wh, Floor<kFold>(x, c.g.zero, c.g.inv, c.ch), BITS);
  }
  tie = wl ^ wh;
  return wl;
}

// Codes of a 32-value group into w; diff: fields to redo (FixCodes), all of them when the group
// is not safe. Returns whether any word needs it.
template <int BITS, bool kFold, typename Get>
__device__ __forceinline__ bool CodeGroup(const Get& get, const Coder& c, uint32_t (&w)[BITS],
                                          uint32_t (&diff)[BITS]) {
  constexpr int kCpw = 32 / BITS;
  uint32_t any = 0;
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    w[i] = CodeWord<BITS, kFold>([&](int j) { return get(i * kCpw + j); }, c, diff[i]);
    diff[i] = c.safe ? diff[i] : ~0u;
    any |= diff[i];
  }
  return any != 0;
}

// CodeGroup for both channels of 32 rows of pairs, word by word (rows die as they are coded).
template <int BITS, bool kFold, typename H2>
__device__ __forceinline__ bool CodePairs(const H2 (&r)[32], const Coder (&c)[2],
                                          uint32_t (&w)[2][BITS], uint32_t (&diff)[2][BITS]) {
  constexpr int kCpw = 32 / BITS;
  uint32_t any = 0;
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      w[v][i] =
          CodeWord<BITS, kFold>([&](int j) { return Lane(r[i * kCpw + j], v); }, c[v], diff[v][i]);
      diff[v][i] = c[v].safe ? diff[v][i] : ~0u;
      any |= diff[v][i];
    }
  }
  return any != 0;
}

// Stores the first `nw` of N words (vector stores when whole and aligned).
template <int N>
__device__ __forceinline__ void StoreWords(uint32_t* dst, const uint32_t (&w)[N], int nw) {
  const auto a = reinterpret_cast<uintptr_t>(dst);
  if constexpr (N % 4 == 0) {
    if (nw == N && a % 16 == 0) {
#pragma unroll
      for (int k = 0; k < N; k += 4) {
        *reinterpret_cast<uint4*>(dst + k) = make_uint4(w[k], w[k + 1], w[k + 2], w[k + 3]);
      }
      return;
    }
  }
  if constexpr (N % 2 == 0) {
    if (nw == N && a % 8 == 0) {
#pragma unroll
      for (int k = 0; k < N; k += 2)
        *reinterpret_cast<uint2*>(dst + k) = make_uint2(w[k], w[k + 1]);
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < nw) dst[k] = w[k];
  }
}

// K: one thread per (channel pair, group of 32 tokens), rows read as 4-byte pairs. Lanes take
// 16 consecutive pairs (64 bytes of a row) times 2 groups, so each row load is two full
// 64-byte runs and the codes and params a warp writes are contiguous when a block has 2 groups.
// Every block's code runs start on a word (tokens * bits % 32 == 0): words are stored whole.
// in: [layers, 2, tokens, heads * dim] of T; grid (ceil(groups * pairs' / 256), blocks, layers).
// kNq: pairs per row when known at compile time (rows then load at immediate offsets), else 0.
template <typename T, int BITS, int kNq>
__global__ void __launch_bounds__(kFastThreads, 6) QuantizeK32(const ScalarParams p) {
  constexpr int kG = 32, kCpw = 32 / BITS;
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int nq = kNq > 0 ? kNq : p.heads * p.dim / 2, HD = 2 * nq, nkg = (t1 + kG - 1) / kG;
  const unsigned i = blockIdx.x * kFastThreads + threadIdx.x, rest = i >> 4, qhi = rest / nkg;
  const int kg = static_cast<int>(rest - qhi * nkg), q_raw = static_cast<int>(qhi * 16 + (i & 15));
  const bool valid = q_raw < nq;
  if (!__any_sync(~0u, valid)) return;
  // Lanes past the end work on the last pair (the warp votes together) and store nothing.
  const int q = min(q_raw, nq - 1), c = 2 * q, t0 = kg * kG, n = min(kG, t1 - t0);
  const T* x0 = static_cast<const T*>(blk.in) +
                (int64_t(blockIdx.z) * 2 * blk.tokens + blk.sinks + t0) * HD + c;
  const uint32_t* xr = reinterpret_cast<const uint32_t*>(x0);
  typename Packed2<T>::type r[kG];
  if (n == kG) {
#pragma unroll
    for (int k = 0; k < kG; ++k) r[k] = AsPair<T>(__ldg(xr + k * nq));
  } else {
#pragma unroll
    for (int k = 0; k < kG; ++k) r[k] = AsPair<T>(__ldg(xr + min(k, n - 1) * nq));
  }
  auto lo2 = r[0], hi2 = r[0];
#pragma unroll
  for (int k = 1; k < kG; ++k) {
    lo2 = __hmin2_nan(lo2, r[k]);
    hi2 = __hmax2_nan(hi2, r[k]);
  }
  float lo[2], hi[2];
  Coder cd[2];
  bool bad = false;
#pragma unroll
  for (int v = 0; v < 2; ++v) {
    lo[v] = Lane(lo2, v);
    hi[v] = Lane(hi2, v);
    if (lo[v] == 0.f || hi[v] == 0.f) {
      const float2 m = CpuMinMax(x0 + v, HD, n);
      lo[v] = m.x;
      hi[v] = m.y;
    }
    cd[v] = MakeCoder<BITS>(lo[v], hi[v]);
    bad = bad || !cd[v].g.ok;
  }
  const bool fold = __all_sync(~0u, cd[0].fold_ok && cd[1].fold_ok);
  Arm<BITS>(cd[0], fold, lo[0], hi[0]);
  Arm<BITS>(cd[1], fold, lo[1], hi[1]);
  uint32_t w[2][BITS], diff[2][BITS];
  const bool redo =
      fold ? CodePairs<BITS, true>(r, cd, w, diff) : CodePairs<BITS, false>(r, cd, w, diff);
  const int nw = n / kCpw;  // whole words: n * BITS is a multiple of 32
  if (valid) {
    const int64_t col = int64_t(blockIdx.z) * HD + c;
    const int run = t1 / kCpw;  // words per channel
    if (redo) {
#pragma unroll
      for (int v = 0; v < 2; ++v) {
#pragma unroll
        for (int k = 0; k < BITS; ++k) {
          if (k < nw && diff[v][k] != 0) {
            const Exact e = FixCodes<T, BITS>(w[v][k], diff[v][k], x0 + v + int64_t(k * kCpw) * HD,
                                              HD, kCpw, cd[v].g.zero, cd[v].g.scale);
            w[v][k] = e.word;
            bad = bad || e.bad;
          }
        }
      }
    }
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      blk.body[(col + v) * nkg + kg] = cd[v].g.word;
      StoreWords<BITS>(blk.body + blk.k_codes_w + (col + v) * run + kg * BITS, w[v], nw);
    }
  }
  if (bad && valid && p.error_flag != nullptr) *p.error_flag = 1;
}

// V: one thread per 32-channel group (64 bytes: four 16-byte loads), kVPer groups per thread,
// lanes on consecutive groups. Groups tile each row (dim % 32 == 0), so a layer's groups, params
// and code words are in one order.
constexpr int kVPer = 2;
template <typename T, int BITS>
__global__ void __launch_bounds__(kFastThreads, 8) QuantizeV32(const ScalarParams p) {
  constexpr int kG = 32;
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int HD = p.heads * p.dim, gpl = t1 * (HD / kG);  // groups per layer
  const int g0 = (blockIdx.x * kFastThreads + (threadIdx.x & ~31)) * kVPer + (threadIdx.x & 31);
  if (!__any_sync(~0u, g0 < gpl)) return;
  const T* in =
      static_cast<const T*>(blk.in) + ((int64_t(blockIdx.z) * 2 + 1) * blk.tokens + blk.sinks) * HD;
  const uint4* src = reinterpret_cast<const uint4*>(in);
  uint4 raw[kVPer][4];
#pragma unroll
  for (int u = 0; u < kVPer; ++u) {
    const int g = min(g0 + 32 * u, gpl - 1);
#pragma unroll
    for (int k = 0; k < 4; ++k) raw[u][k] = __ldg(src + int64_t(g) * 4 + k);
  }
  const int64_t lg = int64_t(blockIdx.z) * gpl;  // the layer's first group
  bool bad = false;
#pragma unroll
  for (int u = 0; u < kVPer; ++u) {
    const int g = min(g0 + 32 * u, gpl - 1);
    const bool valid = g0 + 32 * u < gpl;
    typename Packed2<T>::type r[16];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      r[4 * k] = AsPair<T>(raw[u][k].x);
      r[4 * k + 1] = AsPair<T>(raw[u][k].y);
      r[4 * k + 2] = AsPair<T>(raw[u][k].z);
      r[4 * k + 3] = AsPair<T>(raw[u][k].w);
    }
    auto lo2 = r[0], hi2 = r[0];
#pragma unroll
    for (int k = 1; k < 16; ++k) {
      lo2 = __hmin2_nan(lo2, r[k]);
      hi2 = __hmax2_nan(hi2, r[k]);
    }
    float lo = MinNan(Lane(lo2, 0), Lane(lo2, 1)), hi = MaxNan(Lane(hi2, 0), Lane(hi2, 1));
    const T* x = in + int64_t(g) * kG;
    if (lo == 0.f || hi == 0.f) {
      const float2 m = CpuMinMax(x, 1, kG);
      lo = m.x;
      hi = m.y;
    }
    Coder cd = MakeCoder<BITS>(lo, hi);
    const bool fold = __all_sync(~0u, cd.fold_ok);
    Arm<BITS>(cd, fold, lo, hi);
    uint32_t w[BITS], diff[BITS];
    auto get = [&](int e) { return Lane(r[e >> 1], e & 1); };
    const bool redo =
        fold ? CodeGroup<BITS, true>(get, cd, w, diff) : CodeGroup<BITS, false>(get, cd, w, diff);
    if (valid) {
      bad = bad || !cd.g.ok;
      if (redo) {
#pragma unroll
        for (int k = 0; k < BITS; ++k) {
          if (diff[k] != 0) {
            const Exact e = FixCodes<T, BITS>(w[k], diff[k], x + k * (32 / BITS), 1, 32 / BITS,
                                              cd.g.zero, cd.g.scale);
            w[k] = e.word;
            bad = bad || e.bad;
          }
        }
      }
      blk.body[blk.v_params_w + lg + g] = cd.g.word;
      StoreWords<BITS>(blk.body + blk.v_codes_w + (lg + g) * BITS, w, BITS);
    }
  }
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
}

// ---- dequantize ------------------------------------------------------------------------------

// One thread per (VEC channels, group); VEC * sizeof(T) == 16, rows 16-byte aligned.
template <typename T, int BITS, int VEC>
__global__ void __launch_bounds__(kThreads) DequantizeKVec(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  if (blk.tokens - blk.sinks <= 0) return;
  const Geo geo = MakeGeo<BITS>(p, blk);
  const int l = blockIdx.z, HD = geo.HD, t1 = geo.t1, G = p.group, nkg = geo.nkg;
  const int nq = HD / VEC;
  const int64_t items = int64_t(nkg) * nq;
  T* out = static_cast<T*>(blk.out) + (int64_t(l) * 2 * blk.tokens + blk.sinks) * HD;
  const uint32_t* body = blk.body;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items;
       i += int64_t(gridDim.x) * kThreads) {
    const int kg = static_cast<int>(i / nq), q = static_cast<int>(i - int64_t(kg) * nq);
    const int c = q * VEC, t0 = kg * G, n = min(G, t1 - t0);
    float s[VEC], z[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const uint32_t pw = __ldg(body + (int64_t(l) * HD + c + v) * nkg + kg);
      s[v] = ParamScale(pw);
      z[v] = ParamZero(pw);
    }
    T* y0 = out + int64_t(t0) * HD + c;
    for (int k0 = 0; k0 < n; k0 += kChunk) {
      const int m = min(kChunk, n - k0);
      uint32_t cw[VEC][BITS];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        ReadRun<BITS>(body, geo.k_bit0 + ((int64_t(l) * HD + c + v) * t1 + t0 + k0) * BITS,
                      m * BITS, cw[v]);
      }
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if (k < m) {
          Vec<T, VEC> o;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            o.v[v] = FromF<T>(Dequant(CodeAt<BITS>(cw[v], k), s[v], z[v]));
          }
          StoreVec<T, VEC>(y0 + int64_t(k0 + k) * HD, o);
        }
      }
    }
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) DequantizeKGeneric(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  if (blk.tokens - blk.sinks <= 0) return;
  const Geo geo = MakeGeo<BITS>(p, blk);
  const int l = blockIdx.z, HD = geo.HD, t1 = geo.t1, G = p.group, nkg = geo.nkg;
  const int64_t items = int64_t(nkg) * HD;
  T* out = static_cast<T*>(blk.out) + (int64_t(l) * 2 * blk.tokens + blk.sinks) * HD;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items;
       i += int64_t(gridDim.x) * kThreads) {
    const int kg = static_cast<int>(i / HD), c = static_cast<int>(i - int64_t(kg) * HD);
    const int t0 = kg * G;
    const int64_t col = int64_t(l) * HD + c;
    DequantRun<T, BITS>(out + int64_t(t0) * HD + c, HD, min(G, t1 - t0), blk.body, col * nkg + kg,
                        geo.k_bit0 + (col * t1 + t0) * BITS);
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) DequantizeV(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  if (blk.tokens - blk.sinks <= 0) return;
  const Geo geo = MakeGeo<BITS>(p, blk);
  const int l = blockIdx.z, HD = geo.HD, t1 = geo.t1;
  T* out = static_cast<T*>(blk.out) + ((int64_t(l) * 2 + 1) * blk.tokens + blk.sinks) * HD;
  const uint32_t* body = blk.body;
  const uint32_t* params = body + geo.lay.v_params / 4;
  if (VFast<T, BITS>(p, geo)) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int kLaneBits = VEC * BITS;
    constexpr int kLpw = 32 / kLaneBits;
    const int lpg_shift = __ffs(geo.gv / VEC) - 1;
    const int64_t cpl = int64_t(t1) * HD / VEC;
    const int64_t c0 = int64_t(l) * cpl;
    const uint32_t* codes = body + geo.lay.v_codes / 4;
    const int64_t step = int64_t(gridDim.x) * kThreads * kVUnroll;
    const int lane = threadIdx.x & 31;
    for (int64_t base = (int64_t(blockIdx.x) * kThreads + (threadIdx.x & ~31)) * kVUnroll;
         base < cpl; base += step) {
      uint32_t pw[kVUnroll], cw[kVUnroll];
#pragma unroll
      for (int u = 0; u < kVUnroll; ++u) {
        const int64_t j = base + u * 32 + lane;
        pw[u] = cw[u] = 0u;
        if (j < cpl) {
          pw[u] = __ldg(params + ((c0 + j) >> lpg_shift));
          cw[u] = __ldg(codes + (c0 + j) / kLpw) >> (((c0 + j) % kLpw) * kLaneBits);
        }
      }
#pragma unroll
      for (int u = 0; u < kVUnroll; ++u) {
        const int64_t j = base + u * 32 + lane;
        if (j < cpl) {
          const float s = ParamScale(pw[u]), z = ParamZero(pw[u]);
          Vec<T, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            o.v[k] = FromF<T>(Dequant((cw[u] >> (k * BITS)) & ((1u << BITS) - 1u), s, z));
          }
          StoreVec<T, VEC>(out + j * VEC, o);
        }
      }
    }
  } else {
    const int D = p.dim, gv = geo.gv, nvg = geo.nvg;
    const int64_t items = int64_t(t1) * p.heads * nvg;
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items;
         i += int64_t(gridDim.x) * kThreads) {
      const int vg = static_cast<int>(i % nvg);
      const int64_t row = i / nvg;
      const int d0 = vg * gv;
      const int64_t e0 = row * D + d0;
      DequantRun<T, BITS>(out + e0, 1, min(gv, D - d0), body,
                          geo.lay.v_params / 4 + int64_t(l) * t1 * p.heads * nvg + i,
                          geo.v_bit0 + (int64_t(l) * t1 * HD + e0) * BITS);
    }
  }
}

// ---- launchers -------------------------------------------------------------------------------

dim3 Grid(int64_t items, const ScalarParams& p, int cta = kThreads) {
  const int64_t x =
      std::max<int64_t>(1, std::min<int64_t>((items + cta - 1) / cta, int64_t(1) << 30));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(p.num_blocks),
              static_cast<unsigned>(p.layers));
}
// Work items per layer of the V kernels: the larger of the fast path's and the generic path's.
template <typename T>
int64_t VItems(const ScalarParams& p, int32_t max_tokens) {
  const int gv = std::min(p.group, p.dim);
  const int64_t fast =
      (int64_t(max_tokens) * p.heads * p.dim / (16 / int(sizeof(T))) + kVUnroll - 1) / kVUnroll;
  const int64_t generic = int64_t(max_tokens) * p.heads * ((p.dim + gv - 1) / gv);
  return std::max(fast, generic);
}

template <typename T, int BITS>
cudaError_t Quantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t s) {
  constexpr int kVec = 4 / sizeof(T);
  const int HD = p.heads * p.dim;
  const int64_t nkg = (max_tokens + p.group - 1) / p.group;
  // Fast paths: 2-byte elements, groups of 32; K also needs word-aligned runs in every block.
  const bool fast = sizeof(T) == 2 && p.group == 32;
  const bool k_fast = fast && p.align >= 4 && HD % 2 == 0 && p.t1_align * BITS >= 32;
  const bool v_fast = fast && p.dim % 32 == 0 && p.align >= 16;
  if constexpr (sizeof(T) == 2) {
    if (k_fast) {
      const dim3 grid = Grid(nkg * ((HD / 2 + 15) / 16 * 16), p, kFastThreads);
      switch (HD) {  // common K/V widths (heads * head_dim) get constant row strides
        case 512:
          QuantizeK32<T, BITS, 256><<<grid, kFastThreads, 0, s>>>(p);
          break;
        case 1024:
          QuantizeK32<T, BITS, 512><<<grid, kFastThreads, 0, s>>>(p);
          break;
        case 2048:
          QuantizeK32<T, BITS, 1024><<<grid, kFastThreads, 0, s>>>(p);
          break;
        default:
          QuantizeK32<T, BITS, 0><<<grid, kFastThreads, 0, s>>>(p);
      }
    }
  }
  if (k_fast) {
    // launched above
  } else if (p.align >= 4 && HD % kVec == 0) {
    QuantizeKVec<T, BITS, kVec><<<Grid(nkg * (HD / kVec), p), kThreads, 0, s>>>(p);
  } else {
    QuantizeKGeneric<T, BITS><<<Grid(nkg * HD, p), kThreads, 0, s>>>(p);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if constexpr (sizeof(T) == 2) {
    if (v_fast) {
      const int64_t groups = int64_t(max_tokens) * HD / 32;
      QuantizeV32<T, BITS>
          <<<Grid((groups + kVPer - 1) / kVPer, p, kFastThreads), kFastThreads, 0, s>>>(p);
    }
  }
  if (!v_fast) QuantizeV<T, BITS><<<Grid(VItems<T>(p, max_tokens), p), kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t Dequantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t s) {
  constexpr int kVec = 16 / sizeof(T);
  const int HD = p.heads * p.dim;
  const int64_t nkg = (max_tokens + p.group - 1) / p.group;
  if (p.align >= 16 && HD % kVec == 0) {
    DequantizeKVec<T, BITS, kVec><<<Grid(nkg * (HD / kVec), p), kThreads, 0, s>>>(p);
  } else {
    DequantizeKGeneric<T, BITS><<<Grid(nkg * HD, p), kThreads, 0, s>>>(p);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  DequantizeV<T, BITS><<<Grid(VItems<T>(p, max_tokens), p), kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t QuantizeBits(const ScalarParams& p, int32_t max_tokens, cudaStream_t s) {
  return p.bits == 4 ? Quantize<T, 4>(p, max_tokens, s) : Quantize<T, 2>(p, max_tokens, s);
}
template <typename T>
cudaError_t DequantizeBits(const ScalarParams& p, int32_t max_tokens, cudaStream_t s) {
  return p.bits == 4 ? Dequantize<T, 4>(p, max_tokens, s) : Dequantize<T, 2>(p, max_tokens, s);
}

}  // namespace

cudaError_t LaunchScalarQuantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t stream) {
  if (p.num_blocks == 0 || max_tokens <= 0) return cudaSuccess;
  if (p.bits != 2 && p.bits != 4) return cudaErrorInvalidValue;
  switch (p.type) {
    case ElemType::kF16:
      return QuantizeBits<__half>(p, max_tokens, stream);
    case ElemType::kBF16:
      return QuantizeBits<__nv_bfloat16>(p, max_tokens, stream);
    default:
      return QuantizeBits<float>(p, max_tokens, stream);
  }
}

cudaError_t LaunchScalarDequantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t stream) {
  if (p.num_blocks == 0 || max_tokens <= 0) return cudaSuccess;
  if (p.bits != 2 && p.bits != 4) return cudaErrorInvalidValue;
  switch (p.type) {
    case ElemType::kF16:
      return DequantizeBits<__half>(p, max_tokens, stream);
    case ElemType::kBF16:
      return DequantizeBits<__nv_bfloat16>(p, max_tokens, stream);
    default:
      return DequantizeBits<float>(p, max_tokens, stream);
  }
}

}  // namespace vqkv::kernels::cuda
