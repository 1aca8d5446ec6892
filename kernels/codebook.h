// RVQ codebooks: configuration, storage, safetensors files and content ids.
//
// For each layer l and kind c (0 = K, 1 = V) there are `stages` tables of `size` codewords of
// head_dim floats, shared by the layer's heads (or one set per head when per_head is set):
//   table(l, c, h, i): [size, head_dim] fp32, i < stages(l, c)
// File: safetensors with tensors "layer{l}.{k|v}" (or "layer{l}.{k|v}.head{h}") of shape
// [stages, size, head_dim] F32 and metadata {format: "vqkv-codebook", version: "1", layers,
// kv_heads, head_dim, per_head, stages: "l0k,l0v,l1k,...", sizes: same, id}. The id is the
// first 16 bytes (hex) of SHA-256 over the config line and every table's bytes (and the code
// space below, when it has one); Load recomputes it, so a file whose numbers were damaged is
// rejected. A codebook with a code space is written as version "2" (metadata key_rope:
// "rotate_half"|"none", scaled: "1"|"0"; tensors "key_rope.inv_freq" [head_dim/2] and
// "layer{l}.{k|v}.scale" [kv_heads, head_dim]) so that a reader that does not know it refuses the
// file instead of decoding garbage.
// Thread-safety: immutable after construction; safe to share across threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/kv.h"

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

// The space the tables quantize ("code space"), chosen at calibration time and applied by every
// codec that uses the codebook. Empty members mean "as given".
//  - key_rope_inv_freq ([head_dim / 2]): keys arrive post-RoPE, as attention caches hold them, so
//    a key's direction depends on its position and tables calibrated on short contexts miss the
//    angles of long ones. The codec rotates each key back by its position (rotate-half pairs
//    (i, i + head_dim/2), angle = position * inv_freq[i], as LLaMA applies RoPE) before coding and
//    rotates the reconstruction forward again. Rotations are orthogonal, so the error norm is the
//    same in both spaces.
//  - scale ([layer * 2 + kind] -> [kv_heads * head_dim], positive): channel weights applied after
//    the rotation and divided out after decoding. With weights sqrt(E[q_d^2]) for keys, the
//    squared error the k-means minimises is the expected squared attention-logit error.
struct CodeSpace {
  std::vector<float> key_rope_inv_freq;
  std::vector<std::vector<float>> scale;
  bool empty() const;
  bool scaled() const;
  // InvalidArgument unless sizes match the geometry and every value is finite (scales > 0).
  absl::Status Validate(int layers, int kv_heads, int head_dim) const;
  std::string DebugString() const;  // "rope+scale", "rope", "scale" or "identity"
};

// In place: rows x[t] ([kv_heads, head_dim] each, t < positions.size()) of (layer, kind) into
// the code space (ToCodeSpace) or back (FromCodeSpace); row t sits at sequence position
// positions[t]. A no-op for an empty code space.
void ToCodeSpace(const CodeSpace& cs, int layer, int kind, int kv_heads, int head_dim,
                 absl::Span<const int64_t> positions, float* x);
void FromCodeSpace(const CodeSpace& cs, int layer, int kind, int kv_heads, int head_dim,
                   absl::Span<const int64_t> positions, float* x);
// Position of every sample row: sequence i of samples.seq_lens starts at seq_starts[i] (0 when
// absent).
std::vector<int64_t> SamplePositions(const KvSamples& samples);
// K and V of `samples` mapped into the code space (queries unchanged).
KvSamples SamplesInCodeSpace(const CodeSpace& cs, const KvSamples& samples);

class Codebook {
 public:
  // Takes tables in the order (l, c, h) with h only when per_head; each holds
  // stages*size*head_dim floats, in `code_space`. Validates sizes and finiteness and computes
  // the id.
  static absl::StatusOr<Codebook> Create(RvqConfig config, std::vector<std::vector<float>> tables,
                                         CodeSpace code_space = {});
  static absl::StatusOr<Codebook> Load(const std::string& path);
  static absl::StatusOr<Codebook> FromBytes(std::string bytes, const std::string& what);
  std::string Serialize() const;
  absl::Status Save(const std::string& path) const;

  const RvqConfig& config() const { return config_; }
  const std::string& id() const { return id_; }  // 32 hex chars
  const CodeSpace& code_space() const { return code_space_; }
  // Pointer to stage `stage` of (layer, kind, head): [size, head_dim].
  const float* Table(int layer, int kind, int head, int stage) const;
  // Squared norms of the codewords of the same table: [size].
  const float* Norms(int layer, int kind, int head, int stage) const;
  int TableIndex(int layer, int kind, int head) const;

 private:
  RvqConfig config_;
  std::vector<std::vector<float>> tables_, norms_;
  CodeSpace code_space_;
  std::string id_;
};

}  // namespace vqkv::kernels
