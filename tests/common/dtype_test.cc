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
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f + 1.0f / 2048)), 1.0f);                // tie -> even
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f + 3.0f / 2048)), 1.0f + 2.0f / 1024);  // tie -> even (up)
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(1e6f))));
  EXPECT_EQ(HalfToFloat(FloatToHalf(6e-8f)), HalfToFloat(1));  // smallest subnormal
}

TEST(DTypeTest, BulkConversionMatchesScalar) {
  // ToFloat/FromFloat may use hardware conversion; they must agree with the scalar functions.
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 300);
  std::vector<float> x(1003);
  for (auto& v : x) v = nd(rng);
  x[3] = 1e-7f;    // subnormal half
  x[4] = 70000.f;  // overflows to Inf
  x[5] = -0.0f;
  std::vector<uint16_t> h(x.size());
  FromFloat(x.data(), x.size(), DType::kF16, h.data());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(h[i], FloatToHalf(x[i])) << i;
  std::vector<float> back(x.size());
  ToFloat(DType::kF16, h.data(), h.size(), back.data());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(back[i], HalfToFloat(h[i])) << i;
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
