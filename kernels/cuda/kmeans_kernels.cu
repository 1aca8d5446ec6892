// k-means kernels for the GPU codebook fit: k-means++ seeding (two small launches per centroid,
// all tables at once), fixed-point cluster sums (int64 atomics: the result does not depend on
// the order in which the atomics land) and the centroid update with the CPU's rule for empty
// clusters.
#include <cfloat>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/kmeans_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

constexpr int kKmThreads = 256;
constexpr int kPointsPerInitBlock = 1024;  // 4 per thread in the select scan

__host__ __device__ __forceinline__ int64_t InitBlocks(int64_t n_init) {
  return (n_init + kPointsPerInitBlock - 1) / kPointsPerInitBlock;
}

__device__ __forceinline__ int FixedBits(const KmTable& t) {
  const float m = __int_as_float(*t.max_bits);
  int e = 0;
  frexpf(m, &e);  // m < 2^e
  int lg = 0;
  while ((int64_t{1} << lg) < t.n) ++lg;
  int fb = 61 - e - lg;
  return fb > 120 ? 120 : fb;
}

__global__ void KmSeedFirstKernel(const KmParams p) {
  const KmTable t = p.tables[blockIdx.x];
  const float* src = t.x + (*t.pick) * t.init_stride * p.dim;
  for (int d = threadIdx.x; d < p.dim; d += blockDim.x) t.centroids[d] = src[d];
  for (int64_t i = threadIdx.x; i < t.n_init; i += blockDim.x) t.d2[i] = FLT_MAX;
}

// d2[i] = min(d2[i], |x_i - c_j|^2) and per-CTA sums; one warp per point at a time.
__global__ void __launch_bounds__(kKmThreads) KmPlusPlusUpdateKernel(const KmParams p, int j) {
  const KmTable t = p.tables[blockIdx.y];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t first = int64_t(blockIdx.x) * kPointsPerInitBlock;
  const int D = p.dim;
  const float* c = t.centroids + int64_t(j) * D;
  __shared__ double wsum[kKmThreads / 32];
  double acc = 0;
  if (first < t.n_init) {
    const int64_t last = min(first + kPointsPerInitBlock, t.n_init);
#pragma unroll 4
    for (int64_t i = first + warp; i < last; i += kKmThreads / 32) {
      const float* x = t.x + i * t.init_stride * D;
      float s = 0.f;
      for (int d = lane; d < D; d += 32) {
        const float diff = x[d] - c[d];
        s = fmaf(diff, diff, s);
      }
      s = detail::WarpSum(s);
      const float v = fminf(t.d2[i], s);
      if (lane == 0) t.d2[i] = v;
      acc += v;
    }
  }
  if (lane == 0) wsum[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < kKmThreads / 32; ++w) total += wsum[w];
    if (blockIdx.x < InitBlocks(t.n_init)) t.block_sums[blockIdx.x] = total;
  }
}

// Inclusive scan of one double per thread (Hillis-Steele in shared memory, fixed order).
__device__ double BlockInclusiveScan(double v, double* buf) {
  const int tid = threadIdx.x;
  buf[tid] = v;
  __syncthreads();
  for (int o = 1; o < kKmThreads; o <<= 1) {
    const double add = tid >= o ? buf[tid - o] : 0.0;
    __syncthreads();
    buf[tid] += add;
    __syncthreads();
  }
  return buf[tid];
}

// Draws the next k-means++ point: the first one whose running d2 sum reaches U_j * total (the
// CPU's rule), found with two block scans (over per-CTA sums, then over the chosen CTA's points).
__global__ void __launch_bounds__(kKmThreads) KmPlusPlusSelectKernel(const KmParams p, int j) {
  const KmTable t = p.tables[blockIdx.x];
  const int tid = threadIdx.x;
  const int nblk = static_cast<int>(InitBlocks(t.n_init));
  __shared__ double buf[kKmThreads];
  __shared__ double s_u;
  __shared__ int s_blk;
  __shared__ int64_t s_pick;
  // Level 1: thread tid owns blocks [b0, b1).
  const int per = (nblk + kKmThreads - 1) / kKmThreads;
  const int b0 = min(nblk, tid * per), b1 = min(nblk, b0 + per);
  double local = 0;
  for (int b = b0; b < b1; ++b) local += t.block_sums[b];
  const double incl = BlockInclusiveScan(local, buf);
  const double excl = tid > 0 ? buf[tid - 1] : 0.0;  // contiguous intervals: one owner
  const double total = buf[kKmThreads - 1];
  const double u = t.uniforms[j] * total;
  if (tid == 0) {
    s_blk = -1;
    s_pick = -1;
    if (!(total > 0)) {
      // Degenerate (all points coincide with centres): a uniform pick.
      const int64_t f = static_cast<int64_t>(t.uniforms[j] * double(t.n_init));
      s_pick = f < t.n_init - 1 ? f : t.n_init - 1;
    } else if (u <= 0) {
      s_pick = 0;
    } else if (u > total) {
      s_blk = nblk - 1;  // rounding: the CPU then ends on the last point
      s_u = 1e300;
    }
  }
  __syncthreads();
  if (total > 0 && u > 0 && u <= total && u > excl && u <= incl) {
    double acc = excl;
    int blk = b1 - 1;
    for (int b = b0; b < b1; ++b) {
      if (u <= acc + t.block_sums[b]) {
        blk = b;
        break;
      }
      acc += t.block_sums[b];
    }
    s_blk = blk;
    s_u = u - acc;
  }
  __syncthreads();
  if (s_blk >= 0) {
    // Level 2: the chosen CTA's points, 4 consecutive per thread.
    const int64_t first = int64_t(s_blk) * kPointsPerInitBlock;
    const int64_t last = min(first + kPointsPerInitBlock, t.n_init);
    const int64_t i0 = min(first + int64_t(tid) * 4, last), i1 = min(i0 + 4, last);
    double sum = 0;
    for (int64_t i = i0; i < i1; ++i) sum += t.d2[i];
    const double inc = BlockInclusiveScan(sum, buf);
    const double exc = tid > 0 ? buf[tid - 1] : 0.0;
    const double ur = s_u;
    if (tid == 0 && ur > buf[kKmThreads - 1]) s_pick = last - 1;
    if (i0 < i1 && ur > exc && ur <= inc) {
      double acc = exc;
      int64_t pick = i1 - 1;
      for (int64_t i = i0; i < i1; ++i) {
        acc += t.d2[i];
        if (ur <= acc) {
          pick = i;
          break;
        }
      }
      s_pick = pick;
    }
  }
  __syncthreads();
  const int64_t pick = s_pick;
  if (tid == 0) *t.pick = pick;
  if (j + 1 < p.k) {
    const float* src = t.x + pick * t.init_stride * p.dim;
    float* dst = t.centroids + int64_t(j + 1) * p.dim;
    for (int d = tid; d < p.dim; d += kKmThreads) dst[d] = src[d];
  }
}

__global__ void KmGatherKernel(const KmParams p, const int64_t* picks) {
  const KmTable t = p.tables[blockIdx.y];
  const int j = blockIdx.x;
  const float* src = t.x + picks[int64_t(blockIdx.y) * p.k + j] * p.dim;
  for (int d = threadIdx.x; d < p.dim; d += blockDim.x)
    t.centroids[int64_t(j) * p.dim + d] = src[d];
}

__global__ void __launch_bounds__(kKmThreads) KmMaxAbsKernel(const KmParams p) {
  const KmTable t = p.tables[blockIdx.y];
  const int64_t n = t.n * p.dim;
  float m = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * kKmThreads + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kKmThreads) {
    m = fmaxf(m, fabsf(t.x[i]));
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) atomicMax(t.max_bits, __float_as_int(m));
}

__global__ void __launch_bounds__(kKmThreads) KmAccumulateKernel(const KmParams p) {
  const KmTable t = p.tables[blockIdx.y];
  const int lane = threadIdx.x & 31;
  const int D = p.dim;
  const int fb = FixedBits(t);
  const int64_t warps = int64_t(gridDim.x) * (kKmThreads / 32);
  for (int64_t i = int64_t(blockIdx.x) * (kKmThreads / 32) + (threadIdx.x >> 5); i < t.n;
       i += warps) {
    const int a = t.assign[i];
    if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(t.counts + a), 1ull);
    const float* x = t.x + i * D;
    long long* s = t.sums + int64_t(a) * D;
    for (int d = lane; d < D; d += 32) {
      const long long v = __double2ll_rn(ldexp(double(x[d]), fb));
      atomicAdd(reinterpret_cast<unsigned long long*>(s + d), static_cast<unsigned long long>(v));
    }
  }
}

__global__ void __launch_bounds__(kKmThreads) KmUpdateKernel(const KmParams p) {
  const KmTable t = p.tables[blockIdx.y];
  const int D = p.dim;
  const int fb = FixedBits(t);
  const int64_t n = int64_t(p.k) * D;
  for (int64_t i = int64_t(blockIdx.x) * kKmThreads + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kKmThreads) {
    const long long cnt = t.counts[i / D];
    if (cnt > 0) {
      const double sum = ldexp(double(t.sums[i]), -fb);
      t.centroids[i] = static_cast<float>(sum / double(cnt));
    }
  }
}

// One CTA per table: empty clusters, in index order, take the farthest remaining point.
__global__ void __launch_bounds__(kKmThreads) KmReseedKernel(const KmParams p) {
  const KmTable t = p.tables[blockIdx.x];
  const int tid = threadIdx.x;
  __shared__ float bd[kKmThreads];
  __shared__ int64_t bi[kKmThreads];
  __shared__ int s_any;
  if (tid == 0) s_any = 0;
  __syncthreads();
  for (int j = tid; j < p.k; j += kKmThreads) {
    if (t.counts[j] == 0) s_any = 1;
  }
  __syncthreads();
  if (!s_any) return;
  for (int j = 0; j < p.k; ++j) {
    if (t.counts[j] != 0) continue;
    float best = -FLT_MAX;
    int64_t arg = INT64_MAX;
    for (int64_t i = tid; i < t.n; i += kKmThreads) {
      const float v = t.dist[i];
      if (v > best) {
        best = v;
        arg = i;
      }
    }
    bd[tid] = best;
    bi[tid] = arg;
    __syncthreads();
    for (int o = kKmThreads / 2; o > 0; o >>= 1) {
      if (tid < o) {
        if (bd[tid + o] > bd[tid] || (bd[tid + o] == bd[tid] && bi[tid + o] < bi[tid])) {
          bd[tid] = bd[tid + o];
          bi[tid] = bi[tid + o];
        }
      }
      __syncthreads();
    }
    const int64_t far = bi[0];
    const bool ok = bd[0] >= 0.f && far < t.n;  // all points used: leave the centroid
    __syncthreads();
    if (ok) {
      for (int d = tid; d < p.dim; d += kKmThreads) {
        t.centroids[int64_t(j) * p.dim + d] = t.x[far * p.dim + d];
      }
      if (tid == 0) t.dist[far] = -1.f;
    }
    __syncthreads();
  }
}

unsigned GridFor(int64_t n, int64_t per_block, unsigned cap) {
  const int64_t g = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(g < 1 ? 1 : (g > cap ? cap : g));
}

}  // namespace

int64_t KmInitBlocks(int64_t n_init) { return InitBlocks(n_init); }

cudaError_t LaunchKmSeedFirst(const KmParams& p, cudaStream_t stream) {
  KmSeedFirstKernel<<<p.num_tables, kKmThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchKmPlusPlusUpdate(const KmParams& p, int32_t j, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(InitBlocks(p.max_n_init)), p.num_tables);
  KmPlusPlusUpdateKernel<<<grid, kKmThreads, 0, stream>>>(p, j);
  return cudaGetLastError();
}

cudaError_t LaunchKmPlusPlusSelect(const KmParams& p, int32_t j, cudaStream_t stream) {
  KmPlusPlusSelectKernel<<<p.num_tables, kKmThreads, 0, stream>>>(p, j);
  return cudaGetLastError();
}

cudaError_t LaunchKmGather(const KmParams& p, const int64_t* picks, cudaStream_t stream) {
  KmGatherKernel<<<dim3(p.k, p.num_tables), 128, 0, stream>>>(p, picks);
  return cudaGetLastError();
}

cudaError_t LaunchKmMaxAbs(const KmParams& p, cudaStream_t stream) {
  const dim3 grid(GridFor(p.max_n * p.dim, kKmThreads * 16, 1024), p.num_tables);
  KmMaxAbsKernel<<<grid, kKmThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchKmAccumulate(const KmParams& p, cudaStream_t stream) {
  const dim3 grid(GridFor(p.max_n, (kKmThreads / 32) * 8, 4096), p.num_tables);
  KmAccumulateKernel<<<grid, kKmThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchKmUpdate(const KmParams& p, cudaStream_t stream) {
  const dim3 grid(GridFor(int64_t(p.k) * p.dim, kKmThreads, 1024), p.num_tables);
  KmUpdateKernel<<<grid, kKmThreads, 0, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  KmReseedKernel<<<p.num_tables, kKmThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vqkv::kernels::cuda
