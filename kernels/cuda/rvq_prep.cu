// Prepares codebook tables for the tensor-core encode: per stage a power-of-two scale that brings
// the codewords into [-1, 1), their fp16 copy (zero-padded to size_pad rows) and the score
// offsets -scale^2 |c|^2 / 2 (-1e30 on padding rows, which therefore never win).
// Norms, when computed here, are the fp32 of a sequential double sum: the same numbers as
// Codebook::Norms and the CPU k-means.
#include <cuda_fp16.h>

#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

constexpr int kPrepThreads = 256;

__global__ void __launch_bounds__(kPrepThreads)
    RvqPrepKernel(const RvqPrepTable* tables, int32_t dim) {
  const RvqPrepTable t = tables[blockIdx.y];
  const int s = blockIdx.x;
  if (s >= t.stages) return;
  const int tid = threadIdx.x;
  const float* cb = t.cb32 + int64_t(s) * t.size * dim;
  float* norms = t.norms + int64_t(s) * t.size;
  if (t.compute_norms) {
    for (int j = tid; j < t.size; j += kPrepThreads) {
      double acc = 0;
      for (int d = 0; d < dim; ++d) {
        const float v = cb[int64_t(j) * dim + d];
        acc += double(v) * v;
      }
      norms[j] = static_cast<float>(acc);
    }
  }
  float m = 0.f;
  for (int64_t i = tid; i < int64_t(t.size) * dim; i += kPrepThreads) m = fmaxf(m, fabsf(cb[i]));
  __shared__ float red[kPrepThreads];
  red[tid] = m;
  __syncthreads();
  for (int o = kPrepThreads / 2; o > 0; o >>= 1) {
    if (tid < o) red[tid] = fmaxf(red[tid], red[tid + o]);
    __syncthreads();
  }
  m = red[0];
  int e = 0;
  frexpf(m, &e);
  const float sigma = m > 0.f ? ldexpf(1.f, -e) : 1.f;
  if (tid == 0) t.scale[s] = sigma;
  __half* c16 = reinterpret_cast<__half*>(t.cb16) + int64_t(s) * t.size_pad * dim;
  for (int64_t i = tid; i < int64_t(t.size_pad) * dim; i += kPrepThreads) {
    const int64_t j = i / dim;
    c16[i] = __float2half_rn(j < t.size ? sigma * cb[i] : 0.f);
  }
  for (int j = tid; j < t.size_pad; j += kPrepThreads) {
    float ci = j < t.size ? -0.5f * sigma * sigma * norms[j] : -1e30f;
    // +0, not -0, for zero codewords: their scores against a zero residual are then +0, where
    // the encoder's reversed-index packing breaks ties toward the lower index as the CPU does.
    if (ci == 0.f) ci = 0.f;
    t.cinit[int64_t(s) * t.size_pad + j] = ci;
  }
}

}  // namespace

cudaError_t LaunchRvqPrep(const RvqPrepTable* tables, int32_t num_tables, int32_t max_stages,
                          int32_t dim, cudaStream_t stream) {
  if (num_tables == 0 || max_stages == 0) return cudaSuccess;
  RvqPrepKernel<<<dim3(max_stages, num_tables), kPrepThreads, 0, stream>>>(tables, dim);
  return cudaGetLastError();
}

}  // namespace vqkv::kernels::cuda
