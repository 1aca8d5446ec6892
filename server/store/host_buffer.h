// Where the daemon puts host buffers that a codec writes into (GetBlocks' decoded batches). The
// default is the heap; with a GPU, vqkvd installs a pool of pinned (page-locked) buffers
// (gpu_tier.h), so the GPU decode's device-to-host copies run at full PCIe speed straight into
// the buffers gRPC streams from, with no bounce through pageable memory.
// Thread-safety: implementations are thread-safe.
#pragma once

#include <cstddef>
#include <memory>
#include <utility>

namespace vqkv::store {

class HostBufferAllocator {
 public:
  virtual ~HostBufferAllocator() = default;
  // A buffer of at least `bytes` bytes (uninitialised), or nullptr when none can be had (the
  // caller falls back to the heap).
  virtual void* Allocate(size_t bytes) = 0;
  // Gives back a buffer from Allocate(bytes) with the same `bytes`.
  virtual void Free(void* p, size_t bytes) = 0;
};

// A buffer from an allocator (or from the heap when `allocator` is null or out of buffers),
// returned to it when destroyed. Movable.
class HostBuffer {
 public:
  HostBuffer() = default;
  HostBuffer(const std::shared_ptr<HostBufferAllocator>& allocator, size_t bytes) : size_(bytes) {
    if (allocator != nullptr) data_ = static_cast<char*>(allocator->Allocate(bytes));
    if (data_ != nullptr) {
      allocator_ = allocator;
    } else {
      data_ = new char[bytes];
    }
  }
  HostBuffer(HostBuffer&& o) noexcept { *this = std::move(o); }
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      data_ = o.data_;
      size_ = o.size_;
      allocator_ = std::move(o.allocator_);
      o.data_ = nullptr;
      o.size_ = 0;
    }
    return *this;
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() { Reset(); }

  char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void Reset() {
    if (data_ == nullptr) return;
    if (allocator_ != nullptr) {
      allocator_->Free(data_, size_);
    } else {
      delete[] data_;
    }
    data_ = nullptr;
    size_ = 0;
    allocator_.reset();
  }
  char* data_ = nullptr;
  size_t size_ = 0;
  std::shared_ptr<HostBufferAllocator> allocator_;
};

}  // namespace vqkv::store
