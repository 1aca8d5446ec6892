// fp32 building blocks of the LLaMA forward pass (linear layers, RMSNorm, RoPE, causal GQA
// attention with the exact/reconstructed K/V mix), parallelised with vqkv::ParallelFor.
// Thread-safety: pure functions over caller-owned buffers; callers must not share output
// buffers between concurrent calls.
#pragma once

#include <vector>

#include "model/llama_weights.h"

namespace vqkv::model {

// y[n, out] = x[n, in] * w[out, in]^T (+ b[out] when b != nullptr).
void LinearForward(const float* x, int n, const float* w, const float* b, int in, int out,
                   float* y);
inline void LinearForward(const float* x, int n, const LinearWeights& l, float* y) {
  LinearForward(x, n, l.w.data(), l.b.empty() ? nullptr : l.b.data(), l.in, l.out, y);
}

// y[n, dim] = x * rsqrt(mean(x^2) + eps) * w, row by row. y may alias x.
void RmsNorm(const float* x, int n, int dim, const float* w, float eps, float* y);

// Rotates x[n, heads, head_dim] in place for positions pos0..pos0+n-1, HF rotate-half
// convention: out[i] = x[i] cos - x[i + d/2] sin, out[i + d/2] = x[i + d/2] cos + x[i] sin with
// angle = position * inv_freq[i], i < d/2.
void ApplyRope(float* x, int n, int heads, int head_dim, int pos0,
               const std::vector<double>& inv_freq);

struct AttentionArgs {
  const float* q = nullptr;      // [n, heads, head_dim], positions pos0..pos0+n-1
  const float* k = nullptr;      // [pos0 + n, kv_heads, head_dim], exact
  const float* v = nullptr;      // same layout as k
  const float* k_hat = nullptr;  // reconstruction, same layout as k; nullptr: exact only
  const float* v_hat = nullptr;
  int n = 0, pos0 = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int sink_tokens = 0, recent_tokens = 0;  // used only with k_hat/v_hat
  float* out = nullptr;                    // [n, heads, head_dim]
};

// Causal softmax attention scaled by 1/sqrt(head_dim); query head h reads KV head
// h / (heads / kv_heads). Query at position t reads k_hat/v_hat at key s <= t unless
// s < sink_tokens or s > t - recent_tokens.
void CausalAttention(const AttentionArgs& a);

}  // namespace vqkv::model
