#include "common/dtype.h"

#include <cmath>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace vqkv {
namespace {

TEST(DTypeTest, HalfRoundTripsEveryFiniteHalf) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t v = static_cast<uint16_t>(h);
    const float f = HalfToFloat(v);
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToHalf(f), v) << "half 0x" << std::hex << h;
  }
}

TEST(DTypeTest, HalfRoundsToNearestEven) {
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f + 1.0f / 2048)), 1.0f);            // tie -> even
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f + 3.0f / 2048)), 1.0f + 2.0f / 1024);  // tie -> even (up)
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(1e6f))));
  EXPECT_EQ(HalfToFloat(FloatToHalf(6e-8f)), HalfToFloat(1));  // smallest subnormal
}

TEST(DTypeTest, BF16RoundTrip) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0, 10);
  for (int i = 0; i < 1000; ++i) {
    const float x = nd(rng);
    const float y = BF16ToFloat(FloatToBF16(x));
    EXPECT_NEAR(x, y, std::abs(x) / 128);
    EXPECT_EQ(FloatToBF16(y), FloatToBF16(x));
  }
}

TEST(DTypeTest, ParseNamesAndRejectsUnknown) {
  EXPECT_EQ(*ParseDType("bf16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("float16"), DType::kF16);
  auto bad = ParseDType("int8");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("int8"), absl::string_view::npos);
}

}  // namespace
}  // namespace vqkv
