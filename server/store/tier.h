// A storage tier of the block store: where the bytes of stored blocks live (GPU arena, host
// memory, a local disk directory). Like leveldb's Env, the store only talks to this interface,
// so a GPU tier (kernels/cuda) or a test stand-in plugs in without touching the store.
//
// The store owns the accounting (bytes used, LRU order); a tier only keeps bytes under ids.
// Thread-safety: implementations must be safe for concurrent calls on different ids; the store
// never calls Write/Erase concurrently for the same id.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace vqkv::store {

// Kinds of tier, top (fastest) first. Values match vqkv.v1.Tier.
enum class TierKind : uint8_t { kGpu = 1, kHost = 2, kDisk = 3 };

// "gpu", "host", "disk" (static strings).
const char* TierName(TierKind kind);

// Bytes of one stored block, shared between the store and the readers holding a lease on it.
using BlockBytes = std::shared_ptr<const std::string>;

class Tier {
 public:
  virtual ~Tier() = default;

  virtual TierKind kind() const = 0;
  // Byte budget of the tier (> 0). The store never puts more than this here.
  virtual int64_t capacity_bytes() const = 0;
  // The device a GPU tier lives on (>= 0); -1 for tiers that are not on a device. Consecutive
  // device tiers of one kind form one level of the store (one GPU tier per device, side by
  // side).
  virtual int device() const { return -1; }

  // Stores `bytes` under `id` (ids are unique and never reused by the store). On error nothing
  // remains stored under `id`. Errors: ResourceExhausted when the tier cannot place the bytes
  // now although the store's budget allows them (a fragmented or padded arena): the store then
  // moves least recently used blocks out of the tier and retries; Internal/Unavailable on I/O
  // failure.
  virtual absl::Status Write(uint64_t id, const BlockBytes& bytes) = 0;

  // Returns the bytes stored under `id`. NotFound if none; DataLoss/Internal on I/O errors.
  // The result stays valid after Erase (readers keep their copy alive).
  virtual absl::StatusOr<BlockBytes> Read(uint64_t id) = 0;

  // Removes `id`; no-op if absent.
  virtual void Erase(uint64_t id) = 0;

  // Stores under `id` a copy of the bytes `src` holds under `id`, without a round trip through
  // host memory (GPU tiers: a peer copy or an NCCL send/recv from another device's arena).
  // `src` is another tier of the same level; the store never erases `id` from it meanwhile.
  // Waits at most until `deadline`. On error nothing remains stored here under `id`. Errors:
  // Unimplemented when this tier cannot copy from `src` directly (the store then uses Read +
  // Write); ResourceExhausted as Write; Unavailable / DeadlineExceeded when the transfer failed
  // or did not finish in time (the store then falls back to Read + Write, or leaves the block
  // where it is).
  virtual absl::Status CopyFrom(Tier& src, uint64_t id, absl::Time deadline) {
    (void)src;
    (void)id;
    (void)deadline;
    return absl::UnimplementedError("tier: no direct copy between tiers");
  }
};

// Host memory tier (the top tier without a GPU; below the GPU tier with one). Never fails to
// write. Its blocks are ordinary (pageable) heap buffers shared with readers.
std::unique_ptr<Tier> NewHostTier(int64_t capacity_bytes);

// The GPU tier (an HBM arena) is declared in server/store/gpu_tier.h, built only with CUDA.

// Disk tier: one file per block under `dir` (created if needed). Files left by an earlier run
// are removed at start: the index lives in memory, so they could not be found again.
// InvalidArgument for capacity <= 0; Internal when the directory cannot be used.
absl::StatusOr<std::unique_ptr<Tier>> NewDiskTier(const std::string& dir, int64_t capacity_bytes);

}  // namespace vqkv::store
