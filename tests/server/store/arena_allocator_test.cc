#include "server/store/arena_allocator.h"

#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace vqkv::store {
namespace {

TEST(ArenaAllocatorTest, AlignsAndRoundsEveryRange) {
  ArenaAllocator a(1000, 256);  // rounded down to 768
  EXPECT_EQ(a.capacity(), 768);
  EXPECT_EQ(a.largest_free(), 768);
  auto x = a.Allocate(1);
  auto y = a.Allocate(257);
  ASSERT_TRUE(x.has_value() && y.has_value());
  EXPECT_EQ(*x, 0);
  EXPECT_EQ(*y, 256);
  EXPECT_EQ(a.used(), 768);
  EXPECT_FALSE(a.Allocate(1).has_value());  // full: the padding counts
  EXPECT_FALSE(a.Allocate(0).has_value());
  EXPECT_FALSE(a.Allocate(-5).has_value());
}

TEST(ArenaAllocatorTest, FreeCoalescesWithBothNeighbours) {
  ArenaAllocator a(4 * 256, 256);
  std::vector<int64_t> off;
  for (int i = 0; i < 4; ++i) off.push_back(*a.Allocate(256));
  EXPECT_TRUE(a.Free(off[0]));
  EXPECT_TRUE(a.Free(off[2]));
  // Two holes of 256 bytes: 512 bytes free but no range of 512.
  EXPECT_EQ(a.used(), 512);
  EXPECT_EQ(a.free_ranges(), 2);
  EXPECT_EQ(a.largest_free(), 256);
  EXPECT_FALSE(a.Allocate(512).has_value());
  EXPECT_TRUE(a.Free(off[1]));  // joins [0, 768)
  EXPECT_EQ(a.free_ranges(), 1);
  EXPECT_EQ(a.largest_free(), 768);
  auto big = a.Allocate(700);
  ASSERT_TRUE(big.has_value());
  EXPECT_EQ(*big, 0);
  EXPECT_TRUE(a.Free(off[3]));
  EXPECT_TRUE(a.Free(*big));
  EXPECT_EQ(a.used(), 0);
  EXPECT_EQ(a.free_ranges(), 1);
  EXPECT_EQ(a.largest_free(), 1024);
}

TEST(ArenaAllocatorTest, FirstFitReusesTheLowestHole) {
  ArenaAllocator a(8 * 64, 64);
  std::vector<int64_t> off;
  for (int i = 0; i < 8; ++i) off.push_back(*a.Allocate(64));
  a.Free(off[5]);
  a.Free(off[2]);
  EXPECT_EQ(*a.Allocate(10), off[2]);
  EXPECT_EQ(*a.Allocate(10), off[5]);
}

TEST(ArenaAllocatorTest, RejectsUnknownAndDoubleFrees) {
  ArenaAllocator a(1024, 128);
  const int64_t x = *a.Allocate(100);
  EXPECT_FALSE(a.Free(x + 128));
  EXPECT_FALSE(a.Free(-1));
  EXPECT_TRUE(a.Free(x));
  EXPECT_FALSE(a.Free(x));
  EXPECT_EQ(a.used(), 0);
}

// Random allocations and frees against a byte map of the arena: ranges never overlap, stay
// aligned and inside the arena, and used + free always equals the capacity.
TEST(ArenaAllocatorTest, RandomWorkloadKeepsRangesDisjoint) {
  constexpr int64_t kCap = 1 << 16, kAlign = 32;
  ArenaAllocator a(kCap, kAlign);
  std::vector<int> owner(kCap, -1);
  std::map<int64_t, int64_t> live;  // offset -> requested size
  std::mt19937 rng(11);
  int next_id = 0, failures = 0;
  for (int step = 0; step < 20000; ++step) {
    const bool alloc = live.empty() || rng() % 3 != 0;
    if (alloc) {
      const int64_t size = 1 + rng() % 3000;
      auto off = a.Allocate(size);
      if (!off.has_value()) {
        ++failures;
        EXPECT_LT(a.largest_free(), a.RoundUp(size));
        continue;
      }
      ASSERT_EQ(*off % kAlign, 0);
      ASSERT_LE(*off + size, kCap);
      const int id = next_id++;
      for (int64_t i = *off; i < *off + a.RoundUp(size); ++i) {
        ASSERT_EQ(owner[i], -1) << "overlap at " << i;
        owner[i] = id;
      }
      live[*off] = size;
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      for (int64_t i = it->first; i < it->first + a.RoundUp(it->second); ++i) owner[i] = -1;
      ASSERT_TRUE(a.Free(it->first));
      live.erase(it);
    }
    int64_t used = 0;
    for (const auto& [off, size] : live) used += a.RoundUp(size);
    ASSERT_EQ(a.used(), used);
  }
  EXPECT_GT(failures, 0);  // the workload did reach a full/fragmented arena
  for (const auto& [off, size] : live) ASSERT_TRUE(a.Free(off));
  EXPECT_EQ(a.free_ranges(), 1);
  EXPECT_EQ(a.largest_free(), kCap);
}

}  // namespace
}  // namespace vqkv::store
