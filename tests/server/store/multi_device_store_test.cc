// The store with several device tiers side by side (one GPU tier per device), on the CPU:
// placement by free bytes, commits and reads that name a device, device-to-device moves and
// their fallbacks, and a failed device read as a miss. The GPU tiers themselves are tested in
// tests/gpu/multi_gpu_test.cc.
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/store/block_store.h"

namespace vqkv::store {
namespace {

using ::testing::ElementsAre;

// A "GPU" tier on device `device` held in host memory. CopyFrom copies straight from another
// DeviceTier (standing in for a peer copy) unless told to fail; reads fail with Unavailable once
// the device is marked failed.
class DeviceTier final : public Tier {
 public:
  DeviceTier(int device, int64_t cap) : device_(device), inner_(NewHostTier(cap)) {}
  TierKind kind() const override { return TierKind::kGpu; }
  int64_t capacity_bytes() const override { return inner_->capacity_bytes(); }
  int device() const override { return device_; }
  absl::Status Write(uint64_t id, const BlockBytes& b) override {
    if (failed) return absl::UnavailableError("device failed");
    return inner_->Write(id, b);
  }
  absl::StatusOr<BlockBytes> Read(uint64_t id) override {
    if (failed) return absl::UnavailableError(absl::StrCat("device ", device_, " failed"));
    return inner_->Read(id);
  }
  void Erase(uint64_t id) override { inner_->Erase(id); }
  absl::Status CopyFrom(Tier& src, uint64_t id, absl::Time deadline) override {
    auto* from = dynamic_cast<DeviceTier*>(&src);
    if (from == nullptr || !direct) return Tier::CopyFrom(src, id, deadline);
    ++copies;
    if (fail_copies || from->failed || failed) return absl::UnavailableError("link down");
    auto bytes = from->inner_->Read(id);
    if (!bytes.ok()) return bytes.status();
    return inner_->Write(id, *bytes);
  }

  bool direct = true;        // implements CopyFrom
  bool fail_copies = false;  // CopyFrom answers Unavailable
  bool failed = false;       // the device is gone: reads and writes answer Unavailable
  int copies = 0;

 private:
  const int device_;
  std::unique_ptr<Tier> inner_;
};

BlockKey Key(int i) { return BlockKey{"t", "m", "", absl::StrCat("h", i)}; }

NewBlock Block(int i, int64_t size) {
  NewBlock b;
  b.key = Key(i);
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

struct TwoDevices {
  DeviceTier* dev[2];
  std::unique_ptr<BlockStore> store;
};

// Tiers: device 0 and device 1 (`cap` each) side by side, then host.
TwoDevices MakeStore(int64_t cap = 1000, int64_t host = 10000) {
  TwoDevices t;
  StoreOptions o;
  for (int d = 0; d < 2; ++d) {
    auto tier = std::make_unique<DeviceTier>(d, cap);
    t.dev[d] = tier.get();
    o.tiers.push_back(std::move(tier));
  }
  o.tiers.push_back(NewHostTier(host));
  o.high_watermark = 1.0;
  o.low_watermark = 1.0;
  t.store = *BlockStore::Create(std::move(o));
  return t;
}

std::vector<int> DevicesOf(const BlockStore& s, std::initializer_list<int> ids) {
  std::vector<int> out;
  for (int i : ids) {
    auto p = s.LookupPrefix({Key(i)});
    out.push_back(p.empty() ? -2 : p[0].device);
  }
  return out;
}

TEST(MultiDeviceStoreTest, RejectsTwoTiersOnOneDevice) {
  StoreOptions o;
  o.tiers.push_back(std::make_unique<DeviceTier>(0, 100));
  o.tiers.push_back(std::make_unique<DeviceTier>(0, 100));
  EXPECT_EQ(BlockStore::Create(std::move(o)).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MultiDeviceStoreTest, DevicesAndStats) {
  TwoDevices t = MakeStore();
  EXPECT_THAT(t.store->Devices(), ElementsAre(0, 1));
  EXPECT_TRUE(t.store->HasTopDevice(1));
  EXPECT_FALSE(t.store->HasTopDevice(2));
  EXPECT_FALSE(t.store->HasTopDevice(-1));
  const StoreStats st = t.store->Stats();
  ASSERT_EQ(st.tiers.size(), 3u);
  EXPECT_EQ(st.tiers[0].device, 0);
  EXPECT_EQ(st.tiers[1].device, 1);
  EXPECT_EQ(st.tiers[2].device, -1);
  EXPECT_EQ(st.tiers[2].kind, TierKind::kHost);
}

TEST(MultiDeviceStoreTest, PlacesEachCommitOnTheDeviceWithMostFreeBytes) {
  TwoDevices t = MakeStore();
  EXPECT_EQ(t.store->PickDevice(), 0);  // a tie goes to the first device
  ASSERT_TRUE(t.store->Commit(Blocks({1, 2}, 150)).ok());
  EXPECT_EQ(t.store->PickDevice(), 1);
  ASSERT_TRUE(t.store->Commit(Blocks({3}, 200)).ok());
  ASSERT_TRUE(t.store->Commit(Blocks({4}, 50)).ok());   // 1: 800 free vs 0: 700 free
  ASSERT_TRUE(t.store->Commit(Blocks({5}, 100)).ok());  // 1: 750 free vs 0: 700 free
  EXPECT_THAT(DevicesOf(*t.store, {1, 2, 3, 4, 5}), ElementsAre(0, 0, 1, 1, 1));
  const StoreStats st = t.store->Stats();
  EXPECT_EQ(st.tiers[0].used_bytes, 300);
  EXPECT_EQ(st.tiers[1].used_bytes, 350);
  EXPECT_EQ(st.tiers[0].blocks, 2);
  EXPECT_EQ(st.tiers[1].blocks, 3);
}

TEST(MultiDeviceStoreTest, CommitToANamedDevice) {
  TwoDevices t = MakeStore();
  ASSERT_TRUE(t.store->Commit(Blocks({1}, 100), 1).ok());
  ASSERT_TRUE(t.store->Commit(Blocks({2}, 100), 1).ok());
  EXPECT_THAT(DevicesOf(*t.store, {1, 2}), ElementsAre(1, 1));
  EXPECT_EQ(t.store->Commit(Blocks({3}, 100), 7).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A host-only store has no device at all.
  StoreOptions o;
  o.tiers.push_back(NewHostTier(1000));
  auto host = *BlockStore::Create(std::move(o));
  EXPECT_EQ(host->PickDevice(), -1);
  EXPECT_TRUE(host->Devices().empty());
  EXPECT_EQ(host->Commit(Blocks({3}, 100), 0).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(host->Commit(Blocks({3}, 100)).ok());
  EXPECT_THAT(host->LookupPrefix({Key(3)}), ElementsAre(BlockPlace{TierKind::kHost, -1}));
}

TEST(MultiDeviceStoreTest, ReadOnAnotherDeviceMovesTheBlockThere) {
  TwoDevices t = MakeStore();
  ASSERT_TRUE(t.store->Commit(Blocks({1, 2}, 100), 1).ok());
  auto leases = t.store->Acquire({Key(1), Key(2)}, {.device = 0});
  ASSERT_TRUE(leases[0].has_value() && leases[1].has_value());
  EXPECT_EQ(leases[0]->device(), 0);
  EXPECT_EQ(leases[0]->tier(), TierKind::kGpu);
  EXPECT_EQ(leases[0]->bytes(), std::string(100, 'b'));
  EXPECT_EQ(leases[1]->bytes(), std::string(100, 'c'));
  EXPECT_EQ(t.dev[0]->copies, 2);
  EXPECT_THAT(DevicesOf(*t.store, {1, 2}), ElementsAre(0, 0));
  const StoreStats st = t.store->Stats();
  EXPECT_EQ(st.tiers[0].transfers_in, 2);
  EXPECT_EQ(st.tiers[1].transfers_out, 2);
  EXPECT_EQ(st.tiers[0].used_bytes, 200);
  EXPECT_EQ(st.tiers[1].used_bytes, 0);
  EXPECT_EQ(st.tiers[1].hits, 2);  // found on device 1
  EXPECT_EQ(st.tiers[0].demotions + st.tiers[1].demotions + st.tiers[0].promotions, 0);
  // A read with no device leaves blocks where they are.
  auto again = t.store->Acquire({Key(1)});
  EXPECT_EQ(again[0]->device(), 0);
  EXPECT_EQ(t.dev[0]->copies + t.dev[1]->copies, 2);
}

TEST(MultiDeviceStoreTest, AFailedTransferFallsBackToTheHostPath) {
  TwoDevices t = MakeStore();
  ASSERT_TRUE(t.store->Commit(Blocks({1}, 100), 1).ok());
  t.dev[0]->fail_copies = true;
  auto leases = t.store->Acquire({Key(1)}, {.device = 0});
  ASSERT_TRUE(leases[0].has_value());
  EXPECT_EQ(leases[0]->device(), 0);
  EXPECT_EQ(leases[0]->bytes(), std::string(100, 'b'));
  const StoreStats st = t.store->Stats();
  EXPECT_EQ(st.tiers[0].transfer_failures, 1);
  EXPECT_EQ(st.tiers[0].transfers_in, 1);
  // A tier without direct copies is not a failure: the host path is its way.
  ASSERT_TRUE(t.store->Commit(Blocks({2}, 100), 1).ok());
  t.dev[0]->direct = false;
  ASSERT_TRUE(t.store->Acquire({Key(2)}, {.device = 0})[0].has_value());
  EXPECT_EQ(t.store->Stats().tiers[0].transfer_failures, 1);
  EXPECT_THAT(DevicesOf(*t.store, {2}), ElementsAre(0));
}

TEST(MultiDeviceStoreTest, AFailedDeviceIsAMissNotCorruption) {
  TwoDevices t = MakeStore();
  ASSERT_TRUE(t.store->Commit(Blocks({1}, 100), 1).ok());
  ASSERT_TRUE(t.store->Commit(Blocks({2}, 100), 0).ok());
  t.dev[1]->failed = true;
  auto leases = t.store->Acquire({Key(1), Key(2)}, {.device = 0});
  EXPECT_FALSE(leases[0].has_value());
  ASSERT_TRUE(leases[1].has_value());
  EXPECT_EQ(leases[1]->bytes(), std::string(100, 'c'));
  StoreStats st = t.store->Stats();
  EXPECT_EQ(st.misses, 1);
  EXPECT_EQ(st.hits, 1);
  EXPECT_EQ(st.corrupt_blocks, 0);
  EXPECT_EQ(st.tiers[1].unavailable_reads, 1);
  EXPECT_EQ(st.blocks, 2);  // kept: the device may come back
  // Without a destination the read of the failed device is a miss too; once it is back, a hit.
  EXPECT_FALSE(t.store->Acquire({Key(1)})[0].has_value());
  t.dev[1]->failed = false;
  auto back = t.store->Acquire({Key(1)});
  ASSERT_TRUE(back[0].has_value());
  EXPECT_EQ(back[0]->device(), 1);
}

TEST(MultiDeviceStoreTest, DemotesToHostAndPromotesToTheAskedDevice) {
  TwoDevices t = MakeStore(/*cap=*/200);
  ASSERT_TRUE(t.store->Commit(Blocks({1, 2}, 100), 0).ok());
  ASSERT_TRUE(t.store->Commit(Blocks({3}, 100), 0).ok());  // demotes 1 to host
  EXPECT_THAT(t.store->LookupPrefix({Key(1)}), ElementsAre(BlockPlace{TierKind::kHost, -1}));
  EXPECT_EQ(t.store->Stats().tiers[0].demotions, 1);
  auto leases = t.store->Acquire({Key(1)}, {.device = 1});
  ASSERT_TRUE(leases[0].has_value());
  EXPECT_EQ(leases[0]->tier(), TierKind::kHost);  // read where it was found
  EXPECT_THAT(DevicesOf(*t.store, {1}), ElementsAre(1));
  EXPECT_EQ(t.store->Stats().tiers[1].promotions, 1);
  EXPECT_EQ(t.store->Stats().tiers[2].hits, 1);
}

TEST(MultiDeviceStoreTest, MovingToAFullDeviceMakesRoomThere) {
  TwoDevices t = MakeStore(/*cap=*/200);
  ASSERT_TRUE(t.store->Commit(Blocks({1, 2}, 100), 0).ok());
  ASSERT_TRUE(t.store->Commit(Blocks({3}, 100), 1).ok());
  auto leases = t.store->Acquire({Key(3)}, {.device = 0});
  ASSERT_TRUE(leases[0].has_value());
  EXPECT_EQ(leases[0]->device(), 0);
  const StoreStats st = t.store->Stats();
  EXPECT_EQ(st.tiers[0].used_bytes, 200);
  EXPECT_EQ(st.tiers[0].demotions, 1);  // the LRU block of device 0 went to host
  EXPECT_EQ(st.tiers[2].blocks, 1);
  EXPECT_EQ(st.blocks, 3);
}

}  // namespace
}  // namespace vqkv::store
