// The codec interface: batched encode/decode of KV blocks, and the registry that creates codecs
// by name ("raw", "scalar", "rvq").
//
// Encoded payload layout (little-endian), identical for every codec:
//   PayloadHeader (48 bytes) | sink tokens (lossless, fp32 of the input dtype's values as the
//   input dtype) | codec body
// The header makes a payload self-describing: shape, input dtype, codec kind, sink count and,
// for rvq, the first 8 bytes of the codebook id (checked on decode).
//
// Thread-safety: a Codec is immutable after creation; Encode/Decode may be called concurrently.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/kv.h"

namespace vqkv::kernels {

class Codebook;

enum class CodecKind : uint8_t { kRaw = 0, kScalar = 1, kRvq = 2 };

#pragma pack(push, 1)
struct PayloadHeader {
  char magic[4];    // "VQKB"
  uint8_t version;  // 1
  uint8_t kind;     // CodecKind
  uint8_t dtype;    // DType of the encoded input (and of the sink tokens)
  uint8_t param;    // scalar: bits; rvq: beam width used; raw: 0
  int32_t layers, tokens, kv_heads, head_dim;
  int32_t sink_tokens;      // leading tokens of this block stored losslessly
  int32_t group;            // scalar: group size; rvq: outlier tokens per layer; raw: 0
  uint8_t codebook_tag[8];  // rvq: first 8 bytes of the codebook id; zero otherwise
  int32_t first_layer;      // model layer of the block's layer 0 (layer-range blocks)
  int32_t first_token;      // sequence position of the block's token 0 (-1: beyond int32;
                            // written as 0 by older encoders); rvq with a pre-RoPE code
                            // space needs it to rotate keys back
};
#pragma pack(pop)
static_assert(sizeof(PayloadHeader) == 48);

// The header's first_token field for a block starting at `first_token` (-1 past int32).
inline int32_t HeaderFirstToken(int64_t first_token) {
  return first_token <= INT32_MAX ? static_cast<int32_t>(first_token) : -1;
}

// Parses and validates a payload's header (magic, version, kind, dtype, shape). InvalidArgument
// on garbage.
absl::StatusOr<PayloadHeader> ReadPayloadHeader(std::string_view payload);
KvShape HeaderShape(const PayloadHeader& h);

// How a codec is chosen. `name` is "raw", "scalar" or "rvq".
struct CodecSpec {
  std::string name = "raw";
  int sink_tokens = 4;    // positions [0, sink_tokens) of a sequence stay lossless
  int scalar_bits = 2;    // scalar: 2 or 4
  int scalar_group = 32;  // scalar: group size (tokens for K, channels for V)
  int beam = 1;           // rvq: 1 = greedy; >1 = beam search of that width
  // rvq: in every block and layer, this many coded tokens also store their residual (or the
  // vector itself, if smaller) as int8 with an fp16 scale per head vector: first the sink-like
  // ones (K and V both below half the block's median norm: the attention sinks inside a long
  // context, rare small-norm vectors that draw much of the attention), then those with the
  // largest relative error (K and V, all heads). 0 = off. A fixed count per block, so payload
  // sizes stay a function of the shape.
  int outliers = 0;
  std::shared_ptr<const Codebook> codebook;  // rvq: required
};

// Parses "raw", "scalar-2", "scalar-4", "scalar-2:group=64", "rvq", "rvq:beam=4,outliers=2",
// "raw:sinks=0"... into a spec (codebook left empty). InvalidArgument on unknown names/keys.
absl::StatusOr<CodecSpec> ParseCodecSpec(std::string_view text);
std::string CodecSpecString(const CodecSpec& spec);

class Codec {
 public:
  virtual ~Codec() = default;

  // Short label, e.g. "raw", "scalar-2/g32", "rvq(k7x1024,v2x512)".
  virtual std::string Label() const = 0;
  virtual CodecKind kind() const = 0;
  const CodecSpec& spec() const { return spec_; }

  // Encodes each block into a self-describing payload appended to `out` (one per block, in
  // order). InvalidArgument if a shape is invalid, does not match the codebook (rvq), the dtype
  // is unknown, or any value is NaN/Inf; nothing is appended then.
  absl::Status Encode(absl::Span<const KvBlockView> blocks, std::vector<std::string>* out) const;

  // Decodes payloads into caller buffers: out[i] must hold shape.elements() values of
  // `out_dtype` (`out_bytes[i]` bytes are available). InvalidArgument for garbage, truncated
  // payloads, too-small buffers, or a payload of another codec; FailedPrecondition for a
  // codebook mismatch.
  absl::Status Decode(absl::Span<const std::string_view> payloads, DType out_dtype,
                      absl::Span<void* const> out, absl::Span<const size_t> out_bytes) const;

  // Convenience: decode one payload to fp32.
  absl::StatusOr<std::vector<float>> DecodeToFloat(std::string_view payload) const;

  // Batched forms, for callers that hand over many blocks at once (the daemon's put and get
  // batches). Same contracts and results as Encode/Decode; a backend that does a whole batch in
  // one pass (the CUDA codecs: one upload, one launch, one download instead of a GPU round trip
  // per block) overrides them. The defaults call Encode/Decode.
  virtual absl::Status EncodeBatched(absl::Span<const KvBlockView> blocks,
                                     std::vector<std::string>* out) const {
    return Encode(blocks, out);
  }
  virtual absl::Status DecodeBatched(absl::Span<const std::string_view> payloads, DType out_dtype,
                                     absl::Span<void* const> out,
                                     absl::Span<const size_t> out_bytes) const {
    return Decode(payloads, out_dtype, out, out_bytes);
  }

  // Exact payload size of a block of `shape`/`dtype` whose first token is `first_token`.
  virtual int64_t PayloadBytes(const KvShape& shape, DType dtype, int64_t first_token,
                               int first_layer = 0) const;

 protected:
  explicit Codec(CodecSpec spec) : spec_(std::move(spec)) {}

  // Body of one block. `x` holds shape.elements() fp32 values (the whole block, sinks included;
  // sink tokens are written separately by the caller and may be ignored here). Appends to body.
  virtual absl::Status EncodeBody(const PayloadHeader& h, const float* x,
                                  std::string* body) const = 0;
  // Reconstructs all non-sink tokens into `x` (fp32, shape.elements()).
  virtual absl::Status DecodeBody(const PayloadHeader& h, std::string_view body,
                                  float* x) const = 0;
  virtual int64_t BodyBytes(const KvShape& shape, int sinks, DType dtype,
                            int first_layer) const = 0;
  virtual absl::Status CheckShape(const KvShape& shape, int first_layer) const;
  virtual void FillHeader(PayloadHeader* h) const;

  // Byte-level fast path for codecs that store the input as is (raw): when true, Encode checks
  // finiteness on the raw bits and calls EncodeBodyBytes instead of converting to fp32, and
  // Decode to the payload's own dtype calls DecodeBodyBytes.
  virtual bool BytePassthrough() const { return false; }
  // `block` is the whole input block in h.dtype.
  virtual absl::Status EncodeBodyBytes(const PayloadHeader& h, const char* block,
                                       std::string* body) const;
  // Writes the non-sink tokens of `body` (h.dtype) into `out` (same dtype, block layout).
  virtual absl::Status DecodeBodyBytes(const PayloadHeader& h, std::string_view body,
                                       char* out) const;

  CodecSpec spec_;
};

using CodecFactory = std::function<absl::StatusOr<std::unique_ptr<Codec>>(const CodecSpec&)>;

// Registers a factory under `name` (done at static-init time by each codec's .cc).
bool RegisterCodec(const std::string& name, CodecFactory factory);
// Creates the codec named by spec.name. InvalidArgument for unknown names or bad parameters;
// FailedPrecondition for rvq without a codebook.
absl::StatusOr<std::unique_ptr<Codec>> CreateCodec(const CodecSpec& spec);
std::vector<std::string> RegisteredCodecs();

}  // namespace vqkv::kernels
