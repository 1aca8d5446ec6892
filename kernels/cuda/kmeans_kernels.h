// Plain parameter structs and launchers of the k-means kernels used by the GPU codebook fit
// (gpu_fit.h). Every launch works on a batch of independent tables (one k-means each, same k and
// head_dim), so one stage of all layers' codebooks advances together.
// Assignments come from the rvq encode kernel run with one stage (RvqEncodeParams).
// Thread-safety: launchers are reentrant; concurrent launches must not share buffers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vqkv::kernels::cuda {

struct KmTable {
  const float* x = nullptr;          // [n, D] points (this stage's residuals)
  float* centroids = nullptr;        // [k, D]
  float* dist = nullptr;             // [n] squared distance to the assigned centroid
  const uint16_t* assign = nullptr;  // [n] assigned centroid
  // k-means++ seeding over the points i * init_stride, i < n_init
  float* d2 = nullptr;               // [n_init]
  double* block_sums = nullptr;      // [KmInitBlocks(n_init)]
  const double* uniforms = nullptr;  // [k] U_j in [0, 1): the CPU's draws; u = U_j * total
  int64_t* pick = nullptr;           // [1] current pick, an index < n_init
  // Lloyd update, fixed point so that the sums do not depend on the order of the atomics
  long long* sums = nullptr;    // [k, D]
  long long* counts = nullptr;  // [k]
  int32_t* max_bits = nullptr;  // [1] bit pattern of max |x| (float >= 0 compares as int)
  int64_t n = 0, n_init = 0, init_stride = 1;
};

struct KmParams {
  const KmTable* tables = nullptr;
  int32_t num_tables = 0;
  int32_t k = 0;
  int32_t dim = 0;
  int64_t max_n = 0;
  int64_t max_n_init = 0;
};

int64_t KmInitBlocks(int64_t n_init);

// k-means++: c[0] = x[pick * stride]; then for j = 0 .. k-2: Update(j) folds c[j] into d2,
// Select(j) draws the next point (as the CPU does: the first whose running d2 sum reaches
// U_j * total) and writes c[j+1].
cudaError_t LaunchKmSeedFirst(const KmParams& p, cudaStream_t stream);
cudaError_t LaunchKmPlusPlusUpdate(const KmParams& p, int32_t j, cudaStream_t stream);
cudaError_t LaunchKmPlusPlusSelect(const KmParams& p, int32_t j, cudaStream_t stream);
// c[j] = x[picks[t * k + j]] for every table t (random-sample seeding).
cudaError_t LaunchKmGather(const KmParams& p, const int64_t* picks, cudaStream_t stream);
// max |x| per table (max_bits must start at 0).
cudaError_t LaunchKmMaxAbs(const KmParams& p, cudaStream_t stream);
// sums/counts (zeroed by the caller) += the points of each cluster.
cudaError_t LaunchKmAccumulate(const KmParams& p, cudaStream_t stream);
// c[j] = sums[j] / counts[j] where counts[j] > 0; then each empty cluster, in index order,
// takes the point farthest from its centroid (ties to the lower index), as the CPU does.
cudaError_t LaunchKmUpdate(const KmParams& p, cudaStream_t stream);

}  // namespace vqkv::kernels::cuda
