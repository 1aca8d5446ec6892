// K/V sample files for `vqkv fit` and `vqkv eval`.
//  - safetensors: tensors "layer{l}.k", "layer{l}.v" [n, kv_heads, head_dim] (F32/F16/BF16),
//    optional "layer{l}.q" [n, q_heads, head_dim]; metadata "seq_lens" (comma-separated) when
//    several sequences are concatenated.
//  - .npy: one float32/float16 array [layers, 2, n, kv_heads, head_dim] (C order).
// Thread-safety: pure functions.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "kernels/kv.h"

namespace vqkv::eval {

absl::StatusOr<kernels::KvSamples> LoadSamples(const std::string& path);
absl::Status SaveSamples(const kernels::KvSamples& s, const std::string& path);

}  // namespace vqkv::eval
