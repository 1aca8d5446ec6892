// Conversions between vqkv::DType and the wire enum vqkv.v1.DType, shared by the client and the
// service so both ends map dtypes the same way.
// Thread-safety: pure functions.
#pragma once

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "vqkv/v1/vqkv.pb.h"

namespace vqkv::proto {

inline v1::DType ToProto(DType d) {
  switch (d) {
    case DType::kF32:
      return v1::DTYPE_F32;
    case DType::kF16:
      return v1::DTYPE_F16;
    case DType::kBF16:
      return v1::DTYPE_BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

// DTYPE_UNSPECIFIED gives `fallback`; values outside the enum are InvalidArgument.
inline absl::StatusOr<DType> FromProto(v1::DType d, DType fallback) {
  switch (d) {
    case v1::DTYPE_UNSPECIFIED:
      return fallback;
    case v1::DTYPE_F32:
      return DType::kF32;
    case v1::DTYPE_F16:
      return DType::kF16;
    case v1::DTYPE_BF16:
      return DType::kBF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(d)));
  }
}

}  // namespace vqkv::proto
