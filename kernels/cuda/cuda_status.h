// Conversion of CUDA runtime errors to absl::Status, done once per operation by the host
// wrappers (launchers return cudaError_t), and a few device-query helpers.
// Thread-safety: pure functions.
#pragma once

#include <cuda_runtime_api.h>

#include <string_view>

#include "absl/status/status.h"

namespace vqkv::kernels::cuda {

// OK for cudaSuccess; otherwise ResourceExhausted for out-of-memory, InvalidArgument for invalid
// values/pointers, Unavailable when no device is usable, Internal for the rest. The message
// names `op` and the CUDA error.
absl::Status CudaStatus(cudaError_t e, std::string_view op);

// True when at least one CUDA device can be used by this process.
bool CudaDeviceAvailable();

}  // namespace vqkv::kernels::cuda

#define VQKV_CUDA_RETURN_IF_ERROR(expr, op)                         \
  do {                                                              \
    const cudaError_t vqkv_cuda_err_ = (expr);                      \
    if (vqkv_cuda_err_ != cudaSuccess) {                            \
      return ::vqkv::kernels::cuda::CudaStatus(vqkv_cuda_err_, op); \
    }                                                               \
  } while (0)
