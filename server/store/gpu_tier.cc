// GPU tier and pinned host pool. Copies between the arena and host strings are staged through
// pinned buffers so that every transfer is a true DMA; a staging slot (buffer + stream) is taken
// from a free list for one call, so concurrent calls never share one.
#include "server/store/gpu_tier.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "server/store/arena_allocator.h"

namespace vqkv::store {
namespace {

using kernels::cuda::CudaStatus;

// Copy failures are I/O errors of the tier: never ResourceExhausted, which the store reads as
// "cannot place the block, demote and retry".
absl::Status CopyStatus(cudaError_t e, const std::string& op) {
  absl::Status s = CudaStatus(e, op);
  if (absl::IsResourceExhausted(s)) return absl::InternalError(s.message());
  return s;
}

// Makes `device` current for the scope and restores the caller's device.
class DeviceScope {
 public:
  DeviceScope() = default;
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  ~DeviceScope() {
    if (prev_ >= 0 && prev_ != device_) (void)cudaSetDevice(prev_);
  }
  absl::Status Enter(int device, const char* op) {
    device_ = device;
    VQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&prev_), op);
    if (prev_ != device) VQKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), op);
    return absl::OkStatus();
  }

 private:
  int prev_ = -1, device_ = -1;
};

absl::Status CheckDevice(int device) {
  const int n = GpuDeviceCount();
  if (n == 0) return absl::UnavailableError("no usable CUDA device");
  if (device < 0 || device >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU device ", device, " does not exist (", n, " visible)"));
  }
  return absl::OkStatus();
}

class GpuTier final : public Tier {
 public:
  GpuTier(const GpuTierOptions& o, void* arena)
      : options_(o), arena_(static_cast<char*>(arena)), alloc_(o.capacity_bytes, o.alignment) {}

  ~GpuTier() override {
    DeviceScope scope;
    (void)scope.Enter(options_.device, "gpu tier: release");
    for (Staging& s : staging_) {
      (void)cudaStreamDestroy(s.stream);
      (void)cudaFreeHost(s.host);
    }
    (void)cudaFree(arena_);
  }

  TierKind kind() const override { return TierKind::kGpu; }
  int64_t capacity_bytes() const override { return options_.capacity_bytes; }
  int device() const override { return options_.device; }

  absl::Status Write(uint64_t id, const BlockBytes& bytes) override {
    VQKV_RETURN_IF_ERROR(CheckInService());
    const int64_t size = static_cast<int64_t>(bytes->size());
    int64_t offset = 0;
    {
      absl::MutexLock l(&mu_);
      if (blocks_.contains(id)) {
        return absl::InternalError(absl::StrCat("gpu tier: block ", id, " is already stored"));
      }
      std::optional<int64_t> got = alloc_.Allocate(std::max<int64_t>(size, 1));
      if (!got.has_value()) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "gpu tier: no free range of ", alloc_.RoundUp(size), " bytes in the ",
            alloc_.capacity(), "-byte arena (", alloc_.used(), " used, largest free range ",
            alloc_.largest_free(), " in ", alloc_.free_ranges(), ")"));
      }
      offset = *got;
      blocks_[id] = Placement{offset, size};
    }
    absl::Status s = Copy(arena_ + offset, bytes->data(), size, cudaMemcpyHostToDevice);
    if (!s.ok()) Erase(id);
    return s;
  }

  absl::StatusOr<BlockBytes> Read(uint64_t id) override {
    VQKV_RETURN_IF_ERROR(CheckInService());
    // Shared lock: reads run together; Erase (which frees the range) waits for them.
    absl::ReaderMutexLock l(&mu_);
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return absl::NotFoundError(absl::StrCat("gpu tier: no block ", id));
    auto out = std::make_shared<std::string>();
    out->resize(static_cast<size_t>(it->second.size));
    absl::Status s =
        Copy(out->data(), arena_ + it->second.offset, it->second.size, cudaMemcpyDeviceToHost);
    if (!s.ok()) {
      // The device did not deliver the bytes: unreachable (a miss), not proven corrupt.
      return absl::UnavailableError(
          absl::StrCat("gpu tier: device ", options_.device, ": ", s.message()));
    }
    return BlockBytes(std::move(out));
  }

  absl::Status CopyFrom(Tier& src_tier, uint64_t id, absl::Time deadline) override {
    auto* src = dynamic_cast<GpuTier*>(&src_tier);
    if (options_.transport == nullptr || src == nullptr ||
        src->options_.transport != options_.transport) {
      return Tier::CopyFrom(src_tier, id, deadline);
    }
    VQKV_RETURN_IF_ERROR(CheckInService());
    Placement from;
    {
      absl::ReaderMutexLock l(&src->mu_);
      auto it = src->blocks_.find(id);
      if (it == src->blocks_.end()) {
        return absl::NotFoundError(
            absl::StrCat("gpu tier: no block ", id, " on device ", src->options_.device));
      }
      from = it->second;
    }
    int64_t offset = 0;
    {
      absl::MutexLock l(&mu_);
      if (blocks_.contains(id)) {
        return absl::InternalError(absl::StrCat("gpu tier: block ", id, " is already stored"));
      }
      std::optional<int64_t> got = alloc_.Allocate(std::max<int64_t>(from.size, 1));
      if (!got.has_value()) {
        return absl::ResourceExhaustedError(absl::StrCat("gpu tier: no free range of ",
                                                         alloc_.RoundUp(from.size),
                                                         " bytes on device ", options_.device));
      }
      offset = *got;
      blocks_[id] = Placement{offset, from.size};
    }
    // The source range stays valid: the store never erases `id` from the source meanwhile, and
    // only Erase frees a range. No lock is held across the copy (two tiers copying towards each
    // other cannot deadlock).
    absl::Status s =
        options_.transport->Copy(options_.device, arena_ + offset, src->options_.device,
                                 src->arena_ + from.offset, from.size, deadline);
    if (absl::IsDeadlineExceeded(s)) {
      // The copy may still be writing: keep the range allocated (lost until restart).
      absl::MutexLock l(&mu_);
      blocks_.erase(id);
      quarantined_bytes_ += alloc_.RoundUp(from.size);
    } else if (!s.ok()) {
      Erase(id);
    }
    return s;
  }

  void Erase(uint64_t id) override {
    absl::MutexLock l(&mu_);
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return;
    alloc_.Free(it->second.offset);
    blocks_.erase(it);
  }

  // Allocates the first staging slot, so that a tier that starts has working staging.
  absl::Status CheckInService() const {
    if (options_.transport != nullptr && options_.transport->Failed(options_.device)) {
      return absl::UnavailableError(
          absl::StrCat("gpu tier: device ", options_.device, " is out of service"));
    }
    return absl::OkStatus();
  }

  absl::Status Init() {
    VQKV_ASSIGN_OR_RETURN(Staging s, NewStaging());
    std::lock_guard<std::mutex> l(staging_mu_);
    staging_.push_back(s);
    free_staging_.push_back(0);
    return absl::OkStatus();
  }

 private:
  struct Placement {
    int64_t offset = 0, size = 0;
  };
  struct Staging {
    char* host = nullptr;  // pinned, options_.staging_bytes
    cudaStream_t stream = nullptr;
  };

  absl::StatusOr<Staging> NewStaging() {
    DeviceScope scope;
    VQKV_RETURN_IF_ERROR(scope.Enter(options_.device, "gpu tier: staging"));
    Staging s;
    VQKV_CUDA_RETURN_IF_ERROR(
        cudaHostAlloc(reinterpret_cast<void**>(&s.host), options_.staging_bytes,
                      cudaHostAllocPortable),
        absl::StrCat("gpu tier: pin ", options_.staging_bytes, " staging bytes"));
    if (cudaError_t e = cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking);
        e != cudaSuccess) {
      (void)cudaFreeHost(s.host);
      return CudaStatus(e, "gpu tier: stream");
    }
    return s;
  }

  // A free staging slot (a new one when all are busy), returned by the destructor of the lease.
  absl::StatusOr<size_t> TakeStaging() {
    {
      std::lock_guard<std::mutex> l(staging_mu_);
      if (!free_staging_.empty()) {
        const size_t i = free_staging_.back();
        free_staging_.pop_back();
        return i;
      }
    }
    VQKV_ASSIGN_OR_RETURN(Staging s, NewStaging());
    std::lock_guard<std::mutex> l(staging_mu_);
    staging_.push_back(s);
    return staging_.size() - 1;
  }
  void GiveStaging(size_t i) {
    std::lock_guard<std::mutex> l(staging_mu_);
    free_staging_.push_back(i);
  }

  // Copies `size` bytes between host memory and the arena through one staging slot, in pieces
  // of options_.staging_bytes.
  absl::Status Copy(char* dst, const char* src, int64_t size, cudaMemcpyKind kind) {
    if (size == 0) return absl::OkStatus();
    DeviceScope scope;
    VQKV_RETURN_IF_ERROR(scope.Enter(options_.device, "gpu tier: copy"));
    VQKV_ASSIGN_OR_RETURN(const size_t slot, TakeStaging());
    Staging st;
    {
      std::lock_guard<std::mutex> l(staging_mu_);
      st = staging_[slot];  // the vector may grow; copy the slot's handles
    }
    absl::Status s;
    const char* op = kind == cudaMemcpyHostToDevice ? "gpu tier: write" : "gpu tier: read";
    for (int64_t done = 0; done < size && s.ok(); done += options_.staging_bytes) {
      const size_t n = static_cast<size_t>(std::min(options_.staging_bytes, size - done));
      if (kind == cudaMemcpyHostToDevice) {
        std::memcpy(st.host, src + done, n);
        s = CopyStatus(cudaMemcpyAsync(dst + done, st.host, n, kind, st.stream), op);
        if (s.ok()) s = CopyStatus(cudaStreamSynchronize(st.stream), op);
      } else {
        s = CopyStatus(cudaMemcpyAsync(st.host, src + done, n, kind, st.stream), op);
        if (s.ok()) s = CopyStatus(cudaStreamSynchronize(st.stream), op);
        if (s.ok()) std::memcpy(dst + done, st.host, n);
      }
    }
    GiveStaging(slot);
    return s;
  }

  const GpuTierOptions options_;
  char* const arena_;
  absl::Mutex mu_;
  ArenaAllocator alloc_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Placement> blocks_ ABSL_GUARDED_BY(mu_);
  int64_t quarantined_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // ranges a timed-out copy may write
  std::mutex staging_mu_;
  std::vector<Staging> staging_;      // guarded by staging_mu_
  std::vector<size_t> free_staging_;  // guarded by staging_mu_
};

class PinnedHostAllocator final : public HostBufferAllocator {
 public:
  explicit PinnedHostAllocator(int64_t max_cached)
      : max_cached_(std::max<int64_t>(0, max_cached)) {}
  ~PinnedHostAllocator() override {
    for (auto& [size, list] : cache_) {
      for (void* p : list) (void)cudaFreeHost(p);
    }
  }

  void* Allocate(size_t bytes) override {
    const size_t cls = SizeClass(bytes);
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = cache_.find(cls);
      if (it != cache_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= static_cast<int64_t>(cls);
        return p;
      }
    }
    void* p = nullptr;
    if (cudaHostAlloc(&p, cls, cudaHostAllocPortable) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return p;
  }

  void Free(void* p, size_t bytes) override {
    const size_t cls = SizeClass(bytes);
    {
      std::lock_guard<std::mutex> l(mu_);
      if (cached_ + static_cast<int64_t>(cls) <= max_cached_) {
        cache_[cls].push_back(p);
        cached_ += static_cast<int64_t>(cls);
        return;
      }
    }
    (void)cudaFreeHost(p);
  }

 private:
  static size_t SizeClass(size_t bytes) {
    size_t cls = size_t{64} << 10;
    while (cls < bytes) cls <<= 1;
    return cls;
  }

  const int64_t max_cached_;
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> cache_;  // guarded by mu_
  int64_t cached_ = 0;                          // guarded by mu_
};

}  // namespace

int GpuDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

absl::StatusOr<GpuDeviceInfo> GetGpuDeviceInfo(int device) {
  VQKV_RETURN_IF_ERROR(CheckDevice(device));
  DeviceScope scope;
  VQKV_RETURN_IF_ERROR(scope.Enter(device, "GPU device query"));
  cudaDeviceProp prop{};
  VQKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  size_t free_b = 0, total_b = 0;
  VQKV_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  GpuDeviceInfo info;
  info.device = device;
  info.name = prop.name;
  info.cc_major = prop.major;
  info.cc_minor = prop.minor;
  info.total_bytes = static_cast<int64_t>(total_b);
  info.free_bytes = static_cast<int64_t>(free_b);
  return info;
}

absl::Status UseGpuDevice(int device) {
  VQKV_RETURN_IF_ERROR(CheckDevice(device));
  VQKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), "cudaSetDevice");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tier>> NewGpuTier(const GpuTierOptions& o) {
  if (o.capacity_bytes <= 0) {
    return absl::InvalidArgumentError("gpu tier: capacity must be positive");
  }
  if (o.alignment <= 0 || (o.alignment & (o.alignment - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpu tier: alignment ", o.alignment, " is not a power of two"));
  }
  if (o.staging_bytes <= 0) {
    return absl::InvalidArgumentError("gpu tier: staging size must be positive");
  }
  VQKV_RETURN_IF_ERROR(CheckDevice(o.device));
  DeviceScope scope;
  VQKV_RETURN_IF_ERROR(scope.Enter(o.device, "gpu tier"));
  void* arena = nullptr;
  // One allocation for the life of the tier: nothing is allocated or freed on the device per
  // block, and the budget is really reserved.
  if (cudaError_t e = cudaMalloc(&arena, static_cast<size_t>(o.capacity_bytes)); e != cudaSuccess) {
    (void)cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    absl::Status s = CudaStatus(
        e, absl::StrCat("gpu tier: cudaMalloc of a ", o.capacity_bytes, "-byte arena on device ",
                        o.device, " (", free_b, " of ", total_b, " bytes free)"));
    return s;
  }
  auto tier = std::make_unique<GpuTier>(o, arena);
  VQKV_RETURN_IF_ERROR(tier->Init());
  return std::unique_ptr<Tier>(std::move(tier));
}

std::shared_ptr<HostBufferAllocator> NewPinnedHostAllocator(int64_t max_cached_bytes) {
  return std::make_shared<PinnedHostAllocator>(max_cached_bytes);
}

}  // namespace vqkv::store
