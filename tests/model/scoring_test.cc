#include "model/scoring.h"

#include <cmath>

#include "gtest/gtest.h"

namespace vqkv::model {
namespace {

TEST(ScoringTest, UniformLogitsGivePerplexityEqualToVocab) {
  const std::vector<float> logits(3 * 4, 0.5f);
  const auto s = ScoreTokens(logits, {0, 1, 2});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->logprob.size(), 2u);
  EXPECT_NEAR(s->logprob[0], -std::log(4.0), 1e-6);
  EXPECT_EQ(s->scored, 2);
  EXPECT_NEAR(s->mean_nll, std::log(4.0), 1e-9);
  EXPECT_NEAR(s->perplexity, 4.0, 1e-9);
}

TEST(ScoringTest, LogProbsArgmaxAndFirstPosition) {
  // vocab 3; row t predicts token t+1.
  const std::vector<float> logits = {0, 2, 0,   // -> argmax 1
                                     0, 0, 5,   // -> argmax 2
                                     9, 0, 0};  // -> argmax 0
  const std::vector<int> tokens = {0, 1, 0};
  const auto s = ScoreTokens(logits, tokens);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->argmax, (std::vector<int>{1, 2, 0}));
  const double lp0 = 2 - std::log(std::exp(0.0) * 2 + std::exp(2.0));
  const double lp1 = 0 - std::log(std::exp(0.0) * 2 + std::exp(5.0));
  EXPECT_NEAR(s->logprob[0], lp0, 1e-6);
  EXPECT_NEAR(s->logprob[1], lp1, 1e-6);
  EXPECT_NEAR(s->mean_nll, -(lp0 + lp1) / 2, 1e-6);
  const auto late = ScoreTokens(logits, tokens, /*first_position=*/1);
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(late->scored, 1);
  EXPECT_NEAR(late->mean_nll, -lp1, 1e-6);
  EXPECT_NEAR(late->perplexity, std::exp(-lp1), 1e-6);
}

TEST(ScoringTest, Errors) {
  EXPECT_EQ(ScoreTokens({1, 2, 3}, {0, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreTokens({}, {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreTokens({0, 0, 0, 0}, {0, 7}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreTokens({0, 0}, {0}, -1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ScoringTest, Top1Agreement) {
  EXPECT_DOUBLE_EQ(*Top1Agreement({1, 2, 3, 4}, {1, 0, 3, 0}), 0.5);
  EXPECT_DOUBLE_EQ(*Top1Agreement({1, 2, 3, 4}, {9, 2, 3, 4}, 1), 1.0);
  EXPECT_DOUBLE_EQ(*Top1Agreement({1}, {2}, 5), 1.0);
  EXPECT_EQ(Top1Agreement({1}, {1, 2}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace vqkv::model
