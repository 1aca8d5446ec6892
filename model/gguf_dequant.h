// Dequantization of ggml tensor data to fp32: F32, F16, BF16, Q4_0, Q4_1 and Q8_0, with the
// exact arithmetic of llama.cpp's reference (gguf-py quants.py): Q4_1 is d * q + m and Q8_0 /
// Q4_0 are d * q, evaluated in fp32 with the fp16 scales widened exactly, so results are
// bit-identical to it.
// Block layouts (32 values per block, little-endian):
//   Q4_0: fp16 d, 16 bytes of nibbles; value j < 16 is the low nibble of byte j, value
//         j >= 16 the high nibble of byte j - 16; x = d * (q - 8).
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles as Q4_0; x = d * q + m.
//   Q8_0: fp16 d, 32 int8; x = d * q.
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace vqkv::model {

// Values per block and bytes per block of ggml type `type`; Unimplemented for other types.
struct GgmlBlock {
  int64_t values = 0;
  int64_t bytes = 0;
};
absl::StatusOr<GgmlBlock> GgmlBlockOf(uint32_t type);

// Bytes that `elements` values of `type` occupy. Unimplemented for unknown types;
// InvalidArgument when `elements` is not a multiple of the block size or the size overflows.
absl::StatusOr<uint64_t> GgmlTensorBytes(uint32_t type, int64_t elements);

// Writes `elements` fp32 values decoded from `data` (which must hold exactly
// GgmlTensorBytes(type, elements) bytes) to `out`. Unimplemented for unknown types;
// InvalidArgument on a size mismatch.
absl::Status Dequantize(uint32_t type, std::string_view data, int64_t elements, float* out);

}  // namespace vqkv::model
