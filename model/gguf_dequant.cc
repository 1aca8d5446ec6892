#include "model/gguf_dequant.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "model/gguf.h"

namespace vqkv::model {
namespace {

constexpr int kQK = 32;  // values per block of the 4/8-bit types

uint16_t Le16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// The product and the sum are rounded separately (no fused multiply-add) so that the result
// matches numpy's `d * q + m` bit for bit even where the compiler could contract them.
inline float MulAdd(float d, float q, float m) {
  volatile float p = d * q;
  return p + m;
}

}  // namespace

absl::StatusOr<GgmlBlock> GgmlBlockOf(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      return GgmlBlock{1, 4};
    case GgmlType::kF16:
    case GgmlType::kBF16:
      return GgmlBlock{1, 2};
    case GgmlType::kQ4_0:
      return GgmlBlock{kQK, 2 + kQK / 2};
    case GgmlType::kQ4_1:
      return GgmlBlock{kQK, 4 + kQK / 2};
    case GgmlType::kQ8_0:
      return GgmlBlock{kQK, 2 + kQK};
  }
  return absl::UnimplementedError(
      absl::StrCat("ggml tensor type ", GgmlTypeName(type), " is not supported"));
}

absl::StatusOr<uint64_t> GgmlTensorBytes(uint32_t type, int64_t elements) {
  absl::StatusOr<GgmlBlock> b = GgmlBlockOf(type);
  if (!b.ok()) return b.status();
  if (elements < 0 || elements % b->values != 0) {
    return absl::InvalidArgumentError(absl::StrCat(elements, " elements of ", GgmlTypeName(type),
                                                   " are not a whole number of ", b->values,
                                                   "-value blocks"));
  }
  const uint64_t blocks = static_cast<uint64_t>(elements / b->values);
  if (blocks > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(b->bytes)) {
    return absl::InvalidArgumentError("tensor byte size overflows");
  }
  return blocks * static_cast<uint64_t>(b->bytes);
}

absl::Status Dequantize(uint32_t type, std::string_view data, int64_t elements, float* out) {
  absl::StatusOr<uint64_t> need = GgmlTensorBytes(type, elements);
  if (!need.ok()) return need.status();
  if (data.size() != *need) {
    return absl::InvalidArgumentError(absl::StrCat(GgmlTypeName(type), " data of ", data.size(),
                                                   " bytes, expected ", *need, " for ", elements,
                                                   " values"));
  }
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      std::memcpy(out, p, data.size());
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < elements; ++i) out[i] = HalfToFloat(Le16(p + 2 * i));
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < elements; ++i) out[i] = BF16ToFloat(Le16(p + 2 * i));
      break;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < elements / kQK; ++b, p += 2 + kQK / 2, out += kQK) {
        const float d = HalfToFloat(Le16(p));
        const unsigned char* qs = p + 2;
        for (int j = 0; j < kQK / 2; ++j) {
          out[j] = d * static_cast<float>((qs[j] & 0x0F) - 8);
          out[j + kQK / 2] = d * static_cast<float>((qs[j] >> 4) - 8);
        }
      }
      break;
    case GgmlType::kQ4_1:
      for (int64_t b = 0; b < elements / kQK; ++b, p += 4 + kQK / 2, out += kQK) {
        const float d = HalfToFloat(Le16(p)), m = HalfToFloat(Le16(p + 2));
        const unsigned char* qs = p + 4;
        for (int j = 0; j < kQK / 2; ++j) {
          out[j] = MulAdd(d, static_cast<float>(qs[j] & 0x0F), m);
          out[j + kQK / 2] = MulAdd(d, static_cast<float>(qs[j] >> 4), m);
        }
      }
      break;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < elements / kQK; ++b, p += 2 + kQK, out += kQK) {
        const float d = HalfToFloat(Le16(p));
        for (int j = 0; j < kQK; ++j)
          out[j] = d * static_cast<float>(static_cast<int8_t>(p[2 + j]));
      }
      break;
  }
  return absl::OkStatus();
}

}  // namespace vqkv::model
