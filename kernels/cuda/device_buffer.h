// Device memory ownership for the host wrappers.
//  - DeviceBuffer: a cudaMalloc'ed block owned for the lifetime of an object (codebook tables).
//  - StreamScratch: stream-ordered scratch for one call (cudaMallocAsync / cudaFreeAsync), so
//    concurrent calls on different streams never share buffers and nothing is freed before
//    the kernels that use it have run.
// Thread-safety: objects are not shared between threads; distinct objects are independent.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_status.h"

namespace vqkv::kernels::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(o.bytes_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = o.bytes_;
    }
    return *this;
  }
  ~DeviceBuffer() { Reset(); }

  // ResourceExhausted when the device is out of memory.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, const std::string& what) {
    DeviceBuffer b;
    if (bytes > 0) {
      VQKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&b.ptr_, bytes), "cudaMalloc " + what);
    }
    b.bytes_ = bytes;
    return b;
  }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void Reset() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t stream) : stream_(stream) {}
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  ~StreamScratch() {
    for (void* p : ptrs_) (void)cudaFreeAsync(p, stream_);
  }

  // Device memory valid for work enqueued on the stream before this object is destroyed.
  template <typename T>
  absl::StatusOr<T*> Alloc(size_t count, const char* what) {
    void* p = nullptr;
    const size_t bytes = count == 0 ? 16 : count * sizeof(T);
    VQKV_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&p, bytes, stream_),
                              std::string("cudaMallocAsync ") + what);
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

  // Copies host values into new scratch (the host vector may be freed after the call returns:
  // pageable copies are staged before cudaMemcpyAsync returns).
  template <typename T>
  absl::StatusOr<T*> Upload(const std::vector<T>& host, const char* what) {
    auto p = Alloc<T>(host.size(), what);
    if (!p.ok()) return p.status();
    if (!host.empty()) {
      VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(*p, host.data(), host.size() * sizeof(T),
                                                cudaMemcpyHostToDevice, stream_),
                                std::string("upload ") + what);
    }
    return *p;
  }

  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
};

}  // namespace vqkv::kernels::cuda
