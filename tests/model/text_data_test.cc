#include "model/text_data.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/model/model_test_util.h"

namespace vqkv::model {
namespace {

using ::testing::ElementsAre;

TEST(TextDataTest, SplitsAndTrims) {
  EXPECT_THAT(SplitStories("a\n<|endoftext|>\n b c \n<|endoftext|><|endoftext|>\n\nd\ne\n"),
              ElementsAre("a", "b c", "d\ne"));
  EXPECT_TRUE(SplitStories("").empty());
  EXPECT_TRUE(SplitStories("<|endoftext|>  \n").empty());
  EXPECT_THAT(SplitStories("no separator"), ElementsAre("no separator"));
}

TEST(TextDataTest, LoadsRealData) {
  const auto stories = LoadStories(testing::DataFile());
  ASSERT_TRUE(stories.ok()) << stories.status() << " (is shared/ beside the repository?)";
  ASSERT_GT(stories->size(), 50u);
  for (const std::string& s : *stories) {
    EXPECT_EQ(s.find("<|endoftext|>"), std::string::npos);
    EXPECT_FALSE(s.empty());
  }
  // The dump starts mid-story; the first complete story is the second piece.
  EXPECT_EQ((*stories)[1].rfind("Once upon a time, in a big forest", 0), 0u);
}

TEST(TextDataTest, MissingFileIsNotFound) {
  EXPECT_EQ(LoadStories("/nonexistent/stories.txt").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace vqkv::model
