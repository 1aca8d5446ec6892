#include "kernels/bitpack.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace vqkv::kernels {
namespace {

TEST(BitpackTest, RoundTripsEveryWidth) {
  std::mt19937 rng(7);
  for (int bits = 1; bits <= 16; ++bits) {
    for (int n : {1, 7, 8, 9, 1000}) {
      std::vector<uint32_t> codes(n);
      for (auto& c : codes) c = rng() & ((1u << bits) - 1);
      std::string buf;
      {
        BitWriter w(&buf);
        for (uint32_t c : codes) w.Put(c, bits);
      }
      ASSERT_EQ(int64_t(buf.size()), PackedBytes(n, bits)) << "bits " << bits << " n " << n;
      BitReader r(buf);
      for (int i = 0; i < n; ++i) ASSERT_EQ(r.Get(bits), codes[i]) << "bits " << bits << " i " << i;
    }
  }
}

TEST(BitpackTest, NoPaddingBetweenCodes) {
  std::string buf;
  {
    BitWriter w(&buf);
    for (int i = 0; i < 8; ++i) w.Put(0x3ff, 10);  // 80 bits
  }
  EXPECT_EQ(buf.size(), 10u);
  EXPECT_EQ(buf, std::string(10, '\xff'));
}

TEST(BitpackTest, ReadingPastEndGivesZeros) {
  BitReader r(std::string_view("\x01", 1));
  EXPECT_EQ(r.Get(8), 1u);
  EXPECT_EQ(r.Get(16), 0u);
}

}  // namespace
}  // namespace vqkv::kernels
