// rvq on the GPU for data already in device memory: batched encode of many KV blocks (all
// layers, K and V, in one launch), bit packing into the CPU codec's body format, and decode
// straight into the caller's KV layout (contiguous, vLLM paged, SGLang, TensorRT-LLM).
//
// Body format: identical to the CPU rvq codec (rvq_codec.cc): one LSB-first bit stream over
// (layer, K/V, non-sink token, head, stage), so bodies move freely between GPU and CPU.
// Codes: uint16, in the same stream order, CodesPerToken(config) per non-sink token.
//
// All functions enqueue on `stream` and return without waiting, except where check_finite asks
// for the input check (one synchronization at the end). Device pointers must belong to the
// device of the DeviceCodebook, which must be current.
// Thread-safety: functions are reentrant; calls on different streams may run concurrently.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "kernels/cuda/device_codebook.h"
#include "kernels/cuda/rvq_kernels.h"
#include "kernels/kv.h"

namespace vqkv::kernels::cuda {

// A block to encode, in device memory.
struct DeviceKvBlock {
  KvShape shape;
  DType dtype = DType::kF16;
  const void* data = nullptr;  // [layers, 2, tokens, kv_heads, head_dim]
  int sinks = 0;               // leading tokens left out of the codes (kept losslessly elsewhere)
  int first_layer = 0;         // model layer of the block's layer 0 (layer-range blocks)
};

// An encoded block to reconstruct.
struct DeviceRvqBody {
  KvShape shape;
  int sinks = 0;
  const uint8_t* body = nullptr;    // 4-byte aligned, RvqBodyBytes rounded up to 4 readable
  const void* sink_data = nullptr;  // optional [layers, 2, sinks, heads, dim] of sink_dtype,
                                    // written to the output's sink tokens when set
  DType sink_dtype = DType::kF16;
  void* out = nullptr;    // kContiguous: [layers, 2, tokens, heads, dim], 16-byte aligned
  int32_t block_id = 0;   // kVllm / kTrtllm: destination page
  int64_t slot_base = 0;  // kSglang: index into KvLayout::slots of the block's token 0
  int first_layer = 0;    // model layer of the block's layer 0 (paged layouts index by it)
};

// Where decoded tokens go (all pointers are device pointers, 16-byte aligned).
struct KvLayout {
  KvLayoutKind kind = KvLayoutKind::kContiguous;
  DType dtype = DType::kF16;       // f16, bf16 or f32
  std::vector<void*> layer_ptrs;   // kVllm: (2, pages, page_tokens, heads, dim) per layer;
                                   // kSglang: K buffer [slots, heads, dim] per layer
  std::vector<void*> layer_ptrs2;  // kSglang: V buffer per layer
  void* pool = nullptr;            // kTrtllm: [pages, layers, 2, heads, page_tokens, dim]
  const int64_t* slots = nullptr;  // kSglang: slot of each token (device array)
  int32_t num_pages = 0;           // kVllm / kTrtllm
  int32_t page_tokens = 0;         // kVllm / kTrtllm (>= every block's tokens)
};

struct GpuRvqOptions {
  // false: the exact fp32 kernel (slow; a reference). Head dims other than 64/96/128/256 always
  // use it.
  bool tensor_cores = true;
  // Decode gathers fp16 copies of the codewords (half the bytes; decoded NMSE ~1e-7 against the
  // fp32 tables). false: gather the fp32 tables (bit-exact sums).
  bool fp16_decode_tables = true;
  // Encode: check the inputs for NaN/Inf (InvalidArgument), which costs one stream sync.
  bool check_finite = true;
  // Encode tile configuration (benchmarks compare them; 0 is the measured best).
  int encode_variant = 0;
};

// Codes per non-sink token of model layers [first_layer, first_layer + layers) (K and V, heads,
// stages) and the packed body size of such a block (== the CPU rvq codec's).
int64_t RvqCodesPerToken(const RvqConfig& cfg, int first_layer, int layers);
int64_t RvqBodyBytes(const RvqConfig& cfg, const KvShape& shape, int sinks, int first_layer);

// Encodes blocks into uint16 codes: block b's codes start at codes + sum over earlier blocks of
// (tokens - sinks) * RvqCodesPerToken(their layers). InvalidArgument for shapes that do not match
// the codebook, bad dtypes or null pointers (and, with check_finite, NaN/Inf inputs).
absl::Status RvqEncodeCodes(const DeviceCodebook& cb, absl::Span<const DeviceKvBlock> blocks,
                            uint16_t* codes, cudaStream_t stream, const GpuRvqOptions& opts = {});

// Packs codes laid out as RvqEncodeCodes writes them into bodies[b] (device, 4-byte aligned,
// RvqBodyBytes rounded up to 4 bytes writable).
absl::Status RvqPackCodes(const DeviceCodebook& cb, absl::Span<const DeviceKvBlock> blocks,
                          const uint16_t* codes, absl::Span<uint8_t* const> bodies,
                          cudaStream_t stream);

// RvqEncodeCodes + RvqPackCodes with internal scratch for the codes.
absl::Status RvqEncode(const DeviceCodebook& cb, absl::Span<const DeviceKvBlock> blocks,
                       absl::Span<uint8_t* const> bodies, cudaStream_t stream,
                       const GpuRvqOptions& opts = {});

// Reconstructs every non-sink token of every block into `layout` (and the sink tokens of
// blocks that carry sink_data). InvalidArgument for mismatched shapes, null or misaligned
// pointers, or pages out of range.
absl::Status RvqDecode(const DeviceCodebook& cb, absl::Span<const DeviceRvqBody> blocks,
                       const KvLayout& layout, cudaStream_t stream, const GpuRvqOptions& opts = {});

}  // namespace vqkv::kernels::cuda
