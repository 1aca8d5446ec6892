#include "server/store/block_store.h"

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/hash.h"

namespace vqkv::store {

const char* TierName(TierKind kind) {
  switch (kind) {
    case TierKind::kGpu:
      return "gpu";
    case TierKind::kHost:
      return "host";
    case TierKind::kDisk:
      return "disk";
  }
  return "?";
}

std::string BlockKey::DebugString() const {
  return absl::StrCat(tenant, "/", model_id, "/", codebook_id.empty() ? "-" : codebook_id, "/",
                      absl::BytesToHexString(absl::string_view(hash.data(), hash.size())));
}

BlockStore::Lease& BlockStore::Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    Release();
    store_ = std::exchange(o.store_, nullptr);
    id_ = o.id_;
    bytes_ = std::move(o.bytes_);
    meta_ = o.meta_;
    tier_ = o.tier_;
    device_ = o.device_;
  }
  return *this;
}

void BlockStore::Lease::Release() {
  if (store_ != nullptr) std::exchange(store_, nullptr)->ReleaseLease(id_);
  bytes_.reset();
}

absl::StatusOr<std::unique_ptr<BlockStore>> BlockStore::Create(StoreOptions options) {
  if (options.tiers.empty()) return absl::InvalidArgumentError("store: no tiers");
  if (!(options.low_watermark > 0 && options.low_watermark <= options.high_watermark &&
        options.high_watermark <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("store: watermarks must satisfy 0 < low (",
                                                   options.low_watermark, ") <= high (",
                                                   options.high_watermark, ") <= 1"));
  }
  absl::flat_hash_map<int, bool> devices;
  for (size_t i = 0; i < options.tiers.size(); ++i) {
    const auto& t = options.tiers[i];
    if (t == nullptr || t->capacity_bytes() <= 0) {
      return absl::InvalidArgumentError("store: every tier needs a positive capacity");
    }
    if (t->device() >= 0 && !devices.emplace(t->device(), true).second) {
      return absl::InvalidArgumentError(absl::StrCat("store: two tiers on device ", t->device()));
    }
  }
  return std::unique_ptr<BlockStore>(new BlockStore(std::move(options)));
}

BlockStore::BlockStore(StoreOptions options)
    : high_(options.high_watermark), low_(options.low_watermark) {
  for (auto& t : options.tiers) {
    TierState s;
    s.counters.kind = t->kind();
    s.counters.device = t->device();
    s.counters.capacity_bytes = t->capacity_bytes();
    const int index = static_cast<int>(tiers_.size());
    const bool same_level = index > 0 && t->device() >= 0 && tiers_.back().counters.device >= 0 &&
                            tiers_.back().counters.kind == t->kind();
    if (!same_level) levels_.emplace_back();
    s.level = static_cast<int>(levels_.size()) - 1;
    levels_.back().push_back(index);
    tier_device_.push_back(t->device());
    s.tier = std::move(t);
    tiers_.push_back(std::move(s));
  }
}

int BlockStore::TierOfDevice(int device) const {
  if (device < 0) return -1;
  for (size_t t = 0; t < tier_device_.size(); ++t) {
    if (tier_device_[t] == device) return static_cast<int>(t);
  }
  return -1;
}

int BlockStore::MostFree(int level) const {
  int best = levels_[level][0];
  int64_t best_free = -1;
  for (int t : levels_[level]) {
    const int64_t free = tiers_[t].counters.capacity_bytes - tiers_[t].counters.used_bytes;
    if (free > best_free) {
      best = t;
      best_free = free;
    }
  }
  return best;
}

std::vector<int> BlockStore::Devices() const {
  std::vector<int> out;
  for (int d : tier_device_) {
    if (d >= 0) out.push_back(d);
  }
  return out;
}

bool BlockStore::HasTopDevice(int device) const {
  const int t = TierOfDevice(device);
  return t >= 0 && std::find(levels_[0].begin(), levels_[0].end(), t) != levels_[0].end();
}

int BlockStore::PickDevice() const {
  absl::ReaderMutexLock lock(&mu_);
  return tier_device_[MostFree(0)];
}

BlockStore::~BlockStore() = default;

void BlockStore::Touch(Entry& e, uint64_t id) {
  auto& lru = tiers_[e.tier].lru;
  lru.erase(e.lru);
  lru.push_front(id);
  e.lru = lru.begin();
}

absl::StatusOr<BlockStore::CommitResult> BlockStore::Commit(std::vector<NewBlock> blocks,
                                                            int device) {
  if (device >= 0 && !HasTopDevice(device)) {
    return absl::InvalidArgumentError(absl::StrCat("store: no top-level tier on device ", device));
  }
  // Checksums and shared buffers are made before taking the lock.
  struct Prepared {
    NewBlock* block;
    BlockBytes bytes;
    uint32_t crc;
  };
  std::vector<Prepared> prepared;
  prepared.reserve(blocks.size());
  for (NewBlock& b : blocks) {
    const uint32_t crc = Crc32c(b.bytes);
    prepared.push_back({&b, std::make_shared<const std::string>(std::move(b.bytes)), crc});
  }

  absl::MutexLock lock(&mu_);
  CommitResult result;
  std::vector<Prepared*> fresh;
  absl::flat_hash_map<BlockKey, bool> seen;
  int64_t total = 0;
  for (Prepared& p : prepared) {
    if (index_.contains(p.block->key) || !seen.emplace(p.block->key, true).second) {
      ++result.existing;
      continue;
    }
    fresh.push_back(&p);
    total += static_cast<int64_t>(p.bytes->size());
  }
  if (fresh.empty()) return result;
  const int t0 = device >= 0 ? TierOfDevice(device) : MostFree(0);
  TierState& top = tiers_[t0];
  if (total > top.counters.capacity_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("store: batch of ", total, " bytes exceeds the ", TierName(top.tier->kind()),
                     " tier capacity of ", top.counters.capacity_bytes, " bytes"));
  }
  if (absl::Status s = MakeRoom(t0, total, top.counters.capacity_bytes); !s.ok()) return s;

  std::vector<uint64_t> inserted;
  for (Prepared* p : fresh) {
    const uint64_t id = next_id_++;
    if (absl::Status s = WriteTo(t0, id, p->bytes); !s.ok()) {
      for (uint64_t done : inserted) Drop(done);
      return s;
    }
    Entry& e = entries_[id];
    e.key = p->block->key;
    e.crc = p->crc;
    e.size = static_cast<int64_t>(p->bytes->size());
    e.meta = p->block->meta;
    e.tier = t0;
    top.lru.push_front(id);
    e.lru = top.lru.begin();
    index_[e.key] = id;
    top.counters.used_bytes += e.size;
    ++top.counters.blocks;
    ++totals_.blocks;
    totals_.stored_bytes += e.size;
    totals_.logical_bytes += e.meta.logical_bytes;
    ModelUsage& u = usage_[e.key.model_id];
    ++u.blocks;
    u.stored_bytes += e.size;
    u.logical_bytes += e.meta.logical_bytes;
    inserted.push_back(id);
    ++result.stored;
    result.stored_bytes += e.size;
    result.logical_bytes += e.meta.logical_bytes;
  }
  Rebalance();
  return result;
}

absl::Status BlockStore::MakeRoom(int t, int64_t need, int64_t target) {
  while (tiers_[t].counters.used_bytes + need > target) {
    if (absl::Status s = FreeOne(t); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status BlockStore::FreeOne(int t) {
  TierState& ts = tiers_[t];
  uint64_t victim = 0;
  for (auto it = ts.lru.rbegin(); it != ts.lru.rend(); ++it) {
    if (entries_[*it].leases == 0) {
      victim = *it;
      break;
    }
  }
  if (victim == 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "store: ", TierName(ts.tier->kind()), " tier is full (", ts.counters.used_bytes, " of ",
        ts.counters.capacity_bytes, " bytes) and every block in it is being read"));
  }
  const int next = ts.level + 1;
  if (next < static_cast<int>(levels_.size()) && Move(victim, MostFree(next)).ok()) {
    return absl::OkStatus();
  }
  ++ts.counters.evictions;
  ++totals_.evictions;
  Drop(victim);
  return absl::OkStatus();
}

absl::Status BlockStore::WriteTo(int t, uint64_t id, const BlockBytes& bytes) {
  while (true) {
    absl::Status s = tiers_[t].tier->Write(id, bytes);
    if (!absl::IsResourceExhausted(s)) return s;
    // The budget has room but the tier cannot place the bytes (a fragmented arena, alignment
    // padding): move LRU blocks down until it can, or report the tier's own error when only
    // leased blocks are left.
    if (!FreeOne(t).ok()) return s;
  }
}

absl::Status BlockStore::CopyTo(int t, uint64_t id, int from, absl::Time deadline) {
  while (true) {
    absl::Status s = tiers_[t].tier->CopyFrom(*tiers_[from].tier, id, deadline);
    if (!absl::IsResourceExhausted(s)) return s;
    if (!FreeOne(t).ok()) return s;
  }
}

absl::Status BlockStore::Move(uint64_t id, int to, absl::Time deadline) {
  Entry& e = entries_[id];
  const int from = e.tier;
  TierState& dst = tiers_[to];
  if (e.size > dst.counters.capacity_bytes) {
    return absl::ResourceExhaustedError("store: block larger than the tier");
  }
  const bool across = tiers_[from].level == dst.level;
  // The entry is leased while it moves so that making room below cannot pick it.
  ++e.leases;
  absl::Status s = MakeRoom(to, e.size, dst.counters.capacity_bytes);
  bool copied = false;
  if (s.ok() && across) {
    // Device to device first; a transfer that fails (a peer link or NCCL error, a timeout) falls
    // back to the host path below, which also tells a dead source device (Unavailable) apart.
    absl::Status c = CopyTo(to, id, from, deadline);
    copied = c.ok();
    if (!c.ok() && !absl::IsUnimplemented(c)) ++dst.counters.transfer_failures;
    if (absl::IsResourceExhausted(c)) s = c;
  }
  absl::StatusOr<BlockBytes> bytes;
  if (s.ok() && !copied) {
    bytes = tiers_[from].tier->Read(id);
    s = bytes.status();
    if (s.ok()) s = WriteTo(to, id, *bytes);
  }
  --e.leases;
  if (!s.ok()) return s;
  TierState& src = tiers_[from];
  src.tier->Erase(id);
  src.lru.erase(e.lru);
  src.counters.used_bytes -= e.size;
  --src.counters.blocks;
  if (across) {
    ++src.counters.transfers_out;
    ++dst.counters.transfers_in;
  } else if (dst.level > src.level) {
    ++src.counters.demotions;
  } else {
    ++dst.counters.promotions;
  }
  dst.lru.push_front(id);
  e.lru = dst.lru.begin();
  e.tier = to;
  dst.counters.used_bytes += e.size;
  ++dst.counters.blocks;
  return absl::OkStatus();
}

void BlockStore::Unindex(Entry& e) {
  if (e.deleted) return;
  e.deleted = true;
  index_.erase(e.key);
  --totals_.blocks;
  totals_.stored_bytes -= e.size;
  totals_.logical_bytes -= e.meta.logical_bytes;
  ModelUsage& u = usage_[e.key.model_id];
  --u.blocks;
  u.stored_bytes -= e.size;
  u.logical_bytes -= e.meta.logical_bytes;
}

void BlockStore::Hide(uint64_t id) {
  Entry& e = entries_[id];
  Unindex(e);
  if (e.leases == 0) Drop(id);
}

void BlockStore::Drop(uint64_t id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  Entry& e = it->second;
  Unindex(e);
  TierState& ts = tiers_[e.tier];
  ts.tier->Erase(id);
  ts.lru.erase(e.lru);
  ts.counters.used_bytes -= e.size;
  --ts.counters.blocks;
  entries_.erase(it);
}

void BlockStore::Rebalance() {
  for (size_t t = 0; t < tiers_.size(); ++t) {
    const int64_t cap = tiers_[t].counters.capacity_bytes;
    if (tiers_[t].counters.used_bytes > static_cast<int64_t>(high_ * cap)) {
      // Best effort: leased blocks may keep a tier above its watermark for a while.
      MakeRoom(static_cast<int>(t), 0, static_cast<int64_t>(low_ * cap)).IgnoreError();
    }
  }
}

std::vector<std::optional<BlockStore::Lease>> BlockStore::Acquire(absl::Span<const BlockKey> keys,
                                                                  const AcquireOptions& options) {
  std::vector<std::optional<Lease>> out(keys.size());
  std::vector<uint32_t> crcs(keys.size());
  const int dest = TierOfDevice(options.device);
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < keys.size(); ++i) {
      auto it = index_.find(keys[i]);
      if (it == index_.end()) {
        for (TierState& ts : tiers_) ++ts.counters.misses;
        ++totals_.misses;
        continue;
      }
      const uint64_t id = it->second;
      Entry& e = entries_[id];
      const int found = e.tier;
      if (dest >= 0 && found != dest && tiers_[found].level == tiers_[dest].level) {
        // Best effort: a block that cannot be moved is read where it is.
        Move(id, dest, options.deadline).IgnoreError();
      }
      absl::StatusOr<BlockBytes> bytes = tiers_[e.tier].tier->Read(id);
      if (!bytes.ok()) {
        ++totals_.misses;
        if (absl::IsUnavailable(bytes.status()) || absl::IsDeadlineExceeded(bytes.status())) {
          // The tier's device failed: the block is unreachable now, not proven corrupt.
          ++tiers_[e.tier].counters.unavailable_reads;
          for (TierState& ts : tiers_) ++ts.counters.misses;
          continue;
        }
        ++totals_.corrupt_blocks;
        Hide(id);
        continue;
      }
      const int found_level = tiers_[found].level;
      for (TierState& ts : tiers_) {
        if (ts.level < found_level) ++ts.counters.misses;
      }
      ++tiers_[found].counters.hits;
      ++totals_.hits;
      ++e.leases;
      Lease lease;
      lease.store_ = this;
      lease.id_ = id;
      lease.bytes_ = *std::move(bytes);
      lease.meta_ = e.meta;
      lease.tier_ = tiers_[e.tier].tier->kind();
      lease.device_ = tier_device_[e.tier];
      crcs[i] = e.crc;
      if (tiers_[e.tier].level > 0) {
        // Promotion is best effort: a full top tier of leased blocks leaves it where it is.
        Move(id, dest >= 0 && tiers_[dest].level == 0 ? dest : MostFree(0)).IgnoreError();
      } else {
        Touch(e, id);
      }
      out[i] = std::move(lease);
    }
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!out[i].has_value() || Crc32c(out[i]->bytes()) == crcs[i]) continue;
    {
      absl::MutexLock lock(&mu_);
      ++totals_.corrupt_blocks;
      --totals_.hits;
      ++totals_.misses;
      Hide(out[i]->id_);
    }
    out[i].reset();
  }
  return out;
}

void BlockStore::ReleaseLease(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  if (--it->second.leases == 0 && it->second.deleted) Drop(id);
}

std::vector<BlockPlace> BlockStore::LookupPrefix(absl::Span<const BlockKey> keys) const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<BlockPlace> out;
  for (const BlockKey& k : keys) {
    auto it = index_.find(k);
    if (it == index_.end()) break;
    const int t = entries_.at(it->second).tier;
    out.push_back({tiers_[t].tier->kind(), tier_device_[t]});
  }
  return out;
}

int64_t BlockStore::Delete(absl::Span<const BlockKey> keys) {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (const BlockKey& k : keys) {
    auto it = index_.find(k);
    if (it == index_.end()) continue;
    Hide(it->second);
    ++n;
  }
  return n;
}

int64_t BlockStore::DeleteModel(const std::string& tenant, const std::string& model_id) {
  absl::MutexLock lock(&mu_);
  std::vector<uint64_t> ids;
  for (const auto& [key, id] : index_) {
    if (key.tenant == tenant && key.model_id == model_id) ids.push_back(id);
  }
  for (uint64_t id : ids) Hide(id);
  return static_cast<int64_t>(ids.size());
}

std::vector<BlockKey> BlockStore::ListKeys(const std::string& tenant, const std::string& model_id,
                                           int64_t limit) const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<BlockKey> out;
  for (const TierState& ts : tiers_) {
    for (uint64_t id : ts.lru) {
      if (static_cast<int64_t>(out.size()) >= limit) return out;
      const Entry& e = entries_.at(id);
      if (!e.deleted && e.key.tenant == tenant && e.key.model_id == model_id) {
        out.push_back(e.key);
      }
    }
  }
  return out;
}

StoreStats BlockStore::Stats() const {
  absl::ReaderMutexLock lock(&mu_);
  StoreStats s = totals_;
  s.tiers.clear();
  for (const TierState& ts : tiers_) s.tiers.push_back(ts.counters);
  return s;
}

ModelUsage BlockStore::Usage(const std::string& model_id) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = usage_.find(model_id);
  return it == usage_.end() ? ModelUsage{} : it->second;
}

}  // namespace vqkv::store
