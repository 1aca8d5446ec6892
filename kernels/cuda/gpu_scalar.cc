#include "kernels/cuda/gpu_scalar.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"

namespace vqkv::kernels::cuda {
namespace {

absl::Status CheckSpec(const ScalarSpec& spec) {
  if (spec.bits != 2 && spec.bits != 4) {
    return absl::InvalidArgumentError(absl::StrCat("scalar: bits must be 2 or 4, got ", spec.bits));
  }
  if (spec.group < 1 || spec.group > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("scalar: group must be in [1, 4096], got ", spec.group));
  }
  return absl::OkStatus();
}

absl::Status Prepare(absl::Span<const DeviceScalarBlock> blocks, const ScalarSpec& spec,
                     bool quantize, std::vector<ScalarBlock>* out, int* max_tokens) {
  VQKV_RETURN_IF_ERROR(CheckSpec(spec));
  *max_tokens = 0;
  const KvShape& s0 = blocks[0].shape;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const DeviceScalarBlock& blk = blocks[b];
    VQKV_RETURN_IF_ERROR(ValidateShape(blk.shape));
    if (blk.shape.layers != s0.layers || blk.shape.kv_heads != s0.kv_heads ||
        blk.shape.head_dim != s0.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("scalar: block ", b, " has another layers/heads/head_dim than block 0"));
    }
    if (blk.sinks < 0 || blk.sinks > blk.shape.tokens) {
      return absl::InvalidArgumentError(absl::StrCat("scalar: block ", b, " bad sinks"));
    }
    const bool has_codes = blk.shape.tokens > blk.sinks;
    if (has_codes && (blk.body == nullptr || reinterpret_cast<uintptr_t>(blk.body) % 4 != 0 ||
                      (quantize ? blk.in == nullptr : blk.out == nullptr))) {
      return absl::InvalidArgumentError(
          absl::StrCat("scalar: block ", b, " has a null pointer or an unaligned body"));
    }
    ScalarBlock sb;
    sb.in = blk.in;
    sb.out = blk.out;
    sb.body = reinterpret_cast<uint32_t*>(blk.body);
    sb.tokens = blk.shape.tokens;
    sb.sinks = blk.sinks;
    const ScalarBodyLayout lay =
        ComputeScalarBodyLayout(blk.shape.layers, blk.shape.tokens - blk.sinks, blk.shape.kv_heads,
                                blk.shape.head_dim, spec.bits, spec.group);
    sb.v_params_w = lay.v_params / 4;
    sb.k_codes_w = lay.k_codes / 4;
    sb.v_codes_w = lay.v_codes / 4;
    out->push_back(sb);
    *max_tokens = std::max(*max_tokens, blk.shape.tokens - blk.sinks);
  }
  return absl::OkStatus();
}

// Largest power of two (<= 16) dividing the data address of every block that has codes.
int32_t Alignment(absl::Span<const DeviceScalarBlock> blocks, bool quantize) {
  uintptr_t bits = 16;
  for (const DeviceScalarBlock& blk : blocks) {
    if (blk.shape.tokens <= blk.sinks) continue;
    bits |= reinterpret_cast<uintptr_t>(quantize ? blk.in : static_cast<const void*>(blk.out));
  }
  return static_cast<int32_t>(bits & (~bits + 1));
}

// Largest power of two (<= 32) dividing the non-sink token count of every block that has codes.
int32_t TokenAlignment(absl::Span<const DeviceScalarBlock> blocks) {
  uint32_t bits = 32;
  for (const DeviceScalarBlock& blk : blocks) {
    if (blk.shape.tokens > blk.sinks) bits |= static_cast<uint32_t>(blk.shape.tokens - blk.sinks);
  }
  return static_cast<int32_t>(bits & (~bits + 1));
}

}  // namespace

int64_t ScalarBodyBytes(const KvShape& s, int sinks, const ScalarSpec& spec) {
  return ComputeScalarBodyLayout(s.layers, s.tokens - sinks, s.kv_heads, s.head_dim, spec.bits,
                                 spec.group)
      .bytes;
}

absl::Status ScalarQuantize(absl::Span<const DeviceScalarBlock> blocks, DType in_dtype,
                            const ScalarSpec& spec, cudaStream_t stream, bool check_finite) {
  if (blocks.empty()) return absl::OkStatus();
  std::vector<ScalarBlock> sb;
  int max_tokens = 0;
  VQKV_RETURN_IF_ERROR(Prepare(blocks, spec, true, &sb, &max_tokens));
  const KvShape& s0 = blocks[0].shape;
  StreamScratch scratch(stream);
  ScalarParams p;
  p.align = Alignment(blocks, true);
  p.t1_align = TokenAlignment(blocks);
  VQKV_ASSIGN_OR_RETURN(p.blocks, scratch.Upload(sb, "scalar blocks"));
  p.num_blocks = static_cast<int32_t>(sb.size());
  p.layers = s0.layers;
  p.heads = s0.kv_heads;
  p.dim = s0.head_dim;
  p.bits = spec.bits;
  p.group = spec.group;
  p.type = static_cast<ElemType>(static_cast<int32_t>(in_dtype));
  if (check_finite) {
    VQKV_ASSIGN_OR_RETURN(p.error_flag, scratch.Alloc<int32_t>(1, "error flag"));
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.error_flag, 0, 4, stream), "scalar: clear flag");
  }
  VQKV_CUDA_RETURN_IF_ERROR(LaunchScalarQuantize(p, max_tokens, stream), "scalar quantize kernel");
  if (check_finite) {
    int32_t bad = 0;
    VQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(&bad, p.error_flag, 4, cudaMemcpyDeviceToHost, stream),
        "scalar quantize: read flag");
    VQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "scalar quantize");
    if (bad) {
      return absl::InvalidArgumentError(
          "scalar quantize: input holds NaN/Inf or exceeds the fp16 range of scale/zero");
    }
  }
  return absl::OkStatus();
}

absl::Status ScalarDequantize(absl::Span<const DeviceScalarBlock> blocks, DType out_dtype,
                              const ScalarSpec& spec, cudaStream_t stream) {
  if (blocks.empty()) return absl::OkStatus();
  std::vector<ScalarBlock> sb;
  int max_tokens = 0;
  VQKV_RETURN_IF_ERROR(Prepare(blocks, spec, false, &sb, &max_tokens));
  const KvShape& s0 = blocks[0].shape;
  StreamScratch scratch(stream);
  ScalarParams p;
  p.align = Alignment(blocks, false);
  VQKV_ASSIGN_OR_RETURN(p.blocks, scratch.Upload(sb, "scalar blocks"));
  p.num_blocks = static_cast<int32_t>(sb.size());
  p.layers = s0.layers;
  p.heads = s0.kv_heads;
  p.dim = s0.head_dim;
  p.bits = spec.bits;
  p.group = spec.group;
  p.type = static_cast<ElemType>(static_cast<int32_t>(out_dtype));
  VQKV_CUDA_RETURN_IF_ERROR(LaunchScalarDequantize(p, max_tokens, stream),
                            "scalar dequantize kernel");
  return absl::OkStatus();
}

}  // namespace vqkv::kernels::cuda
