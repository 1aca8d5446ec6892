// Device helpers of gpu_bench (see bench_kernels.cu). Raw pointers, enqueue on a stream, return
// the launch error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vqkv::bench {

// n fp16 values ~ N(0,1) + a per-channel offset ~ N(0, 4) (channel = index % dim), like the
// tests' RandomKv.
cudaError_t FillRandomKv(void* out_f16, int64_t n, int dim, uint64_t seed, cudaStream_t s);
// Reads `bytes` (16-byte aligned) `reps` times with L2-cached loads.
cudaError_t L2Read(const void* p, int64_t bytes, int reps, uint32_t* sink, int blocks,
                   cudaStream_t s);
// cuBLAS variant, one stage: argmin over scores (fp32 r.c), residual update, fp16 copy.
cudaError_t ArgminUpdate(const float* scores, const float* norms, const float* cb32, float* r,
                         void* r16, uint16_t* codes, int64_t n, int size, int dim, int stage,
                         int stages, cudaStream_t s);
cudaError_t FloatToHalf(const float* in, void* out, int64_t n, cudaStream_t s);
cudaError_t HalfToFloat(const void* in, float* out, int64_t n, cudaStream_t s);

}  // namespace vqkv::bench
