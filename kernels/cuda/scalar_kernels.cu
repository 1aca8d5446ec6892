// Scalar (KIVI-style) quantize / dequantize on the GPU, bit-compatible with the CPU codec: the
// same fp16 rounding of scale and zero, the same IEEE division and round-half-away-from-zero,
// so codes are identical and dequantized values equal.
//
// One thread per group (K: two channels' groups per thread, so each token row is read as
// 4-byte pairs and stays coalesced across the warp; V: one group of channels of one token).
// Groups of up to 32 values are read once into registers; longer groups are read twice.
// Code runs are written a word at a time; only words shared with a neighbouring run use
// atomicOr (their bytes must start zeroed).
#include <cfloat>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/scalar_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

constexpr int kScalarThreads = 256;
constexpr int kCache = 32;  // group values kept in registers

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

// Two consecutive elements (the first at an even index: 4- or 8-byte aligned).
template <typename T>
struct Pair {
  T a, b;
};
template <typename T>
__device__ __forceinline__ void LoadPair(const T* p, float& x, float& y) {
  const Pair<T> v = *reinterpret_cast<const Pair<T>*>(p);
  x = ToF(v.a);
  y = ToF(v.b);
}
template <typename T>
__device__ __forceinline__ void StorePair(T* p, float x, float y) {
  Pair<T> v;
  v.a = FromF<T>(x);
  v.b = FromF<T>(y);
  *reinterpret_cast<Pair<T>*>(p) = v;
}

// 16-byte vector access to consecutive 2-byte elements (fp16/bf16), when aligned.
template <typename T>
__device__ __forceinline__ bool Vec16Ok(const void* p, int n) {
  return sizeof(T) == 2 && n == kCache && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}
__device__ __forceinline__ float BitsToF(uint32_t b, __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
__device__ __forceinline__ float BitsToF(uint32_t b, __nv_bfloat16*) {
  return __uint_as_float(b << 16);
}
__device__ __forceinline__ float BitsToF(uint32_t, float*) { return 0.f; }
__device__ __forceinline__ uint32_t FToBits(float v, __half*) {
  return __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ uint32_t FToBits(float v, __nv_bfloat16*) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ uint32_t FToBits(float, float*) { return 0u; }

template <typename T>
__device__ __forceinline__ void Load8(const T* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = BitsToF(w[i] & 0xffffu, static_cast<T*>(nullptr));
    out[2 * i + 1] = BitsToF(w[i] >> 16, static_cast<T*>(nullptr));
  }
}
template <typename T>
__device__ __forceinline__ void Store8(T* p, const float* in) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = FToBits(in[2 * i], static_cast<T*>(nullptr)) |
           (FToBits(in[2 * i + 1], static_cast<T*>(nullptr)) << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Writes codes of `bits` bits starting at absolute bit `pos0` of `words`.
struct RunWriter {
  uint32_t* words;
  int64_t w;
  int off;
  bool first_partial;
  uint32_t cur = 0;
  __device__ RunWriter(uint32_t* words_in, int64_t pos0)
      : words(words_in), w(pos0 >> 5), off(static_cast<int>(pos0 & 31)), first_partial(off != 0) {}
  __device__ void Flush(bool partial) {
    if (partial) {
      atomicOr(words + w, cur);
    } else {
      words[w] = cur;
    }
  }
  __device__ void Put(uint32_t code, int bits) {
    cur |= code << off;
    if (off + bits >= 32) {
      Flush(first_partial);
      first_partial = false;
      cur = off + bits > 32 ? code >> (32 - off) : 0u;
      off = off + bits - 32;
      ++w;
    } else {
      off += bits;
    }
  }
  __device__ void Finish() {
    if (off > 0) Flush(true);
  }
};

struct GroupParams {
  uint16_t scale_h, zero_h;
  float scale, zero;
  bool ok;
};

__device__ __forceinline__ GroupParams MakeParams(float lo, float hi, int levels) {
  GroupParams g;
  const __half s = __float2half_rn((hi - lo) / float(levels));
  const __half z = __float2half_rn(lo);
  g.scale_h = __half_as_ushort(s);
  g.zero_h = __half_as_ushort(z);
  g.scale = __half2float(s);
  g.zero = __half2float(z);
  g.ok = isfinite(g.scale) && isfinite(g.zero);
  return g;
}

// Out of line so the compiler branches around it instead of predicating it into every element.
__device__ __noinline__ int ExactRound(float a, float scale) {
  return static_cast<int>(lroundf(a / scale));
}

// round((x - zero) / scale) half away from zero, clamped to [0, levels], equal to the CPU's
// lround of the IEEE quotient. The quotient is taken as a product with 1/scale (within 4e-6 of
// the IEEE quotient for |q| <= 16); only values within 1e-5 of a rounding boundary, where the two
// could round apart, pay for the exact division.
__device__ __forceinline__ uint32_t Quant(float x, const GroupParams& g, float inv, int levels) {
  if (!(g.scale > 0.f)) return 0u;
  const float a = x - g.zero;
  const float y = a * inv;
  const float fl = floorf(y);
  const float fr = y - fl;
  int q;
  if (fabsf(fr - 0.5f) > 1e-5f) {
    q = static_cast<int>(fl) + (fr > 0.5f ? 1 : 0);
  } else {
    q = ExactRound(a, g.scale);
  }
  q = q < 0 ? 0 : (q > levels ? levels : q);
  return static_cast<uint32_t>(q);
}

// Reads consecutive codes of one run from registers, loading each 32-bit word once (only words
// holding bits of the run).
struct RunReader {
  const uint32_t* words;
  int64_t w;
  uint64_t buf;
  int nbuf;
  __device__ RunReader(const uint32_t* words_in, int64_t pos0) : words(words_in), w(pos0 >> 5) {
    const int off = static_cast<int>(pos0 & 31);
    buf = uint64_t(words[w]) >> off;
    nbuf = 32 - off;
    ++w;
  }
  __device__ uint32_t Get(int bits) {
    if (nbuf < bits) {
      buf |= uint64_t(words[w++]) << nbuf;
      nbuf += 32;
    }
    const uint32_t v = static_cast<uint32_t>(buf) & ((1u << bits) - 1u);
    buf >>= bits;
    nbuf -= bits;
    return v;
  }
};

__device__ __forceinline__ float Dequant(uint32_t q, float scale, float zero) {
  return __fadd_rn(zero, __fmul_rn(scale, float(q)));
}

__device__ __forceinline__ void MinMax(float x, float& lo, float& hi, bool& bad) {
  bad = bad || !isfinite(x);
  lo = fminf(lo, x);
  hi = fmaxf(hi, x);
}

// K: thread i = ((l*H + h)*nkg + kg)*npairs + pair; channels d = 2*pair and d + 1 when D is even
// (pairs are then 4/8-byte aligned), one channel per thread when D is odd.
template <typename T>
__global__ void __launch_bounds__(kScalarThreads) ScalarQuantizeK(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int H = p.heads, D = p.dim, G = p.group, bits = p.bits;
  const int levels = (1 << bits) - 1;
  const int nkg = (t1 + G - 1) / G;
  const int cpt = D % 2 == 0 ? 2 : 1;  // channels per thread
  const int npairs = D / cpt;
  const int64_t i = int64_t(blockIdx.x) * kScalarThreads + threadIdx.x;
  if (i >= int64_t(p.layers) * H * nkg * npairs) return;
  const ScalarBodyLayout lay = ComputeScalarBodyLayout(p.layers, t1, H, D, bits, G);
  const int d = static_cast<int>(i % npairs) * cpt;
  const int64_t r = i / npairs;
  const int kg = static_cast<int>(r % nkg);
  const int64_t lh = r / nkg;
  const int l = static_cast<int>(lh / H), h = static_cast<int>(lh % H);
  const int t0 = kg * G;
  const int n = min(G, t1 - t0);
  const bool two = cpt == 2;
  const int64_t tstride = int64_t(H) * D;
  const T* x0 = static_cast<const T*>(blk.in) +
                (((int64_t(l) * 2 + 0) * blk.tokens + blk.sinks + t0) * H + h) * D + d;
  float lo0 = FLT_MAX, hi0 = -FLT_MAX, lo1 = FLT_MAX, hi1 = -FLT_MAX;
  bool bad = false;
  float ca[kCache], cb[kCache];
  const bool cached = n <= kCache;
  if (cached) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      if (k < n) {
        if (two) {
          LoadPair(x0 + k * tstride, ca[k], cb[k]);
        } else {
          ca[k] = ToF(x0[k * tstride]);
          cb[k] = 0.f;
        }
        MinMax(ca[k], lo0, hi0, bad);
        MinMax(cb[k], lo1, hi1, bad);
      }
    }
  } else {
    for (int k = 0; k < n; ++k) {
      float a, b = 0.f;
      if (two) {
        LoadPair(x0 + k * tstride, a, b);
      } else {
        a = ToF(x0[k * tstride]);
      }
      MinMax(a, lo0, hi0, bad);
      MinMax(b, lo1, hi1, bad);
    }
  }
  uint16_t* params = reinterpret_cast<uint16_t*>(blk.body);
  for (int ch = 0; ch < (two ? 2 : 1); ++ch) {
    const GroupParams g = MakeParams(ch == 0 ? lo0 : lo1, ch == 0 ? hi0 : hi1, levels);
    const float inv = g.scale > 0.f ? 1.f / g.scale : 0.f;
    bad = bad || !g.ok;
    const int64_t pi = ((lh * D + d + ch) * nkg + kg) * 2;
    params[pi] = g.scale_h;
    params[pi + 1] = g.zero_h;
    RunWriter wr(blk.body, lay.k_codes * 8 + ((lh * D + d + ch) * t1 + t0) * bits);
    if (cached) {
#pragma unroll
      for (int k = 0; k < kCache; ++k) {
        if (k < n) wr.Put(Quant(ch == 0 ? ca[k] : cb[k], g, inv, levels), bits);
      }
    } else {
      for (int k = 0; k < n; ++k) wr.Put(Quant(ToF(x0[k * tstride + ch]), g, inv, levels), bits);
    }
    wr.Finish();
  }
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
}

// V: thread i = ((l*t1 + t)*H + h)*nvg + vg, one group of gv channels of one token.
template <typename T>
__global__ void __launch_bounds__(kScalarThreads) ScalarQuantizeV(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int H = p.heads, D = p.dim, G = p.group, bits = p.bits;
  const int gv = G < D ? G : D;
  const int levels = (1 << bits) - 1;
  const int nvg = (D + gv - 1) / gv;
  const int64_t i = int64_t(blockIdx.x) * kScalarThreads + threadIdx.x;
  const ScalarBodyLayout lay = ComputeScalarBodyLayout(p.layers, t1, H, D, bits, G);
  if (i >= lay.v_groups) return;
  const int vg = static_cast<int>(i % nvg);
  const int64_t row = i / nvg;  // (l*t1 + t)*H + h
  const int h = static_cast<int>(row % H);
  const int64_t lt = row / H;
  const int t = static_cast<int>(lt % t1), l = static_cast<int>(lt / t1);
  const int d0 = vg * gv;
  const int n = min(gv, D - d0);
  const T* x0 = static_cast<const T*>(blk.in) +
                (((int64_t(l) * 2 + 1) * blk.tokens + blk.sinks + t) * H + h) * D + d0;
  float lo = FLT_MAX, hi = -FLT_MAX;
  bool bad = false;
  float cv[kCache];
  const bool cached = n <= kCache;
  if (cached && Vec16Ok<T>(x0, n)) {
#pragma unroll
    for (int k = 0; k < kCache; k += 8) Load8(x0 + k, cv + k);
#pragma unroll
    for (int k = 0; k < kCache; ++k) MinMax(cv[k], lo, hi, bad);
  } else if (cached) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      if (k < n) {
        cv[k] = ToF(x0[k]);
        MinMax(cv[k], lo, hi, bad);
      }
    }
  } else {
    for (int k = 0; k < n; ++k) MinMax(ToF(x0[k]), lo, hi, bad);
  }
  const GroupParams g = MakeParams(lo, hi, levels);
  const float inv = g.scale > 0.f ? 1.f / g.scale : 0.f;
  bad = bad || !g.ok;
  uint16_t* params = reinterpret_cast<uint16_t*>(blk.body);
  const int64_t pi = lay.v_params / 2 + i * 2;
  params[pi] = g.scale_h;
  params[pi + 1] = g.zero_h;
  RunWriter wr(blk.body, lay.v_codes * 8 + (row * D + d0) * bits);
  if (cached) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      if (k < n) wr.Put(Quant(cv[k], g, inv, levels), bits);
    }
  } else {
    for (int k = 0; k < n; ++k) wr.Put(Quant(ToF(x0[k]), g, inv, levels), bits);
  }
  wr.Finish();
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
}

template <typename T>
__global__ void __launch_bounds__(kScalarThreads) ScalarDequantizeK(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int H = p.heads, D = p.dim, G = p.group, bits = p.bits;
  const int nkg = (t1 + G - 1) / G;
  const int cpt = D % 2 == 0 ? 2 : 1;  // channels per thread
  const int npairs = D / cpt;
  const int64_t i = int64_t(blockIdx.x) * kScalarThreads + threadIdx.x;
  if (i >= int64_t(p.layers) * H * nkg * npairs) return;
  const ScalarBodyLayout lay = ComputeScalarBodyLayout(p.layers, t1, H, D, bits, G);
  const int d = static_cast<int>(i % npairs) * cpt;
  const int64_t r = i / npairs;
  const int kg = static_cast<int>(r % nkg);
  const int64_t lh = r / nkg;
  const int l = static_cast<int>(lh / H), h = static_cast<int>(lh % H);
  const int t0 = kg * G;
  const int n = min(G, t1 - t0);
  const bool two = cpt == 2;
  const uint16_t* params = reinterpret_cast<const uint16_t*>(blk.body);
  const int64_t pa = ((lh * D + d) * nkg + kg) * 2, pb = pa + int64_t(nkg) * 2;
  const float sa = __half2float(__ushort_as_half(params[pa]));
  const float za = __half2float(__ushort_as_half(params[pa + 1]));
  const float sb = two ? __half2float(__ushort_as_half(params[pb])) : 0.f;
  const float zb = two ? __half2float(__ushort_as_half(params[pb + 1])) : 0.f;
  const int64_t ba = lay.k_codes * 8 + ((lh * D + d) * t1 + t0) * bits;
  const int64_t bb = ba + int64_t(t1) * bits;
  const int64_t tstride = int64_t(H) * D;
  T* x0 = static_cast<T*>(blk.out) +
          (((int64_t(l) * 2 + 0) * blk.tokens + blk.sinks + t0) * H + h) * D + d;
  RunReader ra(blk.body, ba);
  if (two) {
    RunReader rb(blk.body, bb);
#pragma unroll 8
    for (int k = 0; k < n; ++k) {
      const float va = Dequant(ra.Get(bits), sa, za);
      const float vb = Dequant(rb.Get(bits), sb, zb);
      StorePair(x0 + k * tstride, va, vb);
    }
  } else {
#pragma unroll 8
    for (int k = 0; k < n; ++k) x0[k * tstride] = FromF<T>(Dequant(ra.Get(bits), sa, za));
  }
}

template <typename T>
__global__ void __launch_bounds__(kScalarThreads) ScalarDequantizeV(const ScalarParams p) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int H = p.heads, D = p.dim, G = p.group, bits = p.bits;
  const int gv = G < D ? G : D;
  const int nvg = (D + gv - 1) / gv;
  const int64_t i = int64_t(blockIdx.x) * kScalarThreads + threadIdx.x;
  const ScalarBodyLayout lay = ComputeScalarBodyLayout(p.layers, t1, H, D, bits, G);
  if (i >= lay.v_groups) return;
  const int vg = static_cast<int>(i % nvg);
  const int64_t row = i / nvg;
  const int h = static_cast<int>(row % H);
  const int64_t lt = row / H;
  const int t = static_cast<int>(lt % t1), l = static_cast<int>(lt / t1);
  const int d0 = vg * gv;
  const int n = min(gv, D - d0);
  const uint16_t* params = reinterpret_cast<const uint16_t*>(blk.body);
  const int64_t pi = lay.v_params / 2 + i * 2;
  const float scale = __half2float(__ushort_as_half(params[pi]));
  const float zero = __half2float(__ushort_as_half(params[pi + 1]));
  T* x0 = static_cast<T*>(blk.out) +
          (((int64_t(l) * 2 + 1) * blk.tokens + blk.sinks + t) * H + h) * D + d0;
  const int64_t b0 = lay.v_codes * 8 + (row * D + d0) * bits;
  RunReader rd(blk.body, b0);
  if (Vec16Ok<T>(x0, n)) {
    float v[kCache];
#pragma unroll
    for (int k = 0; k < kCache; ++k) v[k] = Dequant(rd.Get(bits), scale, zero);
#pragma unroll
    for (int k = 0; k < kCache; k += 8) Store8(x0 + k, v + k);
  } else {
#pragma unroll 8
    for (int k = 0; k < n; ++k) x0[k] = FromF<T>(Dequant(rd.Get(bits), scale, zero));
  }
}

dim3 GridK(const ScalarParams& p, int32_t max_tokens) {
  const int64_t groups = int64_t(p.layers) * p.heads * ((max_tokens + p.group - 1) / p.group) *
                         (p.dim % 2 == 0 ? p.dim / 2 : p.dim);
  return dim3(static_cast<unsigned>((groups + kScalarThreads - 1) / kScalarThreads),
              static_cast<unsigned>(p.num_blocks));
}
dim3 GridV(const ScalarParams& p, int32_t max_tokens) {
  const ScalarBodyLayout lay =
      ComputeScalarBodyLayout(p.layers, max_tokens, p.heads, p.dim, p.bits, p.group);
  return dim3(static_cast<unsigned>((lay.v_groups + kScalarThreads - 1) / kScalarThreads),
              static_cast<unsigned>(p.num_blocks));
}

template <typename T>
cudaError_t Quantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t s) {
  ScalarQuantizeK<T><<<GridK(p, max_tokens), kScalarThreads, 0, s>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ScalarQuantizeV<T><<<GridV(p, max_tokens), kScalarThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Dequantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t s) {
  ScalarDequantizeK<T><<<GridK(p, max_tokens), kScalarThreads, 0, s>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ScalarDequantizeV<T><<<GridV(p, max_tokens), kScalarThreads, 0, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchScalarQuantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t stream) {
  if (p.num_blocks == 0 || max_tokens <= 0) return cudaSuccess;
  switch (p.type) {
    case ElemType::kF16:
      return Quantize<__half>(p, max_tokens, stream);
    case ElemType::kBF16:
      return Quantize<__nv_bfloat16>(p, max_tokens, stream);
    default:
      return Quantize<float>(p, max_tokens, stream);
  }
}

cudaError_t LaunchScalarDequantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t stream) {
  if (p.num_blocks == 0 || max_tokens <= 0) return cudaSuccess;
  switch (p.type) {
    case ElemType::kF16:
      return Dequantize<__half>(p, max_tokens, stream);
    case ElemType::kBF16:
      return Dequantize<__nv_bfloat16>(p, max_tokens, stream);
    default:
      return Dequantize<float>(p, max_tokens, stream);
  }
}

}  // namespace vqkv::kernels::cuda
