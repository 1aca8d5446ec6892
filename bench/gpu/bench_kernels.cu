// Device helpers for gpu_bench: random KV data on the device, an L2 read-bandwidth probe, and
// the "cuBLAS GEMM + separate argmin" encode variant the fused kernel is compared with.
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "bench/gpu/bench_kernels.h"

namespace vqkv::bench {
namespace {

__device__ __forceinline__ uint32_t Hash(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Approximately normal: sum of four uniforms, centred and scaled to unit variance.
__device__ __forceinline__ float Normalish(uint64_t i, uint64_t seed) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    s += float(Hash(i * 4 + k + seed * 0x9E3779B97F4A7C15ULL)) * 2.3283064e-10f;
  return (s - 2.f) * 1.7320508f;
}

__global__ void FillKvKernel(__half* out, int64_t n, int dim, uint64_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float offset = 2.f * Normalish(uint64_t(i % dim), seed + 7);  // per-channel offset
    out[i] = __float2half_rn(Normalish(uint64_t(i), seed) + offset);
  }
}

__global__ void L2ReadKernel(const uint4* p, int64_t n16, int reps, uint32_t* sink) {
  uint32_t acc = 0;
  for (int r = 0; r < reps; ++r) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n16;
         i += int64_t(gridDim.x) * blockDim.x) {
      const uint4 v = __ldcg(p + i);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads alive
}

// One stage of the cuBLAS variant: scores [n, size] = r16 . c16^T (fp32, from cuBLAS), then the
// argmin of |c|^2 - 2 r.c, the fp32 residual update and the fp16 copy for the next GEMM.
__global__ void ArgminUpdateKernel(const float* scores, const float* norms, const float* cb32,
                                   float* r, __half* r16, uint16_t* codes, int64_t n, int size,
                                   int dim, int stage, int stages) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= n) return;
  const float* s = scores + row * size;
  float best = FLT_MAX;
  int arg = 0;
  for (int j = lane; j < size; j += 32) {
    const float d = norms[j] - 2.f * s[j];
    if (d < best) {
      best = d;
      arg = j;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
    if (ob < best || (ob == best && oa < arg)) {
      best = ob;
      arg = oa;
    }
  }
  const float* c = cb32 + int64_t(arg) * dim;
  for (int d = lane; d < dim; d += 32) {
    const float v = r[row * dim + d] - c[d];
    r[row * dim + d] = v;
    r16[row * dim + d] = __float2half_rn(v);
  }
  if (lane == 0) codes[row * stages + stage] = static_cast<uint16_t>(arg);
}

__global__ void ToHalfKernel(const float* in, __half* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = __float2half_rn(in[i]);
  }
}

__global__ void HalfToFloatKernel(const __half* in, float* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = __half2float(in[i]);
  }
}

}  // namespace

cudaError_t FillRandomKv(void* out_f16, int64_t n, int dim, uint64_t seed, cudaStream_t s) {
  FillKvKernel<<<4096, 256, 0, s>>>(static_cast<__half*>(out_f16), n, dim, seed);
  return cudaGetLastError();
}

cudaError_t L2Read(const void* p, int64_t bytes, int reps, uint32_t* sink, int blocks,
                   cudaStream_t s) {
  L2ReadKernel<<<blocks, 512, 0, s>>>(static_cast<const uint4*>(p), bytes / 16, reps, sink);
  return cudaGetLastError();
}

cudaError_t ArgminUpdate(const float* scores, const float* norms, const float* cb32, float* r,
                         void* r16, uint16_t* codes, int64_t n, int size, int dim, int stage,
                         int stages, cudaStream_t s) {
  const int64_t blocks = (n + 7) / 8;
  ArgminUpdateKernel<<<static_cast<unsigned>(blocks), 256, 0, s>>>(
      scores, norms, cb32, r, static_cast<__half*>(r16), codes, n, size, dim, stage, stages);
  return cudaGetLastError();
}

cudaError_t FloatToHalf(const float* in, void* out, int64_t n, cudaStream_t s) {
  ToHalfKernel<<<4096, 256, 0, s>>>(in, static_cast<__half*>(out), n);
  return cudaGetLastError();
}

cudaError_t HalfToFloat(const void* in, float* out, int64_t n, cudaStream_t s) {
  HalfToFloatKernel<<<4096, 256, 0, s>>>(static_cast<const __half*>(in), out, n);
  return cudaGetLastError();
}

}  // namespace vqkv::bench
