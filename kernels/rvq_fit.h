// Fitting RVQ codebooks by residual k-means: stage i runs k-means on the residuals left by
// stages < i. Deterministic for a fixed seed (updates are summed in a fixed order).
// Thread-safety: pure functions; they parallelise internally.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/codebook.h"
#include "kernels/kv.h"

namespace vqkv::kernels {

struct FitOptions {
  enum class Init { kPlusPlus, kSample };
  Init init = Init::kPlusPlus;
  int iterations = 10;  // Lloyd iterations per stage
  uint64_t seed = 1;
  int64_t max_vectors = 1 << 17;  // per table; larger sample sets are subsampled (seeded)
  // Called after each stage of each table: (done, total, description).
  std::function<void(int64_t, int64_t, const std::string&)> progress;
};

// k-means of n rows of x ([n, dim]) into k centroids ([k, dim], returned). Empty clusters are
// re-seeded with the point farthest from its centroid. With n <= k the points themselves are
// the centroids (the rest are copies of point 0 perturbed slightly). `mse` (optional) receives
// the final mean squared distance per vector.
std::vector<float> KMeans(const float* x, int64_t n, int dim, int k, const FitOptions& opts,
                          uint64_t seed, double* mse = nullptr);

// Fits a codebook of `config` on `samples` (shapes must agree). InvalidArgument for empty or
// mismatched samples or non-finite values.
absl::StatusOr<Codebook> FitCodebook(const RvqConfig& config, const KvSamples& samples,
                                     const FitOptions& opts);

// A codebook holding the first stages of `cb` as given by `config` (each stage count must be
// <= cb's). Because residual k-means fits stage by stage, this equals fitting `config` directly
// with the same seed and samples.
absl::StatusOr<Codebook> TruncateCodebook(const Codebook& cb, const RvqConfig& config);

}  // namespace vqkv::kernels
