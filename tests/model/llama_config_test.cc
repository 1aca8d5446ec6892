#include "model/llama_config.h"

#include <cmath>

#include "gtest/gtest.h"
#include "tests/model/model_test_util.h"

namespace vqkv::model {
namespace {

TEST(LlamaConfigTest, ParsesRealConfig) {
  const auto c = LoadLlamaConfig(testing::ModelDir() + "/config.json");
  ASSERT_TRUE(c.ok()) << c.status() << " (is shared/ beside the repository?)";
  EXPECT_EQ(c->hidden_size, 128);
  EXPECT_EQ(c->intermediate_size, 384);
  EXPECT_EQ(c->num_hidden_layers, 2);
  EXPECT_EQ(c->num_attention_heads, 8);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->group_size(), 2);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->vocab_size, 2048);
  EXPECT_EQ(c->max_position_embeddings, 512);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_TRUE(c->IsEos(2));
  EXPECT_FALSE(c->IsEos(1));
}

TEST(LlamaConfigTest, DefaultsAndErrors) {
  auto c = ParseLlamaConfig(
      R"({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
          "num_attention_heads": 4, "vocab_size": 100, "eos_token_id": [5, 6]})",
      "inline");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_TRUE(c->IsEos(5) && c->IsEos(6));
  EXPECT_FALSE(c->tie_word_embeddings);

  const auto nulls = ParseLlamaConfig(
      R"({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
          "num_attention_heads": 4, "vocab_size": 100, "tie_word_embeddings": null,
          "hidden_act": null, "rope_scaling": null, "eos_token_id": "x", "head_dim": null})",
      "inline");
  ASSERT_TRUE(nulls.ok()) << nulls.status();
  EXPECT_TRUE(nulls->eos_token_ids.empty());
  EXPECT_EQ(ParseLlamaConfig(R"({"hidden_size": "64"})", "inline").status().code(),
            absl::StatusCode::kInvalidArgument);

  const auto missing = ParseLlamaConfig(R"({"intermediate_size": 128})", "inline");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("hidden_size"), std::string::npos);
  EXPECT_EQ(ParseLlamaConfig(R"({"hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3,
      "vocab_size": 100})",
                             "inline")
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseLlamaConfig(R"({"model_type": "gpt2"})", "inline").status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(ParseLlamaConfig("[1, 2", "inline").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadLlamaConfig("/nonexistent/config.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(LlamaConfigTest, RopeFrequencies) {
  LlamaConfig c;
  c.head_dim = 8;
  c.rope_theta = 10000.0;
  const std::vector<double> f = RopeInverseFrequencies(c);
  ASSERT_EQ(f.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(f[i], std::pow(10000.0, -2.0 * i / 8));
  c.rope_scaling = RopeScaling::kLinear;
  c.rope_factor = 4;
  EXPECT_DOUBLE_EQ(RopeInverseFrequencies(c)[1], f[1] / 4);
  auto l3 = ParseLlamaConfig(
      R"({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
          "num_attention_heads": 1, "vocab_size": 100, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})",
      "inline");
  ASSERT_TRUE(l3.ok()) << l3.status();
  EXPECT_EQ(l3->rope_scaling, RopeScaling::kLlama3);
  const std::vector<double> g = RopeInverseFrequencies(*l3);
  // Highest frequency untouched, lowest divided by the factor.
  EXPECT_DOUBLE_EQ(g.front(), 1.0);
  EXPECT_DOUBLE_EQ(g.back(), std::pow(500000.0, -62.0 / 64) / 8);
}

}  // namespace
}  // namespace vqkv::model
