#include "model/gguf_dequant.h"

#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "model/gguf.h"
#include "tests/model/gguf_test_util.h"

namespace vqkv::model {
namespace {

using testing::GgufBuilder;

std::string Half(float f) { return GgufBuilder::Pod(FloatToHalf(f)); }

TEST(GgufDequantTest, Q4_1LowNibblesFirstThenHigh) {
  // d = 0.5, m = -1; byte j holds value j (low nibble) and value j + 16 (high nibble).
  std::string block = Half(0.5f) + Half(-1.0f);
  for (int j = 0; j < 16; ++j) block.push_back(static_cast<char>((j & 15) | ((15 - j) << 4)));
  std::vector<float> out(32);
  ASSERT_TRUE(Dequantize(static_cast<uint32_t>(GgmlType::kQ4_1), block, 32, out.data()).ok());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.5f * j - 1.0f) << j;
    EXPECT_EQ(out[j + 16], 0.5f * (15 - j) - 1.0f) << j;
  }
}

TEST(GgufDequantTest, Q8_0SignedTimesScale) {
  std::string block = Half(0.25f);
  for (int j = 0; j < 32; ++j) block.push_back(static_cast<char>(j * 8 - 128));
  std::string two = block + Half(-2.0f) + std::string(32, '\x01');
  std::vector<float> out(64);
  ASSERT_TRUE(Dequantize(static_cast<uint32_t>(GgmlType::kQ8_0), two, 64, out.data()).ok());
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 0.25f * (j * 8 - 128)) << j;
  for (int j = 32; j < 64; ++j) EXPECT_EQ(out[j], -2.0f) << j;
}

TEST(GgufDequantTest, Q4_0CentredAtEight) {
  std::string block = Half(2.0f);
  for (int j = 0; j < 16; ++j) block.push_back(static_cast<char>(0x80 | j));  // high nibble 8
  std::vector<float> out(32);
  ASSERT_TRUE(Dequantize(static_cast<uint32_t>(GgmlType::kQ4_0), block, 32, out.data()).ok());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 2.0f * (j - 8));
    EXPECT_EQ(out[j + 16], 0.0f);
  }
}

TEST(GgufDequantTest, FloatTypes) {
  std::vector<float> out(2);
  ASSERT_TRUE(
      Dequantize(static_cast<uint32_t>(GgmlType::kF16), Half(1.5f) + Half(-0.125f), 2, out.data())
          .ok());
  EXPECT_EQ(out, (std::vector<float>{1.5f, -0.125f}));
  const std::string bf = GgufBuilder::Pod(FloatToBF16(3.0f)) + GgufBuilder::Pod(FloatToBF16(-1.0f));
  ASSERT_TRUE(Dequantize(static_cast<uint32_t>(GgmlType::kBF16), bf, 2, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{3.0f, -1.0f}));
  ASSERT_TRUE(Dequantize(0, GgufBuilder::F32s({7.0f, -8.0f}), 2, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{7.0f, -8.0f}));
}

TEST(GgufDequantTest, SizeErrors) {
  std::vector<float> out(64);
  EXPECT_EQ(Dequantize(3, std::string(19, '\0'), 32, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Dequantize(3, std::string(20, '\0'), 31, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Dequantize(12, std::string(144, '\0'), 256, out.data()).code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(*GgmlTensorBytes(3, 64), 40u);
  EXPECT_EQ(*GgmlTensorBytes(8, 64), 68u);
}

}  // namespace
}  // namespace vqkv::model
