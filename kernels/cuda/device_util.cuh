// Small device helpers shared by the .cu files: element loads/stores in fp32/fp16/bf16, PTX
// wrappers (cp.async, ldmatrix, mma.sync) and warp reductions.
// Thread-safety: device functions only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda::detail {

__device__ __forceinline__ float LoadElem(const void* base, int64_t i, ElemType t) {
  switch (t) {
    case ElemType::kF16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case ElemType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void StoreElem(void* base, int64_t i, ElemType t, float v) {
  switch (t) {
    case ElemType::kF16:
      static_cast<__half*>(base)[i] = __float2half_rn(v);
      break;
    case ElemType::kBF16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

__device__ __forceinline__ int ElemBytes(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(SmemAddr(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void Ldmatrix4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                          const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(SmemAddr(smem)));
}

// d += a (16x16 fp16, row) * b (16x8 fp16, col), fp32 accumulation.
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Reads `bits` (1..16) bits at bit position `pos` of an LSB-first stream of 32-bit words. Only
// words holding some of those bits are read.
__device__ __forceinline__ uint32_t ReadBits(const uint32_t* words, int64_t pos, int bits) {
  const int64_t w = pos >> 5;
  const uint32_t sh = static_cast<uint32_t>(pos & 31);
  const uint32_t lo = words[w];
  const uint32_t hi = sh + bits > 32 ? words[w + 1] : 0u;
  return __funnelshift_r(lo, hi, sh) & ((1u << bits) - 1u);
}

}  // namespace vqkv::kernels::cuda::detail
