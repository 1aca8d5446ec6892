// Element types of KV tensors and conversions between fp32, fp16 and bf16 on the host.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace vqkv {

enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Bytes per element of `t`.
inline size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// "f32", "f16", "bf16".
std::string_view DTypeName(DType t);

// Parses "f32"/"float32"/"fp32", "f16"/"float16"/"fp16", "bf16"/"bfloat16";
// InvalidArgument otherwise.
absl::StatusOr<DType> ParseDType(std::string_view name);

// IEEE binary16 <-> binary32, round to nearest even; Inf/NaN preserved.
uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);

// bfloat16 <-> binary32, round to nearest even; NaN preserved.
inline uint16_t FloatToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float BF16ToFloat(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Converts `n` elements of type `src_type` at `src` to fp32 at `dst`.
void ToFloat(DType src_type, const void* src, size_t n, float* dst);
// Converts `n` fp32 values to `dst_type` at `dst`.
void FromFloat(const float* src, size_t n, DType dst_type, void* dst);

}  // namespace vqkv
