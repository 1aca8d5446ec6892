// KV tensor shapes and views shared by every codec.
//
// A KV block holds all layers of a run of consecutive tokens, laid out
//   [layers, 2 (0 = K, 1 = V), tokens, kv_heads, head_dim]   row-major.
// Sample sets (for fitting and evaluation) hold one sequence of vectors per layer:
//   k[layer], v[layer]: [n, kv_heads, head_dim].
// Thread-safety: plain data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/dtype.h"

namespace vqkv::kernels {

struct KvShape {
  int32_t layers = 0;
  int32_t tokens = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;

  int64_t elements() const { return int64_t{layers} * 2 * tokens * kv_heads * head_dim; }
  // Offset (in elements) of layer l, kind c (0=K, 1=V), token t, head h.
  int64_t Offset(int l, int c, int t, int h) const {
    return (((int64_t{l} * 2 + c) * tokens + t) * kv_heads + h) * head_dim;
  }
  bool operator==(const KvShape&) const = default;
  std::string DebugString() const;
};

// Checks every dimension is positive and the element count fits in memory limits
// (InvalidArgument naming the field otherwise).
absl::Status ValidateShape(const KvShape& s);

// A block to encode. `data` is not owned and holds shape.elements() values of `dtype`.
struct KvBlockView {
  KvShape shape;
  DType dtype = DType::kF16;
  const void* data = nullptr;
  // Position of the block's first token in its sequence. Tokens at positions below the codec's
  // sink count are stored losslessly (attention sinks).
  int64_t first_token = 0;
  // Model layer of the block's first layer: a block may hold a range of layers
  // [first_layer, first_layer + shape.layers) (codecs with per-layer parameters use it).
  int32_t first_layer = 0;
};

// Calibration / evaluation vectors, one sequence per layer.
struct KvSamples {
  int32_t layers = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::vector<float>> k, v;  // [layer] -> [n, kv_heads, head_dim]
  // Lengths of the sequences concatenated in k/v (empty: one sequence). Attention-based
  // metrics never attend across a sequence boundary.
  std::vector<int64_t> seq_lens;
  // Sequence position of each sequence's first row (empty: every sequence starts at 0).
  std::vector<int64_t> seq_starts;
  // Optional post-RoPE queries at the same positions: [layer] -> [n, q_heads, head_dim].
  int32_t q_heads = 0;
  std::vector<std::vector<float>> q;
  int64_t tokens(int layer) const {
    return k.empty() ? 0 : static_cast<int64_t>(k[layer].size()) / (int64_t{kv_heads} * head_dim);
  }
};

}  // namespace vqkv::kernels
