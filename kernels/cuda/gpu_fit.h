// Residual k-means codebook fitting on the GPU: the CPU FitCodebook (rvq_fit.h) with every
// table of a layer group advancing together and the distance work on tensor cores.
//
// It follows the CPU algorithm step by step and draws the same random numbers: the same sample
// rows per table, the same per-stage seeds, k-means++ with the CPU's uniform draws (or the same
// random-sample picks), Lloyd iterations with the same assignment rule (nearest codeword, exact
// fp32 rescore, ties to the lower index), means of the assigned points and the CPU's rule for
// empty clusters. Results differ from the CPU's only through floating-point summation order
// (k-means++ distances and sums are reduced in another order; a different k-means++ pick then
// changes that stage's seeding), so quantization error agrees to well within a percent.
// Deviation: with init_points_per_centroid > 0, k-means++ seeds from an evenly strided subset of
// at most k * init_points_per_centroid points (the CPU uses all of them; seeding cost is
// k passes over those points). Lloyd iterations always use every sample row.
// Thread-safety: reentrant; uses the current device and its own stream.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/codebook.h"
#include "kernels/kv.h"
#include "kernels/rvq_fit.h"

namespace vqkv::kernels::cuda {

struct GpuFitOptions {
  // k-means++ seeding uses at most k * this many points per table (0: all, exactly the CPU's
  // seeding). 16 keeps seeding ~1/5 of a K-stage's time for LLaMA-3.1-8B.
  int64_t init_points_per_centroid = 16;
  bool tensor_cores = true;  // false: exact fp32 assignment kernel
};

// Same contract as FitCodebook (InvalidArgument for empty/mismatched/non-finite samples);
// ResourceExhausted when the device lacks memory, Unavailable without a device.
absl::StatusOr<Codebook> FitCodebookGpu(const RvqConfig& config, const KvSamples& samples,
                                        const FitOptions& opts, const GpuFitOptions& gopts = {});

}  // namespace vqkv::kernels::cuda
