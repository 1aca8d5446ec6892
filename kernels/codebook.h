// RVQ codebooks: configuration, storage, safetensors files and content ids.
//
// For each layer l and kind c (0 = K, 1 = V) there are `stages` tables of `size` codewords of
// head_dim floats, shared by the layer's heads (or one set per head when per_head is set):
//   table(l, c, h, i): [size, head_dim] fp32, i < stages(l, c)
// File: safetensors with tensors "layer{l}.{k|v}" (or "layer{l}.{k|v}.head{h}") of shape
// [stages, size, head_dim] F32 and metadata {format: "vqkv-codebook", version: "1", layers,
// kv_heads, head_dim, per_head, stages: "l0k,l0v,l1k,...", sizes: same, id}. The id is the
// first 16 bytes (hex) of SHA-256 over the config line and every table's bytes; Load recomputes
// it, so a file whose numbers were damaged is rejected.
// Thread-safety: immutable after construction; safe to share across threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::kernels {

struct StageConfig {
  int stages = 0;  // number of residual stages (>= 1)
  int size = 0;    // codewords per stage: a power of two in [2, 65536]
  int bits() const;
  bool operator==(const StageConfig&) const = default;
};

struct RvqConfig {
  int layers = 0, kv_heads = 0, head_dim = 0;
  bool per_head = false;
  std::vector<StageConfig> k, v;  // one per layer

  // Same K and V stages on every layer.
  static RvqConfig Uniform(int layers, int kv_heads, int head_dim, StageConfig k, StageConfig v,
                           bool per_head = false);
  const StageConfig& at(int layer, int kind) const { return kind == 0 ? k[layer] : v[layer]; }
  // Code bits per token over all layers and heads (K and V).
  int64_t CodeBitsPerToken() const;
  // Average code bits per KV element (codes only).
  double BitsPerElement() const;
  // Codebook storage in bytes (fp32 tables).
  int64_t CodebookBytes() const;
  // "k=7x1024,v=2x512" when uniform, else one entry per layer.
  std::string ToString() const;
  absl::Status Validate() const;
};

// Parses "7x1024" into a StageConfig. InvalidArgument when malformed or out of range.
absl::StatusOr<StageConfig> ParseStageConfig(std::string_view text);

class Codebook {
 public:
  // Takes tables in the order (l, c, h) with h only when per_head; each holds
  // stages*size*head_dim floats. Validates sizes and finiteness and computes the id.
  static absl::StatusOr<Codebook> Create(RvqConfig config, std::vector<std::vector<float>> tables);
  static absl::StatusOr<Codebook> Load(const std::string& path);
  static absl::StatusOr<Codebook> FromBytes(std::string bytes, const std::string& what);
  std::string Serialize() const;
  absl::Status Save(const std::string& path) const;

  const RvqConfig& config() const { return config_; }
  const std::string& id() const { return id_; }  // 32 hex chars
  // Pointer to stage `stage` of (layer, kind, head): [size, head_dim].
  const float* Table(int layer, int kind, int head, int stage) const;
  // Squared norms of the codewords of the same table: [size].
  const float* Norms(int layer, int kind, int head, int stage) const;
  int TableIndex(int layer, int kind, int head) const;

 private:
  RvqConfig config_;
  std::vector<std::vector<float>> tables_, norms_;
  std::string id_;
};

}  // namespace vqkv::kernels
