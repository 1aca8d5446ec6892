#include "server/store/block_store.h"

#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/store/arena_allocator.h"

namespace vqkv::store {
namespace {

using ::testing::ElementsAre;

// A host tier whose writes can be made to fail and whose reads can be corrupted.
class FaultyTier final : public Tier {
 public:
  FaultyTier(TierKind kind, int64_t cap) : kind_(kind), inner_(NewHostTier(cap)) {}
  TierKind kind() const override { return kind_; }
  int64_t capacity_bytes() const override { return inner_->capacity_bytes(); }
  absl::Status Write(uint64_t id, const BlockBytes& b) override {
    if (fail_writes_after >= 0 && fail_writes_after-- == 0) return absl::InternalError("injected");
    return inner_->Write(id, b);
  }
  absl::StatusOr<BlockBytes> Read(uint64_t id) override {
    auto r = inner_->Read(id);
    if (!r.ok() || !corrupt_reads) return r;
    auto copy = std::make_shared<std::string>(**r);
    (*copy)[copy->size() / 2] ^= 0x5a;
    return BlockBytes(std::move(copy));
  }
  void Erase(uint64_t id) override { inner_->Erase(id); }
  int fail_writes_after = -1;  // -1: never; n: the (n+1)-th write from now fails
  bool corrupt_reads = false;

 private:
  TierKind kind_;
  std::unique_ptr<Tier> inner_;
};

// The GPU tier's placement logic on host memory: blocks live in one flat buffer carved by an
// ArenaAllocator, so alignment padding and fragmentation refuse writes the budget allows.
class ArenaTier final : public Tier {
 public:
  ArenaTier(int64_t cap, int64_t alignment)
      : arena_(static_cast<size_t>(cap), '\0'), alloc_(cap, alignment) {}
  TierKind kind() const override { return TierKind::kGpu; }
  int64_t capacity_bytes() const override { return static_cast<int64_t>(arena_.size()); }
  absl::Status Write(uint64_t id, const BlockBytes& b) override {
    std::lock_guard<std::mutex> l(mu_);
    auto off = alloc_.Allocate(static_cast<int64_t>(b->size()));
    if (!off.has_value()) return absl::ResourceExhaustedError("arena: no room");
    std::memcpy(arena_.data() + *off, b->data(), b->size());
    where_[id] = {*off, static_cast<int64_t>(b->size())};
    ++writes;
    return absl::OkStatus();
  }
  absl::StatusOr<BlockBytes> Read(uint64_t id) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = where_.find(id);
    if (it == where_.end()) return absl::NotFoundError("arena: no block");
    return std::make_shared<const std::string>(arena_.data() + it->second.first, it->second.second);
  }
  void Erase(uint64_t id) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = where_.find(id);
    if (it == where_.end()) return;
    alloc_.Free(it->second.first);
    where_.erase(it);
  }
  int64_t arena_used() {
    std::lock_guard<std::mutex> l(mu_);
    return alloc_.used();
  }
  int writes = 0;

 private:
  std::mutex mu_;
  std::string arena_;
  ArenaAllocator alloc_;
  std::map<uint64_t, std::pair<int64_t, int64_t>> where_;
};

BlockKey Key(int i, const std::string& model = "m") {
  return BlockKey{"t", model, "", absl::StrCat("h", i)};
}

NewBlock Block(int i, int64_t size, const std::string& model = "m") {
  NewBlock b;
  b.key = Key(i, model);
  b.bytes.assign(size, static_cast<char>('a' + i % 26));
  b.meta.logical_bytes = size * 4;
  b.meta.tokens = 16;
  return b;
}

std::vector<NewBlock> Blocks(std::initializer_list<int> ids, int64_t size) {
  std::vector<NewBlock> v;
  for (int i : ids) v.push_back(Block(i, size));
  return v;
}

std::unique_ptr<BlockStore> HostStore(int64_t cap, double high = 1.0, double low = 1.0) {
  StoreOptions o;
  o.tiers.push_back(NewHostTier(cap));
  o.high_watermark = high;
  o.low_watermark = low;
  return *BlockStore::Create(std::move(o));
}

bool Present(BlockStore& s, int i) { return s.LookupPrefix({Key(i)}).size() == 1; }

TEST(BlockStoreTest, RejectsBadOptions) {
  StoreOptions none;
  EXPECT_EQ(BlockStore::Create(std::move(none)).status().code(),
            absl::StatusCode::kInvalidArgument);
  StoreOptions bad;
  bad.tiers.push_back(NewHostTier(100));
  bad.low_watermark = 0.9;
  bad.high_watermark = 0.5;
  EXPECT_EQ(BlockStore::Create(std::move(bad)).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BlockStoreTest, CommitThenAcquireReturnsBytesAndCountsExactly) {
  auto s = HostStore(1 << 20);
  auto r = s->Commit(Blocks({1, 2, 3}, 100));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->stored, 3);
  EXPECT_EQ(r->stored_bytes, 300);
  EXPECT_EQ(r->logical_bytes, 1200);
  auto leases = s->Acquire({Key(2), Key(9)});
  ASSERT_TRUE(leases[0].has_value());
  EXPECT_EQ(leases[0]->bytes(), std::string(100, 'c'));
  EXPECT_EQ(leases[0]->meta().tokens, 16);
  EXPECT_EQ(leases[0]->tier(), TierKind::kHost);
  EXPECT_FALSE(leases[1].has_value());
  StoreStats st = s->Stats();
  EXPECT_EQ(st.blocks, 3);
  EXPECT_EQ(st.stored_bytes, 300);
  EXPECT_EQ(st.logical_bytes, 1200);
  EXPECT_EQ(st.hits, 1);
  EXPECT_EQ(st.misses, 1);
  ASSERT_EQ(st.tiers.size(), 1u);
  EXPECT_EQ(st.tiers[0].used_bytes, 300);
  EXPECT_EQ(st.tiers[0].blocks, 3);
  EXPECT_EQ(s->Usage("m").blocks, 3);
}

TEST(BlockStoreTest, ExistingKeysAreKeptAndDuplicatesCountOnce) {
  auto s = HostStore(1 << 20);
  ASSERT_TRUE(s->Commit(Blocks({1}, 10)).ok());
  std::vector<NewBlock> again = Blocks({1, 2, 2}, 20);
  auto r = s->Commit(std::move(again));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->stored, 1);
  EXPECT_EQ(r->existing, 2);
  auto l = s->Acquire({Key(1)});
  EXPECT_EQ(l[0]->bytes().size(), 10u);  // the first version stays
}

TEST(BlockStoreTest, BatchLargerThanTopTierStoresNothing) {
  auto s = HostStore(250);
  auto r = s->Commit(Blocks({1, 2, 3}, 100));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s->Stats().blocks, 0);
  EXPECT_EQ(s->Stats().tiers[0].used_bytes, 0);
}

TEST(BlockStoreTest, FailedWriteMidBatchLeavesNothingVisible) {
  StoreOptions o;
  auto tier = std::make_unique<FaultyTier>(TierKind::kHost, 1 << 20);
  FaultyTier* faulty = tier.get();
  o.tiers.push_back(std::move(tier));
  auto s = *BlockStore::Create(std::move(o));
  ASSERT_TRUE(s->Commit(Blocks({0}, 10)).ok());
  faulty->fail_writes_after = 2;
  auto r = s->Commit(Blocks({1, 2, 3, 4}, 10));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  for (int i = 1; i <= 4; ++i) EXPECT_FALSE(Present(*s, i)) << i;
  EXPECT_TRUE(Present(*s, 0));
  EXPECT_EQ(s->Stats().blocks, 1);
  EXPECT_EQ(s->Stats().tiers[0].used_bytes, 10);
}

TEST(BlockStoreTest, EvictsLeastRecentlyUsedDownToLowWatermark) {
  auto s = HostStore(1000, /*high=*/0.9, /*low=*/0.5);
  for (int i = 0; i < 9; ++i) ASSERT_TRUE(s->Commit(Blocks({i}, 100)).ok());
  // 900 bytes: at the high watermark, nothing evicted yet.
  EXPECT_EQ(s->Stats().evictions, 0);
  s->Acquire({Key(0)});  // 0 becomes most recent
  ASSERT_TRUE(s->Commit(Blocks({9}, 100)).ok());
  // 1000 > 900: evict LRU down to 500: blocks 1..5 go.
  StoreStats st = s->Stats();
  EXPECT_EQ(st.tiers[0].used_bytes, 500);
  EXPECT_EQ(st.evictions, 5);
  EXPECT_EQ(st.tiers[0].evictions, 5);
  for (int i : {1, 2, 3, 4, 5}) EXPECT_FALSE(Present(*s, i)) << i;
  for (int i : {0, 6, 7, 8, 9}) EXPECT_TRUE(Present(*s, i)) << i;
}

TEST(BlockStoreTest, LeasedBlocksAreNeverEvicted) {
  auto s = HostStore(300);
  ASSERT_TRUE(s->Commit(Blocks({1, 2, 3}, 100)).ok());
  auto leases = s->Acquire({Key(1), Key(2), Key(3)});
  auto r = s->Commit(Blocks({4}, 100));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  for (int i : {1, 2, 3}) EXPECT_TRUE(Present(*s, i));
  leases[0]->Release();  // block 1 is now the only candidate
  ASSERT_TRUE(s->Commit(Blocks({4}, 100)).ok());
  EXPECT_FALSE(Present(*s, 1));
  EXPECT_EQ(leases[1]->bytes(), std::string(100, 'c'));
}

TEST(BlockStoreTest, DeleteWhileLeasedHidesNowAndFreesOnRelease) {
  auto s = HostStore(1000);
  ASSERT_TRUE(s->Commit(Blocks({1, 2}, 100)).ok());
  auto leases = s->Acquire({Key(1)});
  EXPECT_EQ(s->Delete({Key(1), Key(7)}), 1);
  EXPECT_FALSE(Present(*s, 1));
  EXPECT_EQ(s->Stats().blocks, 1);
  EXPECT_EQ(s->Stats().tiers[0].used_bytes, 200);  // still held by the reader
  EXPECT_EQ(leases[0]->bytes(), std::string(100, 'b'));
  leases.clear();
  EXPECT_EQ(s->Stats().tiers[0].used_bytes, 100);
  // The key can be stored again while nothing references the old one.
  ASSERT_TRUE(s->Commit(Blocks({1}, 50)).ok());
  EXPECT_EQ(s->Acquire({Key(1)})[0]->bytes().size(), 50u);
}

TEST(BlockStoreTest, CorruptBlockIsDroppedAndReportedMissing) {
  StoreOptions o;
  auto tier = std::make_unique<FaultyTier>(TierKind::kHost, 1 << 20);
  FaultyTier* faulty = tier.get();
  o.tiers.push_back(std::move(tier));
  auto s = *BlockStore::Create(std::move(o));
  ASSERT_TRUE(s->Commit(Blocks({1, 2}, 64)).ok());
  faulty->corrupt_reads = true;
  auto l = s->Acquire({Key(1)});
  EXPECT_FALSE(l[0].has_value());
  faulty->corrupt_reads = false;
  StoreStats st = s->Stats();
  EXPECT_EQ(st.corrupt_blocks, 1);
  EXPECT_EQ(st.blocks, 1);
  EXPECT_EQ(st.hits, 0);
  EXPECT_EQ(st.misses, 1);
  EXPECT_EQ(st.tiers[0].used_bytes, 64);
  EXPECT_TRUE(s->Acquire({Key(2)})[0].has_value());
}

TEST(BlockStoreTest, DemotesToLowerTierAndPromotesOnHit) {
  StoreOptions o;
  o.tiers.push_back(NewHostTier(300));
  o.tiers.push_back(NewHostTier(1000));  // stands in for disk
  o.high_watermark = 1.0;
  o.low_watermark = 1.0;
  auto s = *BlockStore::Create(std::move(o));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(s->Commit(Blocks({i}, 100)).ok());
  StoreStats st = s->Stats();
  EXPECT_EQ(st.tiers[0].used_bytes, 300);
  EXPECT_EQ(st.tiers[1].used_bytes, 200);
  EXPECT_EQ(st.tiers[0].demotions, 2);
  EXPECT_EQ(st.evictions, 0);
  EXPECT_EQ(st.blocks, 5);
  std::vector<BlockKey> chain = {Key(2), Key(3), Key(4), Key(0), Key(9)};
  EXPECT_EQ(s->LookupPrefix(chain).size(), 4u);
  // Block 0 is in the lower tier; reading it brings it up and pushes the LRU one down.
  auto l = s->Acquire({Key(0)});
  ASSERT_TRUE(l[0].has_value());
  EXPECT_EQ(l[0]->tier(), TierKind::kHost);
  EXPECT_EQ(l[0]->bytes(), std::string(100, 'a'));
  st = s->Stats();
  EXPECT_EQ(st.tiers[1].hits, 1);
  EXPECT_EQ(st.tiers[0].misses, 1);
  EXPECT_EQ(st.tiers[0].promotions, 1);
  EXPECT_EQ(st.tiers[0].demotions, 3);
  EXPECT_EQ(st.tiers[0].used_bytes, 300);
  EXPECT_EQ(st.tiers[1].used_bytes, 200);
  EXPECT_EQ(s->LookupPrefix({Key(0), Key(2)}).size(), 2u);
}

TEST(BlockStoreTest, FragmentedArenaDemotesUntilTheWriteFits) {
  StoreOptions o;
  auto arena = std::make_unique<ArenaTier>(1024, 256);
  ArenaTier* gpu = arena.get();
  o.tiers.push_back(std::move(arena));
  o.tiers.push_back(NewHostTier(1 << 20));
  o.high_watermark = 1.0;
  o.low_watermark = 1.0;
  auto s = *BlockStore::Create(std::move(o));
  // Four 200-byte blocks take the whole arena (256-byte slots) but only 800 budget bytes.
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(s->Commit(Blocks({i}, 200)).ok());
  EXPECT_EQ(s->Stats().tiers[0].used_bytes, 800);
  EXPECT_EQ(gpu->arena_used(), 1024);
  // Free slots 1 and 3: 400 budget bytes used, two 256-byte holes, no 512-byte range.
  ASSERT_EQ(s->Delete({Key(1), Key(3)}), 2);
  // 200 more bytes fit the budget and a hole: no demotion.
  ASSERT_TRUE(s->Commit(Blocks({4}, 200)).ok());
  EXPECT_EQ(s->Stats().tiers[0].demotions, 0);
  // 300 bytes fit the budget (600 + 300 <= 1024) but no free range: the LRU blocks (0, then 2)
  // go down to the host tier until the arena has a range of 512.
  ASSERT_TRUE(s->Commit(Blocks({5}, 300)).ok());
  StoreStats st = s->Stats();
  EXPECT_EQ(st.tiers[0].demotions, 2);
  EXPECT_EQ(st.tiers[0].used_bytes, 500);  // blocks 4 and 5
  EXPECT_EQ(st.tiers[1].used_bytes, 400);  // blocks 0 and 2
  EXPECT_EQ(st.evictions, 0);
  EXPECT_EQ(gpu->arena_used(), 256 + 512);
  // Everything is still readable, with its own bytes, from the tier it ended in.
  for (int i : {0, 2, 4, 5}) {
    auto l = s->Acquire({Key(i)});
    ASSERT_TRUE(l[0].has_value()) << i;
    EXPECT_EQ(l[0]->bytes(), std::string(i == 5 ? 300 : 200, static_cast<char>('a' + i))) << i;
  }
}

TEST(BlockStoreTest, ArenaThatCannotPlaceABlockOfLeasedDataFailsTheCommit) {
  StoreOptions o;
  o.tiers.push_back(std::make_unique<ArenaTier>(1024, 512));
  o.tiers.push_back(NewHostTier(1 << 20));
  o.high_watermark = 1.0;
  o.low_watermark = 1.0;
  auto s = *BlockStore::Create(std::move(o));
  ASSERT_TRUE(s->Commit(Blocks({0, 1}, 100)).ok());  // two 512-byte slots, 200 budget bytes
  auto leases = s->Acquire({Key(0), Key(1)});
  auto r = s->Commit(Blocks({2}, 100));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(Present(*s, 2));
  EXPECT_EQ(s->Stats().blocks, 2);
  leases.clear();
  ASSERT_TRUE(s->Commit(Blocks({2}, 100)).ok());
  EXPECT_EQ(s->Stats().tiers[0].demotions, 1);
}

TEST(BlockStoreTest, LookupPrefixStopsAtFirstMissing) {
  auto s = HostStore(1 << 20);
  ASSERT_TRUE(s->Commit(Blocks({1, 2, 4}, 10)).ok());
  EXPECT_THAT(s->LookupPrefix({Key(1), Key(2), Key(3), Key(4)}),
              ElementsAre(BlockPlace{TierKind::kHost, -1}, BlockPlace{TierKind::kHost, -1}));
  EXPECT_TRUE(s->LookupPrefix({Key(3), Key(1)}).empty());
  // Lookup is not a read: no hits, no misses.
  EXPECT_EQ(s->Stats().hits + s->Stats().misses, 0);
}

TEST(BlockStoreTest, KeysOfOtherTenantsModelsAndCodebooksDoNotMix) {
  auto s = HostStore(1 << 20);
  std::vector<NewBlock> v;
  v.push_back(Block(1, 10, "a"));
  v.push_back(Block(1, 20, "b"));
  NewBlock other_tenant = Block(1, 30, "a");
  other_tenant.key.tenant = "u";
  v.push_back(std::move(other_tenant));
  NewBlock other_cb = Block(1, 40, "a");
  other_cb.key.codebook_id = "cb";
  v.push_back(std::move(other_cb));
  ASSERT_EQ(s->Commit(std::move(v))->stored, 4);
  EXPECT_EQ(s->Acquire({Key(1, "a")})[0]->bytes().size(), 10u);
  EXPECT_EQ(s->ListKeys("t", "a", 10).size(), 2u);
  EXPECT_EQ(s->DeleteModel("t", "a"), 2);
  EXPECT_EQ(s->Stats().blocks, 2);
  EXPECT_EQ(s->Usage("a").blocks, 1);
  EXPECT_EQ(s->Usage("b").stored_bytes, 20);
}

TEST(BlockStoreTest, ConcurrentTrafficKeepsAccountingExact) {
  StoreOptions o;
  o.tiers.push_back(NewHostTier(20000));
  o.tiers.push_back(NewHostTier(20000));
  auto s = *BlockStore::Create(std::move(o));
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int it = 0; it < 2000; ++it) {
        const int i = static_cast<int>(rng() % 300);
        switch (rng() % 4) {
          case 0:
          case 1:
            s->Commit(Blocks({i}, 100 + i)).IgnoreError();
            break;
          case 2: {
            auto l = s->Acquire({Key(i)});
            if (l[0] && l[0]->bytes() != std::string(100 + i, static_cast<char>('a' + i % 26))) {
              ++wrong;
            }
            break;
          }
          default:
            s->Delete({Key(i)});
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  StoreStats st = s->Stats();
  int64_t blocks = 0, bytes = 0;
  for (int i = 0; i < 300; ++i) {
    if (Present(*s, i)) {
      ++blocks;
      bytes += 100 + i;
    }
  }
  EXPECT_EQ(st.blocks, blocks);
  EXPECT_EQ(st.stored_bytes, bytes);
  EXPECT_EQ(st.tiers[0].used_bytes + st.tiers[1].used_bytes, bytes);
  EXPECT_EQ(st.tiers[0].blocks + st.tiers[1].blocks, blocks);
  EXPECT_LE(st.tiers[0].used_bytes, 20000);
  EXPECT_LE(st.tiers[1].used_bytes, 20000);
}

}  // namespace
}  // namespace vqkv::store
