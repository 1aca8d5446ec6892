#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "server/store/block_store.h"
#include "server/store/tier.h"

namespace vqkv::store {
namespace {

namespace fs = std::filesystem;

fs::path TempDir(const char* name) {
  fs::path p = fs::temp_directory_path() /
               (std::string("vqkv_disk_tier_") + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

TEST(DiskTierTest, WritesReadsErasesAndCleansUp) {
  const fs::path dir = TempDir("rw");
  {
    std::ofstream(dir.string() + ".keep");  // unrelated file next to the directory
    fs::create_directories(dir);
    std::ofstream(dir / "0000000000000042.blk") << "stale";
    std::ofstream(dir / "notes.txt") << "not ours";
    auto tier = NewDiskTier(dir.string(), 1 << 20);
    ASSERT_TRUE(tier.ok()) << tier.status();
    EXPECT_FALSE(fs::exists(dir / "0000000000000042.blk"));  // stale block files are removed
    EXPECT_TRUE(fs::exists(dir / "notes.txt"));
    auto bytes = std::make_shared<const std::string>("hello block");
    ASSERT_TRUE((*tier)->Write(7, bytes).ok());
    auto r = (*tier)->Read(7);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(**r, "hello block");
    EXPECT_EQ((*tier)->Read(8).status().code(), absl::StatusCode::kNotFound);
    (*tier)->Erase(7);
    EXPECT_EQ((*tier)->Read(7).status().code(), absl::StatusCode::kNotFound);
    ASSERT_TRUE((*tier)->Write(9, bytes).ok());
  }
  // Destroying the tier removes its block files but nothing else.
  int blk = 0;
  for (const auto& e : fs::directory_iterator(dir)) blk += e.path().extension() == ".blk";
  EXPECT_EQ(blk, 0);
  EXPECT_TRUE(fs::exists(dir / "notes.txt"));
  fs::remove_all(dir);
  fs::remove(dir.string() + ".keep");
}

TEST(DiskTierTest, RejectsUnusableDirectory) {
  EXPECT_EQ(NewDiskTier("/proc/definitely/not/here", 100).status().code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(NewDiskTier("/tmp", 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DiskTierTest, StoreSpillsToDiskAndEvictsAtTheBottom) {
  const fs::path dir = TempDir("spill");
  StoreOptions o;
  o.tiers.push_back(NewHostTier(200));
  o.tiers.push_back(*NewDiskTier(dir.string(), 300));
  o.high_watermark = 1.0;
  o.low_watermark = 1.0;
  auto s = *BlockStore::Create(std::move(o));
  for (int i = 0; i < 8; ++i) {
    NewBlock b;
    b.key = BlockKey{"t", "m", "", std::to_string(i)};
    b.bytes.assign(100, static_cast<char>('0' + i));
    ASSERT_TRUE(s->Commit({}).ok());
    std::vector<NewBlock> v;
    v.push_back(std::move(b));
    ASSERT_TRUE(s->Commit(std::move(v)).ok());
  }
  StoreStats st = s->Stats();
  EXPECT_EQ(st.tiers[0].kind, TierKind::kHost);
  EXPECT_EQ(st.tiers[1].kind, TierKind::kDisk);
  EXPECT_EQ(st.tiers[0].blocks, 2);
  EXPECT_EQ(st.tiers[1].blocks, 3);
  EXPECT_EQ(st.evictions, 3);
  EXPECT_EQ(st.tiers[1].evictions, 3);
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.path().extension() == ".blk";
  EXPECT_EQ(files, 3);
  // Oldest three are gone; 3..5 are on disk, 6..7 in memory.
  std::vector<BlockKey> chain;
  for (int i = 3; i < 8; ++i) chain.push_back(BlockKey{"t", "m", "", std::to_string(i)});
  std::vector<BlockPlace> tiers = s->LookupPrefix(chain);
  ASSERT_EQ(tiers.size(), 5u);
  EXPECT_EQ(tiers[0].tier, TierKind::kDisk);
  EXPECT_EQ(tiers[2].tier, TierKind::kDisk);
  EXPECT_EQ(tiers[3].tier, TierKind::kHost);
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(s->Acquire({BlockKey{"t", "m", "", std::to_string(i)}})[0].has_value()) << i;
  }
  auto l = s->Acquire({chain[2]});
  ASSERT_TRUE(l[0].has_value());
  EXPECT_EQ(l[0]->tier(), TierKind::kDisk);
  EXPECT_EQ(l[0]->bytes(), std::string(100, '5'));
  EXPECT_EQ(s->LookupPrefix({chain[2]})[0].tier, TierKind::kHost);  // promoted on the hit
  l.clear();
  s.reset();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace vqkv::store
