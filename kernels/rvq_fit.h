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
  // The code space of the fitted codebook (see codebook.h); the samples are mapped into it
  // before fitting. Empty: vectors are coded as given.
  CodeSpace code_space;
  // Called after each stage of each table: (done, total, description).
  std::function<void(int64_t, int64_t, const std::string&)> progress;
};

// How to choose a code space from calibration samples (ComputeCodeSpace).
struct CodeSpaceOptions {
  // Non-empty: code keys before RoPE with these inverse frequencies ([head_dim / 2], the
  // model's, scaling included).
  std::vector<float> key_rope_inv_freq;
  // Weight key channels by sqrt(E[q_d^2]) over the queries that read them (needs samples.q).
  bool key_query_scale = false;
  // Optional value channel energies [layer] -> [kv_heads * head_dim] (e.g. the squared column
  // norms of the output projection summed over the query heads that read each KV head); values
  // are weighted by their square roots.
  std::vector<std::vector<float>> value_energy;
  // Weights are energy^(exponent / 2): 1 = the expected squared error through the weights,
  // smaller values soften the emphasis. Each head's weights are normalised to mean square 1 and
  // floored at `floor` of that.
  double exponent = 1.0;
  double floor = 0.05;
};

// A code space for `samples` per `opts`. InvalidArgument when the options need queries the
// samples lack or sizes disagree.
absl::StatusOr<CodeSpace> ComputeCodeSpace(const KvSamples& samples, const CodeSpaceOptions& opts);

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
