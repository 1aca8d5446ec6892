// The GPU codecs behind the Codec interface: "rvq-cuda" and "scalar-cuda". Their payloads are
// byte-compatible with the CPU "rvq" and "scalar" codecs (same kind byte, same body layout):
// a payload encoded on one decodes on the other. rvq codes agree with the CPU's except at
// near-ties (see rvq_encode.cu); scalar codes are identical.
//
// Through Codec::Encode/Decode each block is one GPU round trip (host fp32 in, host bytes out).
// EncodeBatch/DecodeBatch (and Codec::EncodeBatched/DecodeBatched, which call them) do all
// blocks in one GPU pass and produce the same payloads/outputs.
// Device-resident data should use gpu_rvq.h / gpu_scalar.h directly.
//
// The codecs use the device that was current when they were created. Creating one without a
// usable device fails with FailedPrecondition. rvq-cuda with beam > 1, or with a codebook that
// has a code space (keys before RoPE, channel scales: kernels/codebook.h), returns the CPU rvq
// codec; EncodeBatch/DecodeBatch then run that codec's own batched path.
// Thread-safety: immutable after creation; Encode/Decode may be called concurrently (each call
// uses its own stream and scratch).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/codec.h"

namespace vqkv::kernels::cuda {

class DeviceCodebook;

// Registers "rvq-cuda" and "scalar-cuda" with kernels::RegisterCodec (idempotent). Returns
// whether a CUDA device is usable in this process; the daemon can pick the GPU codecs then.
bool RegisterCudaCodecs();

absl::StatusOr<std::unique_ptr<Codec>> NewCudaRvqCodec(const CodecSpec& spec);
absl::StatusOr<std::unique_ptr<Codec>> NewCudaScalarCodec(const CodecSpec& spec);

// The device copy of `cb` on the current device, shared by every codec using that codebook
// (kept while any holder lives).
absl::StatusOr<std::shared_ptr<const DeviceCodebook>> GetDeviceCodebook(
    std::shared_ptr<const Codebook> cb);

// Batched encode/decode for codecs created by the factories above. `codec` must be an
// rvq-cuda or scalar-cuda codec (InvalidArgument otherwise). Same contracts as Codec::Encode
// and Codec::Decode.
absl::Status EncodeBatch(const Codec& codec, absl::Span<const KvBlockView> blocks,
                         std::vector<std::string>* out);
absl::Status DecodeBatch(const Codec& codec, absl::Span<const std::string_view> payloads,
                         DType out_dtype, absl::Span<void* const> out,
                         absl::Span<const size_t> out_bytes);

}  // namespace vqkv::kernels::cuda
