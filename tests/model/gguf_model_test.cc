#include "model/gguf_model.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/gguf_tokenizer.h"
#include "tests/model/gguf_test_util.h"

namespace vqkv::model {
namespace {

using testing::GgufBuilder;

// convert_hf_to_gguf.py's permute(), written out for the test.
std::vector<float> HfToGgufPermute(const std::vector<float>& w, int heads, int head_dim, int cols) {
  std::vector<float> out(w.size());
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h) {
    for (int j = 0; j < 2; ++j) {
      for (int i = 0; i < half; ++i) {
        for (int c = 0; c < cols; ++c) {
          out[((h * head_dim) + 2 * i + j) * cols + c] =
              w[((h * head_dim) + j * half + i) * cols + c];
        }
      }
    }
  }
  return out;
}

TEST(GgufModelTest, UnpermuteInvertsConverterPermute) {
  const int heads = 3, hd = 8, cols = 5;
  std::vector<float> w(heads * hd * cols);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i);
  std::vector<float> p = HfToGgufPermute(w, heads, hd, cols);
  ASSERT_NE(p, w);
  UnpermuteRopeRows(&p, heads, hd, cols);
  EXPECT_EQ(p, w);
}

// A complete two-layer model with hidden 8, 2 heads, 1 KV head, ff 16, vocab 6.
std::string TinyModel(bool tied) {
  GgufBuilder b;
  b.KvStr("general.architecture", "llama");
  b.KvU32("llama.block_count", 2);
  b.KvU32("llama.context_length", 64);
  b.KvU32("llama.embedding_length", 8);
  b.KvU32("llama.feed_forward_length", 16);
  b.KvU32("llama.attention.head_count", 2);
  b.KvU32("llama.attention.head_count_kv", 1);
  b.KvF32("llama.rope.freq_base", 500.0f);
  b.KvF32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  b.KvStr("tokenizer.ggml.model", "gpt2");
  b.KvStr("tokenizer.ggml.pre", "smollm");
  b.KvStrArray("tokenizer.ggml.tokens", {"<|endoftext|>", "a", "b", "Ġ", "ab", "Ġab"});
  b.KvI32Array("tokenizer.ggml.token_type", {3, 1, 1, 1, 1, 1});
  b.KvStrArray("tokenizer.ggml.merges", {"a b", "Ġ ab"});
  b.KvU32("tokenizer.ggml.eos_token_id", 0);
  b.KvBool("tokenizer.ggml.add_bos_token", false);
  auto f32 = [](int n, float scale) {
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[i] = scale * static_cast<float>((i * 7919) % 13 - 6);
    return GgufBuilder::F32s(v);
  };
  b.Tensor("token_embd.weight", {8, 6}, 0, f32(48, 0.1f));
  b.Tensor("output_norm.weight", {8}, 0, f32(8, 0.2f));
  if (!tied) b.Tensor("output.weight", {8, 6}, 0, f32(48, 0.05f));
  for (int l = 0; l < 2; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    b.Tensor(p + "attn_norm.weight", {8}, 0, f32(8, 0.3f));
    b.Tensor(p + "ffn_norm.weight", {8}, 0, f32(8, 0.3f));
    b.Tensor(p + "attn_q.weight", {8, 8}, 0, f32(64, 0.05f));
    b.Tensor(p + "attn_k.weight", {8, 4}, 0, f32(32, 0.05f));
    b.Tensor(p + "attn_v.weight", {8, 4}, 0, f32(32, 0.05f));
    b.Tensor(p + "attn_output.weight", {8, 8}, 0, f32(64, 0.05f));
    b.Tensor(p + "ffn_gate.weight", {8, 16}, 0, f32(128, 0.05f));
    b.Tensor(p + "ffn_up.weight", {8, 16}, 0, f32(128, 0.05f));
    b.Tensor(p + "ffn_down.weight", {16, 8}, 0, f32(128, 0.05f));
  }
  return b.Build();
}

TEST(GgufModelTest, ConfigWeightsAndForwardFromTinyFile) {
  for (bool tied : {true, false}) {
    auto g = GgufFile::Parse(TinyModel(tied), "tiny");
    ASSERT_TRUE(g.ok()) << g.status();
    auto c = LlamaConfigFromGguf(*g);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->num_hidden_layers, 2);
    EXPECT_EQ(c->hidden_size, 8);
    EXPECT_EQ(c->num_attention_heads, 2);
    EXPECT_EQ(c->num_key_value_heads, 1);
    EXPECT_EQ(c->head_dim, 4);
    EXPECT_EQ(c->intermediate_size, 16);
    EXPECT_EQ(c->vocab_size, 6);
    EXPECT_EQ(c->max_position_embeddings, 64);
    EXPECT_DOUBLE_EQ(c->rope_theta, 500.0);
    EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-5f);
    EXPECT_EQ(c->tie_word_embeddings, tied);
    EXPECT_TRUE(c->IsEos(0));
    auto w = LlamaWeightsFromGguf(*g, *c);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->lm_head.w.empty(), tied);
    auto m = LlamaModel::Create(*c, std::move(*w));
    ASSERT_TRUE(m.ok()) << m.status();
    auto logits = m->Forward({0, 1, 2, 5});
    ASSERT_TRUE(logits.ok()) << logits.status();
    EXPECT_EQ(logits->size(), 4u * 6u);
  }
}

TEST(GgufModelTest, MissingOrMisshapenTensorsAreNamed) {
  GgufBuilder b;
  b.KvStr("general.architecture", "llama");
  auto g = GgufFile::Parse(b.Build(), "empty");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(LlamaConfigFromGguf(*g).status().code(), absl::StatusCode::kNotFound);
  GgufBuilder q;
  q.KvStr("general.architecture", "qwen2");
  EXPECT_EQ(LlamaConfigFromGguf(*GgufFile::Parse(q.Build(), "q")).status().code(),
            absl::StatusCode::kUnimplemented);
  // Drop one tensor by renaming it.
  std::string f = TinyModel(true);
  const size_t at = f.find("blk.1.ffn_up.weight");
  ASSERT_NE(at, std::string::npos);
  f[at + 4] = '7';
  auto g2 = GgufFile::Parse(f, "renamed");
  ASSERT_TRUE(g2.ok()) << g2.status();
  auto c = LlamaConfigFromGguf(*g2);
  ASSERT_TRUE(c.ok());
  EXPECT_THAT(LlamaWeightsFromGguf(*g2, *c).status().message(),
              ::testing::HasSubstr("blk.1.ffn_up.weight"));
}

TEST(GgufModelTest, TinyTokenizer) {
  auto g = GgufFile::Parse(TinyModel(true), "tiny");
  ASSERT_TRUE(g.ok());
  auto tok = LoadGgufTokenizer(*g);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(tok->Encode("ab ab<|endoftext|>a", false), (std::vector<int>{4, 5, 0, 1}));
  EXPECT_EQ(tok->bos_id(), 0);
  EXPECT_EQ(tok->EncodeForScoring("ab"), (std::vector<int>{0, 4}));
  EXPECT_EQ(tok->Decode({4, 5, 0, 1}), "ab aba");
}

// The real SmolLM2-135M file, when VQKV_TEST_GGUF names it (scripts/fetch-smollm2.sh prints
// the path); ids from Hugging Face `tokenizers` (bench/smollm2_reference/check.py).
TEST(GgufModelTest, SmolLM2TokenizerAndGeneration) {
  const char* path = std::getenv("VQKV_TEST_GGUF");
  if (path == nullptr || *path == '\0') GTEST_SKIP() << "VQKV_TEST_GGUF not set";
  auto g = GgufFile::Open(path);
  ASSERT_TRUE(g.ok()) << g.status();
  auto tok = LoadGgufTokenizer(*g);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(
      tok->Encode("Once upon a time, there was a little girl named Lily.", false),
      (std::vector<int>{6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 3365, 14176, 30}));
  EXPECT_EQ(tok->Encode("The year 2024 had 366 days; it's a leap year.", false),
            (std::vector<int>{504, 713, 216,  34, 32,  34,  36,  761,   216, 35,
                              38,  38,  2009, 43, 357, 506, 253, 19894, 713, 30}));
  auto c = LlamaConfigFromGguf(*g);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_hidden_layers, 30);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->num_key_value_heads, 3);
  auto w = LlamaWeightsFromGguf(*g, *c);
  ASSERT_TRUE(w.ok()) << w.status();
  auto m = LlamaModel::Create(*c, std::move(*w));
  ASSERT_TRUE(m.ok()) << m.status();
  auto gen = m->Generate(tok->EncodeForScoring("Once upon a time, there was a little girl"), 8);
  ASSERT_TRUE(gen.ok()) << gen.status();
  EXPECT_THAT(tok->Decode(*gen), ::testing::HasSubstr(" named"));
}

}  // namespace
}  // namespace vqkv::model
