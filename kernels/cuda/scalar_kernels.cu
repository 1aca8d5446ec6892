// Scalar (KIVI-style) quantize / dequantize on the GPU, bit-compatible with the CPU codec: the
// same fp16 rounding of scale and zero, the same IEEE division and round-half-away-from-zero,
// so codes are identical and dequantized values equal.
//
// One thread per group: K groups run along tokens of one channel (consecutive threads take
// consecutive channels, so each token row is read coalesced), V groups along channels of one
// token. Code runs are written a word at a time; only words shared with a neighbouring run use
// atomicOr (their bytes must start zeroed).
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/scalar_kernels.h"

namespace vqkv::kernels::cuda {

namespace {

using detail::LoadElem;

constexpr int kScalarThreads = 256;

// Writes `count` codes of `bits` bits starting at absolute bit `pos0` of `words`.
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

__device__ __forceinline__ uint32_t Quant(float x, const GroupParams& g, int levels) {
  int q = g.scale > 0.f ? static_cast<int>(lroundf((x - g.zero) / g.scale)) : 0;
  q = q < 0 ? 0 : (q > levels ? levels : q);
  return static_cast<uint32_t>(q);
}

__device__ __forceinline__ float Dequant(uint32_t q, float scale, float zero) {
  return __fadd_rn(zero, __fmul_rn(scale, float(q)));
}

__global__ void __launch_bounds__(kScalarThreads)
    ScalarQuantizeKernel(const ScalarParams p, int which) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int L = p.layers, H = p.heads, D = p.dim, G = p.group, bits = p.bits;
  const int gv = G < D ? G : D;
  const int levels = (1 << bits) - 1;
  const ScalarBodyLayout lay = ComputeScalarBodyLayout(L, t1, H, D, bits, G);
  uint16_t* params = reinterpret_cast<uint16_t*>(blk.body);
  const int64_t i = int64_t(blockIdx.x) * kScalarThreads + threadIdx.x;
  const int64_t tstride = int64_t(H) * D;
  bool bad = false;
  if (which == 0) {  // K: i = ((l*H + h)*nkg + kg)*D + d
    const int nkg = (t1 + G - 1) / G;
    if (i >= lay.k_groups) return;
    const int d = static_cast<int>(i % D);
    const int64_t r = i / D;
    const int kg = static_cast<int>(r % nkg);
    const int64_t lh = r / nkg;
    const int l = static_cast<int>(lh / H), h = static_cast<int>(lh % H);
    const int t0 = kg * G;
    const int n = min(G, t1 - t0);
    const int64_t x0 = (((int64_t(l) * 2 + 0) * blk.tokens + blk.sinks + t0) * H + h) * D + d;
    float lo = LoadElem(blk.in, x0, p.type), hi = lo;
#pragma unroll 8
    for (int k = 1; k < n; ++k) {
      const float x = LoadElem(blk.in, x0 + k * tstride, p.type);
      bad = bad || !isfinite(x);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
    bad = bad || !isfinite(lo) || !isfinite(hi);
    const GroupParams g = MakeParams(lo, hi, levels);
    bad = bad || !g.ok;
    const int64_t pi = ((lh * D + d) * nkg + kg) * 2;
    params[pi] = g.scale_h;
    params[pi + 1] = g.zero_h;
    RunWriter wr(blk.body, lay.k_codes * 8 + ((lh * D + d) * t1 + t0) * bits);
#pragma unroll 8
    for (int k = 0; k < n; ++k) wr.Put(Quant(LoadElem(blk.in, x0 + k * tstride, p.type), g, levels), bits);
    wr.Finish();
  } else {  // V: i = ((l*t1 + t)*H + h)*nvg + vg
    const int nvg = (D + gv - 1) / gv;
    if (i >= lay.v_groups) return;
    const int vg = static_cast<int>(i % nvg);
    const int64_t row = i / nvg;  // (l*t1 + t)*H + h
    const int h = static_cast<int>(row % H);
    const int64_t lt = row / H;
    const int t = static_cast<int>(lt % t1), l = static_cast<int>(lt / t1);
    const int d0 = vg * gv;
    const int n = min(gv, D - d0);
    const int64_t x0 = (((int64_t(l) * 2 + 1) * blk.tokens + blk.sinks + t) * H + h) * D + d0;
    float lo = LoadElem(blk.in, x0, p.type), hi = lo;
    for (int k = 1; k < n; ++k) {
      const float x = LoadElem(blk.in, x0 + k, p.type);
      bad = bad || !isfinite(x);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
    bad = bad || !isfinite(lo) || !isfinite(hi);
    const GroupParams g = MakeParams(lo, hi, levels);
    bad = bad || !g.ok;
    const int64_t pi = lay.v_params / 2 + i * 2;
    params[pi] = g.scale_h;
    params[pi + 1] = g.zero_h;
    RunWriter wr(blk.body, lay.v_codes * 8 + (row * D + d0) * bits);
    for (int k = 0; k < n; ++k) wr.Put(Quant(LoadElem(blk.in, x0 + k, p.type), g, levels), bits);
    wr.Finish();
  }
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
}

__global__ void __launch_bounds__(kScalarThreads)
    ScalarDequantizeKernel(const ScalarParams p, int which) {
  const ScalarBlock blk = p.blocks[blockIdx.y];
  const int t1 = blk.tokens - blk.sinks;
  if (t1 <= 0) return;
  const int L = p.layers, H = p.heads, D = p.dim, G = p.group, bits = p.bits;
  const int gv = G < D ? G : D;
  const ScalarBodyLayout lay = ComputeScalarBodyLayout(L, t1, H, D, bits, G);
  const uint16_t* params = reinterpret_cast<const uint16_t*>(blk.body);
  const int64_t i = int64_t(blockIdx.x) * kScalarThreads + threadIdx.x;
  const int64_t tstride = int64_t(H) * D;
  if (which == 0) {
    const int nkg = (t1 + G - 1) / G;
    if (i >= lay.k_groups) return;
    const int d = static_cast<int>(i % D);
    const int64_t r = i / D;
    const int kg = static_cast<int>(r % nkg);
    const int64_t lh = r / nkg;
    const int l = static_cast<int>(lh / H), h = static_cast<int>(lh % H);
    const int t0 = kg * G;
    const int n = min(G, t1 - t0);
    const int64_t pi = ((lh * D + d) * nkg + kg) * 2;
    const float scale = __half2float(__ushort_as_half(params[pi]));
    const float zero = __half2float(__ushort_as_half(params[pi + 1]));
    const int64_t x0 = (((int64_t(l) * 2 + 0) * blk.tokens + blk.sinks + t0) * H + h) * D + d;
    const int64_t b0 = lay.k_codes * 8 + ((lh * D + d) * t1 + t0) * bits;
#pragma unroll 8
    for (int k = 0; k < n; ++k) {
      const uint32_t q = detail::ReadBits(blk.body, b0 + int64_t(k) * bits, bits);
      detail::StoreElem(blk.out, x0 + k * tstride, p.type, Dequant(q, scale, zero));
    }
  } else {
    const int nvg = (D + gv - 1) / gv;
    if (i >= lay.v_groups) return;
    const int vg = static_cast<int>(i % nvg);
    const int64_t row = i / nvg;
    const int h = static_cast<int>(row % H);
    const int64_t lt = row / H;
    const int t = static_cast<int>(lt % t1), l = static_cast<int>(lt / t1);
    const int d0 = vg * gv;
    const int n = min(gv, D - d0);
    const int64_t pi = lay.v_params / 2 + i * 2;
    const float scale = __half2float(__ushort_as_half(params[pi]));
    const float zero = __half2float(__ushort_as_half(params[pi + 1]));
    const int64_t x0 = (((int64_t(l) * 2 + 1) * blk.tokens + blk.sinks + t) * H + h) * D + d0;
    const int64_t b0 = lay.v_codes * 8 + (row * D + d0) * bits;
    for (int k = 0; k < n; ++k) {
      const uint32_t q = detail::ReadBits(blk.body, b0 + int64_t(k) * bits, bits);
      detail::StoreElem(blk.out, x0 + k, p.type, Dequant(q, scale, zero));
    }
  }
}

dim3 Grid(const ScalarParams& p, int32_t max_tokens, int which) {
  const ScalarBodyLayout lay =
      ComputeScalarBodyLayout(p.layers, max_tokens, p.heads, p.dim, p.bits, p.group);
  const int64_t groups = which == 0 ? lay.k_groups : lay.v_groups;
  return dim3(static_cast<unsigned>((groups + kScalarThreads - 1) / kScalarThreads),
              static_cast<unsigned>(p.num_blocks));
}

}  // namespace

cudaError_t LaunchScalarQuantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t stream) {
  if (p.num_blocks == 0 || max_tokens <= 0) return cudaSuccess;
  for (int which = 0; which < 2; ++which) {
    ScalarQuantizeKernel<<<Grid(p, max_tokens, which), kScalarThreads, 0, stream>>>(p, which);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t LaunchScalarDequantize(const ScalarParams& p, int32_t max_tokens,
                                   cudaStream_t stream) {
  if (p.num_blocks == 0 || max_tokens <= 0) return cudaSuccess;
  for (int which = 0; which < 2; ++which) {
    ScalarDequantizeKernel<<<Grid(p, max_tokens, which), kScalarThreads, 0, stream>>>(p, which);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace vqkv::kernels::cuda
