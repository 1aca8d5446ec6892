// The tiered block store: an in-memory index of (tenant, model, codebook, hash) -> encoded block
// over a stack of tiers (GPU arena -> host -> disk; host is the top without a GPU).
//
// - New blocks go to the top tier. Each tier has a byte budget; above the high watermark the
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
  // Tiers, top first. At least one.
  std::vector<std::unique_ptr<Tier>> tiers;
  // Fractions of a tier's capacity: above `high` after a commit, LRU blocks move down until
  // `low` is reached. 0 < low <= high <= 1.
  double high_watermark = 0.95;
  double low_watermark = 0.85;
};

struct TierCounters {
  TierKind kind = TierKind::kHost;
  int64_t capacity_bytes = 0, used_bytes = 0, blocks = 0;
  int64_t hits = 0, misses = 0, demotions = 0, promotions = 0, evictions = 0;
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
    void Release();

   private:
    friend class BlockStore;
    BlockStore* store_ = nullptr;
    uint64_t id_ = 0;
    BlockBytes bytes_;
    BlockMeta meta_;
    TierKind tier_ = TierKind::kHost;
  };

  struct CommitResult {
    int64_t stored = 0, existing = 0, stored_bytes = 0, logical_bytes = 0;
  };

  // Makes every block of `blocks` visible, or none. Keys already stored are left as they are
  // (counted in `existing`); duplicate keys within `blocks` count once. Errors:
  // ResourceExhausted when the batch cannot fit in the top tier even after demoting/evicting
  // every unleased block; Internal on tier I/O failure. Nothing of the batch is visible then.
  absl::StatusOr<CommitResult> Commit(std::vector<NewBlock> blocks);

  // Leases each key: result[i] is empty when keys[i] is not stored (or failed its CRC). Counts
  // hits and misses; promotes hits from lower tiers; refreshes LRU order.
  std::vector<std::optional<Lease>> Acquire(absl::Span<const BlockKey> keys);

  // Tiers of the longest stored prefix of `keys` (no counters, no LRU change).
  std::vector<TierKind> LookupPrefix(absl::Span<const BlockKey> keys) const;

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
  // Moves entry `id` from its tier to tier `to` (making room there). Internal on I/O errors.
  absl::Status Move(uint64_t id, int to) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
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
  absl::flat_hash_map<BlockKey, uint64_t> index_ ABSL_GUARDED_BY(mu_);
  absl::node_hash_map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  double high_, low_;
  StoreStats totals_ ABSL_GUARDED_BY(mu_);  // blocks/bytes/hits/misses/evictions/corrupt
  absl::flat_hash_map<std::string, ModelUsage> usage_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vqkv::store
