// Choosing how a bit budget is split between keys and values, and across layers, on the
// calibration data itself (`vqkv fit --bits B`).
//
// Residual k-means fits stage by stage, so one codebook fitted with the most stages any split
// could use contains every smaller codebook as a prefix. For each layer and each (K stages,
// V stages) pair we measure the attention-output error on calibration queries (as a decoder
// with a compressed cache sees it: sinks and the recent window exact), then a dynamic program
// over layers picks the pairs with the least total error whose code bits fit the budget.
// Thread-safety: pure functions.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/codebook.h"
#include "kernels/kv.h"

namespace vqkv::kernels {

struct BudgetOptions {
  double bits_per_element = 2.75;  // code bits per K/V element, averaged over K, V and layers
  int k_size = 1024, v_size = 512;
  bool per_layer = true;   // false: the same split on every layer
  double max_share = 1.5;  // a layer/kind may take up to this × the average budget
  int sink_tokens = 4, recent_tokens = 32;
  int64_t query_stride = 4;  // measure every n-th query position
  // > 0: at most this many query positions per sequence (a larger stride on long sequences);
  // every (K stages, V stages) pair of every layer runs this attention, so it bounds the cost.
  int64_t max_queries = 0;
  // Non-empty (one per layer): minimise sum_l layer_weights[l] * err_l^2 instead of sum_l err_l.
  // With weights kl_l / err_l^2 measured on the model (each layer compressed alone), this is
  // the predicted KL of next-token distributions: layers the model's output is more sensitive
  // to get more bits (`vqkv fidelity --split-objective kl`).
  std::vector<double> layer_weights;
  std::function<void(int64_t, int64_t, const std::string&)> progress;
};

struct BudgetChoice {
  RvqConfig config;        // chosen stages per layer
  double calib_error = 0;  // the objective: sum of errors (or of weighted squared errors)
  std::string table;       // per-layer error grid summary for logs
};

// Largest stage counts any split within `opts` may use (the codebook to fit first).
RvqConfig MaxStagesConfig(int layers, int kv_heads, int head_dim, const BudgetOptions& opts,
                          bool per_head);

// Calibration error of every prefix pair: err[layer][k_stages - 1][v_stages - 1] is the
// attention-output relative error of that layer with those stage counts.
struct SplitErrors {
  std::vector<std::vector<std::vector<double>>> err;
};

// Measures SplitErrors of `full` (fitted with MaxStagesConfig) on `calib`, which must carry
// queries (q, q_heads). InvalidArgument when samples lack queries or shapes disagree.
absl::StatusOr<SplitErrors> MeasureSplitErrors(const Codebook& full, const KvSamples& calib,
                                               const BudgetOptions& opts);

// Picks stage counts within opts.bits_per_element from measured errors. FailedPrecondition when
// no split fits the budget (every layer needs >= 1 stage for K and V).
absl::StatusOr<BudgetChoice> ChooseSplitFromErrors(const RvqConfig& full, const SplitErrors& errors,
                                                   const BudgetOptions& opts);

// Splits `samples` by whole sequences: the last round(holdout * sequences) sequences (at least
// one, at most all but one) go to the second result. The split chooser should measure errors on
// sequences the codebook was not fitted on: deep residual stages memorise their training
// vectors, so errors measured on them favour stages that do not generalise. InvalidArgument
// with fewer than two sequences or holdout outside (0, 1).
absl::StatusOr<std::pair<KvSamples, KvSamples>> HoldOutSequences(const KvSamples& samples,
                                                                 double holdout);

// Text form of BudgetOptions::layer_weights: one finite number >= 0 per line, lines starting with
// '#' are comments. Parse: InvalidArgument naming the line for anything else, or no weights.
absl::StatusOr<std::vector<double>> ParseLayerWeights(absl::string_view text);
std::string FormatLayerWeights(const std::vector<double>& weights, absl::string_view comment);

// MeasureSplitErrors followed by ChooseSplitFromErrors.
absl::StatusOr<BudgetChoice> ChooseSplit(const Codebook& full, const KvSamples& calib,
                                         const BudgetOptions& opts);

}  // namespace vqkv::kernels
