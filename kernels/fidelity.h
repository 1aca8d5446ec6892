// Fidelity metrics shared by the CLI, the server and the tests, so every report uses the same
// definitions.
//  - relative error   sum ||x - x^||^2 / sum ||x||^2
//  - cosine           mean over vectors of x.x^ / (|x| |x^|)
//  - attention logits L = q.k / sqrt(d): relative error ||L - L^|| / ||L||
//  - attention output O = softmax(L) V: relative error ||O - O^|| / ||O||
//  - top-k agreement  |topk(p) ∩ topk(p^)| / k, averaged over queries and heads
//  - KL               KL(p || p^) in nats, averaged over queries and heads
// Attention is causal within a sequence and uses grouped-query mapping (query head h reads KV
// head h / (q_heads / kv_heads)).
// Thread-safety: pure functions (attention metrics parallelise internally).
#pragma once

#include <cstdint>

namespace vqkv::kernels {

struct VectorError {
  double rel_error = 0;
  double cosine = 0;
  int64_t vectors = 0;
};

// x, x_hat: [n, dim].
VectorError CompareVectors(const float* x, const float* x_hat, int64_t n, int dim);

struct AttentionFidelity {
  double logit_rel_error = 0;
  double output_rel_error = 0;
  double topk_agreement = 0;
  double kl = 0;
  int64_t queries = 0;  // (query position, head) pairs measured
};

struct AttentionInputs {
  const float* q = nullptr;                        // [tokens, q_heads, dim], post-RoPE
  const float *k = nullptr, *v = nullptr;          // [tokens, kv_heads, dim] exact
  const float *k_hat = nullptr, *v_hat = nullptr;  // reconstructed, same layout
  int64_t tokens = 0;
  int q_heads = 0, kv_heads = 0, dim = 0;
  int topk = 8;
  int64_t query_stride = 1;  // measure every query_stride-th position (from the end backwards)
  int64_t min_position = 0;  // measure queries at positions >= this
  // As a decoder with a compressed cache sees it: for query t the reconstruction replaces key s
  // only when sink_tokens <= s <= t - recent_tokens; other keys stay exact.
  int sink_tokens = 0;
  int recent_tokens = 0;
  bool output_only = false;  // skip top-k and KL (cheaper; used when choosing a split)
};

// Accumulates metrics for one sequence into `acc` (sums; call Finish to average).
struct AttentionAccumulator {
  double logit_err2 = 0, logit_ref2 = 0, out_err2 = 0, out_ref2 = 0, topk = 0, kl = 0;
  int64_t queries = 0;
  void Add(const AttentionInputs& in);
  AttentionFidelity Finish() const;
};

}  // namespace vqkv::kernels
