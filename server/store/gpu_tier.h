// The GPU tier: encoded blocks in one preallocated HBM arena (cudaMalloc'd once, carved by
// ArenaAllocator), plus the pinned host memory the daemon uses around it. Built only with CUDA
// (target vqkv::store_gpu); this header itself includes no CUDA header, so vqkvd can use it.
//
// Writes and reads go through reusable pinned staging buffers (one stream each), never through
// pageable memory. A write that finds no free range large enough (the arena is full, or
// fragmented, or the 256-byte alignment of every range adds up) answers ResourceExhausted; the
// store then demotes LRU blocks to the host tier and retries (block_store.h).
// Thread-safety: all functions and tier methods are thread-safe. Each call makes the tier's
// device current for its own work and restores the caller's device before returning.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/store/gpu_transport.h"
#include "server/store/host_buffer.h"
#include "server/store/tier.h"

namespace vqkv::store {

// Visible CUDA devices; 0 when there are none or the driver cannot be used.
int GpuDeviceCount();

struct GpuDeviceInfo {
  int device = 0;
  std::string name;
  int cc_major = 0, cc_minor = 0;
  int64_t total_bytes = 0, free_bytes = 0;
};
// InvalidArgument for a device number outside [0, GpuDeviceCount()); Unavailable when the
// device cannot be used (driver missing, device busy or lost).
absl::StatusOr<GpuDeviceInfo> GetGpuDeviceInfo(int device);

// Makes `device` the calling thread's current device (the CUDA codecs bind to the device that is
// current when they are created). Errors as GetGpuDeviceInfo.
absl::Status UseGpuDevice(int device);

struct GpuTierOptions {
  int device = 0;
  int64_t capacity_bytes = 0;  // arena size and byte budget (> 0)
  // Size of one pinned staging buffer; copies larger than this go in pieces.
  int64_t staging_bytes = int64_t{4} << 20;
  // Alignment of every block in the arena (a power of two).
  int64_t alignment = 256;
  // With several GPUs: the transport shared by every GPU tier of the daemon. CopyFrom another
  // GPU tier with the same transport then copies device to device; the tier's reads and writes
  // answer Unavailable once the transport marks its device failed. Null: one GPU (CopyFrom is
  // Unimplemented).
  std::shared_ptr<GpuTransport> transport;
};

// InvalidArgument for a capacity <= 0, a non-power-of-two alignment or a staging size <= 0, and
// for a bad device; ResourceExhausted when the device cannot hold the arena; Unavailable when no
// device is usable.
absl::StatusOr<std::unique_ptr<Tier>> NewGpuTier(const GpuTierOptions& options);

// A pool of pinned host buffers for HostBufferAllocator users (GetBlocks' decode outputs).
// Sizes are rounded up to a power of two (at least 64 KiB); freed buffers are kept for reuse up
// to `max_cached_bytes` in total, beyond that they are unpinned. Allocate returns nullptr when
// pinning fails, so callers fall back to the heap.
std::shared_ptr<HostBufferAllocator> NewPinnedHostAllocator(int64_t max_cached_bytes);

}  // namespace vqkv::store
