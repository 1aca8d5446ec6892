// The tiered block store: an in-memory index of (tenant, model, codebook, hash) -> encoded block
// over a stack of tiers (GPU arena -> host -> disk; host is the top without a GPU).
//
// - Tiers form levels, top first: consecutive device tiers of one kind are one level (one GPU
//   tier per device side by side); host and disk are a level each. New blocks go to the top level:
//   to the device a commit names, else to the top tier with the most free bytes. A read that names
//   a device moves a block held by another device's tier there (Tier::CopyFrom: device to
//   device, falling back to Read + Write); a block whose device cannot be read is a miss.
// - Each tier has a byte budget; above the high watermark the
//   least recently used blocks are demoted to the next tier until the low watermark is reached,
//   and dropped at the bottom tier (eviction). A hit in a lower tier promotes the block to the
//   top. A tier that cannot place a block although its budget allows it (a fragmented GPU arena)
//   answers ResourceExhausted, and the store demotes more LRU blocks until the write fits.
// - Commit is all-or-nothing: either every block of a batch becomes visible or none does.
// - Readers take leases: a leased block is never demoted, evicted or freed; deleting it hides it
//   at once and frees it when the last lease ends.
// - Every block carries a CRC32C computed at commit and verified on every read; a block that
//   fails is dropped and reported missing (counted in corrupt_blocks).
//
// Thread-safety: all methods are thread-safe. One mutex guards the index; tier I/O of the host
// tier happens under it (it is a pointer copy); disk I/O of demotions and promotions also does
// (simple, and disk is the slow path). A Lease must not outlive its store.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "server/store/block_key.h"
#include "server/store/tier.h"

namespace vqkv::store {

// What the service needs to know about a block without reading it.
struct BlockMeta {
  int64_t logical_bytes = 0;  // uncompressed size in the model's dtype
  int32_t tokens = 0;
  int64_t first_token = 0;
};

// A block ready to be committed.
struct NewBlock {
  BlockKey key;
  std::string bytes;  // the encoded payload
  BlockMeta meta;
};

struct StoreOptions {
  // Tiers, top first. At least one. Consecutive device tiers (Tier::device() >= 0) of one kind
  // form a level; every other tier is a level of its own. Devices must be distinct.
  std::vector<std::unique_ptr<Tier>> tiers;
  // Fractions of a tier's capacity: above `high` after a commit, LRU blocks move down until
  // `low` is reached. 0 < low <= high <= 1.
  double high_watermark = 0.95;
  double low_watermark = 0.85;
};

struct TierCounters {
  TierKind kind = TierKind::kHost;
  int device = -1;  // Tier::device()
  int64_t capacity_bytes = 0, used_bytes = 0, blocks = 0;
  int64_t hits = 0, misses = 0, demotions = 0, promotions = 0, evictions = 0;
  // Copies between tiers of one level (device to device): blocks in, blocks out, copies that
  // failed (the store then fell back to Read + Write or left the block where it was).
  int64_t transfers_in = 0, transfers_out = 0, transfer_failures = 0;
  // Reads that failed with Unavailable/DeadlineExceeded (the device failed): counted as misses,
  // the block is kept.
  int64_t unavailable_reads = 0;
};

// Where a block is: its tier and, for a GPU tier, the device (-1 otherwise).
struct BlockPlace {
  TierKind tier = TierKind::kHost;
  int device = -1;
  bool operator==(const BlockPlace&) const = default;
};

// How Acquire reads.
struct AcquireOptions {
  // >= 0: move blocks held by another device's tier of the top level to this device's tier
  // first (best effort: a block that cannot be moved is read where it is), and promote blocks
  // of lower levels there. -1: leave blocks on their device; promote to the top tier with the
  // most free bytes.
  int device = -1;
  // Bound on the device-to-device transfers of this call.
  absl::Time deadline = absl::InfiniteFuture();
};

struct StoreStats {
  std::vector<TierCounters> tiers;  // top first
  int64_t blocks = 0;               // visible blocks
  int64_t stored_bytes = 0;         // bytes of visible blocks
  int64_t logical_bytes = 0;        // logical bytes of visible blocks
  int64_t hits = 0, misses = 0, evictions = 0, corrupt_blocks = 0;
};

// Per-(model) usage, for GetStats.
struct ModelUsage {
  int64_t blocks = 0, stored_bytes = 0, logical_bytes = 0;
};

class BlockStore {
 public:
  // InvalidArgument for no tiers or bad watermarks.
  static absl::StatusOr<std::unique_ptr<BlockStore>> Create(StoreOptions options);
  ~BlockStore();
  BlockStore(const BlockStore&) = delete;
  BlockStore& operator=(const BlockStore&) = delete;

  // A read lease on one block. Movable; releases the block when destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& o) noexcept { *this = std::move(o); }
    Lease& operator=(Lease&& o) noexcept;
    ~Lease() { Release(); }
    // The encoded bytes (valid while the lease is held, and after, since they are shared).
    const std::string& bytes() const { return *bytes_; }
    const BlockMeta& meta() const { return meta_; }
    TierKind tier() const { return tier_; }
    // Device of the tier the bytes were read from (-1 when not a device tier).
    int device() const { return device_; }
    void Release();

   private:
    friend class BlockStore;
    BlockStore* store_ = nullptr;
    uint64_t id_ = 0;
    BlockBytes bytes_;
    BlockMeta meta_;
    TierKind tier_ = TierKind::kHost;
    int device_ = -1;
  };

  struct CommitResult {
    int64_t stored = 0, existing = 0, stored_bytes = 0, logical_bytes = 0;
  };

  // Makes every block of `blocks` visible, or none, in one top-level tier: the one on `device`
  // (>= 0), or (-1) the one with the most free bytes. Keys already stored are left as they are
  // (counted in `existing`); duplicate keys within `blocks` count once. Errors: InvalidArgument
  // when no top-level tier is on `device`; ResourceExhausted when the batch cannot fit in the
  // tier even after demoting/evicting every unleased block; Internal/Unavailable on tier I/O
  // failure. Nothing of the batch is visible then.
  absl::StatusOr<CommitResult> Commit(std::vector<NewBlock> blocks, int device = -1);

  // Leases each key: result[i] is empty when keys[i] is not stored, failed its CRC, or its tier
  // could not read it (device unavailable). Counts hits and misses; moves blocks to
  // `options.device`; promotes hits from lower levels; refreshes LRU order. Blocks of lower
  // levels are read where they were found, then promoted; blocks moved across devices are read
  // from their new place (so the CRC check covers the transfer).
  std::vector<std::optional<Lease>> Acquire(absl::Span<const BlockKey> keys,
                                            const AcquireOptions& options = {});

  // Places of the longest stored prefix of `keys` (no counters, no LRU change).
  std::vector<BlockPlace> LookupPrefix(absl::Span<const BlockKey> keys) const;

  // Devices of the store's device tiers, in tier order (empty without GPU tiers).
  std::vector<int> Devices() const;
  // Whether a top-level tier is on `device`.
  bool HasTopDevice(int device) const;
  // The device of the top-level tier with the most free bytes; -1 when the top level has no
  // device tier. Where a Commit with device -1 would put a batch now.
  int PickDevice() const;

  // Removes the keys that are stored; returns how many were.
  int64_t Delete(absl::Span<const BlockKey> keys);
  // Removes every block of (tenant, model_id), all codebooks; returns how many.
  int64_t DeleteModel(const std::string& tenant, const std::string& model_id);

  // Up to `limit` keys of (tenant, model_id), any codebook, most recently used first.
  std::vector<BlockKey> ListKeys(const std::string& tenant, const std::string& model_id,
                                 int64_t limit) const;

  StoreStats Stats() const;
  // Usage of one model over all tenants and codebooks.
  ModelUsage Usage(const std::string& model_id) const;

 private:
  struct Entry {
    BlockKey key;
    uint32_t crc = 0;
    int64_t size = 0;
    BlockMeta meta;
    int tier = 0;
    int leases = 0;
    bool deleted = false;               // hidden; freed when leases reach 0
    std::list<uint64_t>::iterator lru;  // position in lru_[tier]; front = most recent
  };
  struct TierState {
    std::unique_ptr<Tier> tier;
    int level = 0;
    std::list<uint64_t> lru;
    TierCounters counters;
  };

  explicit BlockStore(StoreOptions options);

  // Moves down (or drops, at the bottom) unleased LRU blocks of tier `t` until
  // used + need <= target. ResourceExhausted if only leased blocks are left.
  absl::Status MakeRoom(int t, int64_t need, int64_t target) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves down (or drops) the least recently used unleased block of tier `t`.
  // ResourceExhausted if every block there is leased.
  absl::Status FreeOne(int t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes to tier `t`; while the tier answers ResourceExhausted (it cannot place the bytes
  // although the budget allows them), frees one more LRU block there and retries.
  absl::Status WriteTo(int t, uint64_t id, const BlockBytes& bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The same for a direct copy from tier `from` (Tier::CopyFrom).
  absl::Status CopyTo(int t, uint64_t id, int from, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves entry `id` from its tier to tier `to` (making room there): directly between tiers of
  // one level when they can, else by Read + Write. Internal/Unavailable on I/O errors.
  absl::Status Move(uint64_t id, int to, absl::Time deadline = absl::InfiniteFuture())
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The tier of `level` with the most free bytes (the first on ties).
  int MostFree(int level) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Tier index on `device`, or -1.
  int TierOfDevice(int device) const;
  // Drop frees an entry now (callers ensure it is unleased); Hide removes it from view and frees
  // it once unleased; Unindex does the visible-side accounting once.
  void Drop(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Hide(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unindex(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Touch(Entry& e, uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Rebalance() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseLease(uint64_t id);

  mutable absl::Mutex mu_;
  std::vector<TierState> tiers_ ABSL_GUARDED_BY(mu_);
  // Immutable after construction: tier indices of each level, and device of each tier.
  std::vector<std::vector<int>> levels_;
  std::vector<int> tier_device_;
  absl::flat_hash_map<BlockKey, uint64_t> index_ ABSL_GUARDED_BY(mu_);
  absl::node_hash_map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  double high_, low_;
  StoreStats totals_ ABSL_GUARDED_BY(mu_);  // blocks/bytes/hits/misses/evictions/corrupt
  absl::flat_hash_map<std::string, ModelUsage> usage_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vqkv::store
