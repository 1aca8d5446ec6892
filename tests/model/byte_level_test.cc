#include "model/byte_level.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace vqkv::model {
namespace {

using Words = std::vector<std::string>;

TEST(ByteLevelTest, Gpt2Regex) {
  // "Ġ" is the byte-level spelling of a space, "Ċ" of a newline.
  EXPECT_EQ(ByteLevelPreTokenize("Hello, world!", false), (Words{"Hello", ",", "Ġworld", "!"}));
  EXPECT_EQ(ByteLevelPreTokenize("it's they're", false), (Words{"it", "'s", "Ġthey", "'re"}));
  EXPECT_EQ(ByteLevelPreTokenize("a   b", false), (Words{"a", "ĠĠ", "Ġb"}));
  EXPECT_EQ(ByteLevelPreTokenize("a\nb  ", false), (Words{"a", "Ċ", "b", "ĠĠ"}));
  EXPECT_EQ(ByteLevelPreTokenize("x 123", false), (Words{"x", "Ġ123"}));
}

TEST(ByteLevelTest, IndividualDigits) {
  EXPECT_EQ(ByteLevelPreTokenize("x 123", true), (Words{"x", "Ġ", "1", "2", "3"}));
  EXPECT_EQ(ByteLevelPreTokenize("2+2=4", true), (Words{"2", "+", "2", "=", "4"}));
}

TEST(ByteLevelTest, EncodeDecodeRoundTripsAllBytes) {
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::string mapped = ByteLevelEncode(all);
  EXPECT_EQ(ByteLevelDecode(mapped), all);
  EXPECT_EQ(ByteLevelEncode(" "), "\xC4\xA0");  // U+0120 'Ġ'
  EXPECT_EQ(ByteLevelEncode("A"), "A");
}

TEST(ByteLevelTest, NonAsciiLettersStayInWords) {
  const Words w = ByteLevelPreTokenize("caf\xC3\xA9 ok", false);
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(ByteLevelDecode(w[0]), "caf\xC3\xA9");
}

}  // namespace
}  // namespace vqkv::model
