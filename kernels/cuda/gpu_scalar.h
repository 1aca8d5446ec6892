// Scalar (KIVI-style) quantization on the GPU for data in device memory. Bodies are byte-for-byte
// the CPU scalar codec's (see scalar_kernels.h), so they move freely between GPU and CPU.
// Functions enqueue on `stream`; check_finite adds one synchronization.
// Thread-safety: reentrant; calls on different streams may run concurrently.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "kernels/cuda/scalar_kernels.h"
#include "kernels/kv.h"

namespace vqkv::kernels::cuda {

struct ScalarSpec {
  int bits = 2;    // 2 or 4
  int group = 32;  // tokens per K group, channels per V group (capped at head_dim)
};

struct DeviceScalarBlock {
  KvShape shape;  // every block of a call has the same layers, heads and head_dim
  int sinks = 0;
  const void* in = nullptr;  // quantize: [layers, 2, tokens, heads, dim] of the call's dtype
  void* out = nullptr;       // dequantize: same layout; sink rows are left untouched
  uint8_t* body = nullptr;   // 4-byte aligned; ScalarBodyBytes rounded up to 4 bytes
};

int64_t ScalarBodyBytes(const KvShape& shape, int sinks, const ScalarSpec& spec);

// Quantizes blocks[i].in into blocks[i].body. InvalidArgument for bad shapes/specs/pointers and,
// with check_finite, for NaN/Inf inputs or groups whose scale overflows fp16.
absl::Status ScalarQuantize(absl::Span<const DeviceScalarBlock> blocks, DType in_dtype,
                            const ScalarSpec& spec, cudaStream_t stream, bool check_finite = true);
// Dequantizes blocks[i].body into blocks[i].out (non-sink tokens).
absl::Status ScalarDequantize(absl::Span<const DeviceScalarBlock> blocks, DType out_dtype,
                              const ScalarSpec& spec, cudaStream_t stream);

}  // namespace vqkv::kernels::cuda
