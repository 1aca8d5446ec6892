// Plain parameter structs and launchers of the scalar (KIVI-style) CUDA kernels. They produce
// and read exactly the CPU scalar codec's body (kernels/scalar_codec.cc):
//   K params [layers, heads, D, ceil(T'/G)] x {scale, zero} fp16   (per channel, G tokens)
//   V params [layers, T', heads, ceil(D/Gv)] x {scale, zero} fp16  (per token, Gv channels)
//   K codes  [layers, heads, D, T'] packed LSB-first, `bits` each
//   V codes  [layers, T', heads, D] packed, starting at the next byte
// with T' = tokens - sinks, Gv = min(G, D). Offsets are those of ScalarBodyLayout().
// Thread-safety: launchers are reentrant; concurrent launches must not share output buffers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {

struct ScalarBodyLayout {
  int64_t k_groups = 0, v_groups = 0;
  int64_t k_params = 0, v_params = 0;  // byte offsets
  int64_t k_codes = 0, v_codes = 0;    // byte offsets
  int64_t bytes = 0;                   // body size (== the CPU codec's BodyBytes)
};
#if defined(__CUDACC__)
#define VQKV_HOST_DEVICE __host__ __device__
#else
#define VQKV_HOST_DEVICE
#endif

VQKV_HOST_DEVICE inline ScalarBodyLayout ComputeScalarBodyLayout(int layers, int tokens, int heads,
                                                                 int dim, int bits, int group) {
  ScalarBodyLayout b;
  const int gv = group < dim ? group : dim;
  b.k_groups = int64_t(layers) * heads * dim * ((tokens + group - 1) / group);
  b.v_groups = int64_t(layers) * tokens * heads * ((dim + gv - 1) / gv);
  const int64_t n = int64_t(layers) * tokens * heads * dim;
  const int64_t packed = (n * bits + 7) / 8;
  b.k_params = 0;
  b.v_params = b.k_groups * 4;
  b.k_codes = (b.k_groups + b.v_groups) * 4;
  b.v_codes = b.k_codes + packed;
  b.bytes = b.v_codes + packed;
  return b;
}

struct ScalarBlock {
  const void* in = nullptr;  // quantize: [layers, 2, tokens, heads, D] of in_type
  void* out = nullptr;       // dequantize: same layout, out_type (sink rows untouched)
  uint32_t* body = nullptr;  // 4-byte aligned body (quantize writes, dequantize reads)
  int32_t tokens = 0;
  int32_t sinks = 0;
  // ScalarBodyLayout's v_params, k_codes and v_codes divided by 4 (whole words where the fast
  // quantize paths use them); filled by the host wrapper.
  int64_t v_params_w = 0, k_codes_w = 0, v_codes_w = 0;
};

struct ScalarParams {
  const ScalarBlock* blocks = nullptr;
  int32_t num_blocks = 0;
  int32_t layers = 0, heads = 0, dim = 0;
  int32_t bits = 2, group = 32;
  ElemType type = ElemType::kF16;  // in_type for quantize, out_type for dequantize
  int32_t* error_flag = nullptr;   // quantize: 1 when a scale/zero overflows fp16 or a value is
                                   // not finite
  int32_t align = 1;     // largest power of two (<= 16) dividing every block's `in` (quantize) or
                         // `out` (dequantize) address; 8 or 16 enable the vector paths
  int32_t t1_align = 1;  // largest power of two (<= 32) dividing every block's tokens - sinks;
                         // quantize takes the word-aligned K path when t1_align * bits >= 32
};

// Quantize writes every byte of the body (parameters, codes, zero padding up to the next 4-byte
// boundary); bodies need no clearing. `max_tokens` = the largest block's non-sink token count.
cudaError_t LaunchScalarQuantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t stream);
cudaError_t LaunchScalarDequantize(const ScalarParams& p, int32_t max_tokens, cudaStream_t stream);

}  // namespace vqkv::kernels::cuda
