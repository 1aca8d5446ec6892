// Factories of the built-in CPU codecs (used by the registry in codec.cc).
// Thread-safety: see codec.h.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "kernels/codec.h"

namespace vqkv::kernels {

absl::StatusOr<std::unique_ptr<Codec>> NewRawCodec(const CodecSpec& spec);
absl::StatusOr<std::unique_ptr<Codec>> NewScalarCodec(const CodecSpec& spec);
absl::StatusOr<std::unique_ptr<Codec>> NewRvqCodec(const CodecSpec& spec);

}  // namespace vqkv::kernels
