#include "model/tokenizer.h"

#include <chrono>
#include <string>
#include <vector>

#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/text_data.h"
#include "tests/model/model_test_util.h"

namespace vqkv::model {
namespace {

using ::testing::ElementsAre;
using testing::FreshDir;
using testing::RealTokenizer;

// Writes a small LLaMA-style tokenizer.json whose vocab has byte tokens for "é" and merges
// given by the caller.
std::string WriteToyTokenizer(const std::string& name, const std::string& merges) {
  const std::string dir = FreshDir(name);
  const std::string json = R"({
    "added_tokens": [
      {"id": 0, "content": "<unk>", "normalized": false, "special": true},
      {"id": 1, "content": "<s>", "normalized": false, "special": true},
      {"id": 2, "content": "</s>", "normalized": false, "special": true}],
    "normalizer": {"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "\u2581"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": null,
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true,
      "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, "a": 4, "b": 5, "c": 6,
                "ab": 7, "bc": 8, "abc": 9, "<0xC3>": 10, "<0xA9>": 11, "\u2581a": 12},
      "merges": )" + merges +
                           "}}";
  EXPECT_TRUE(WriteStringToFile(dir + "/tokenizer.json", json).ok());
  return dir + "/tokenizer.json";
}

TEST(TokenizerTest, LoadsRealTokenizer) {
  const auto& tok = RealTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status() << " (is shared/ beside the repository?)";
  EXPECT_EQ(tok->vocab_size(), 2048);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->unk_id(), 0);
  EXPECT_EQ(tok->prepend_token_id(), 80);
  EXPECT_EQ(tok->IdToToken(1), "<|start_story|>");
  EXPECT_EQ(tok->TokenToId("<|end_story|>"), 2);
}

TEST(TokenizerTest, MissingFileIsNotFound) {
  const auto tok = Tokenizer::Load("/nonexistent/dir/tokenizer.json");
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(tok.status().message().find("/nonexistent/dir/tokenizer.json"), std::string::npos);
}

TEST(TokenizerTest, KnownIds) {
  const auto& tok = RealTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  // Ids computed independently by tests/model/reference_llama.py.
  EXPECT_THAT(tok->Encode("Once upon a time, there was a little girl named Lily.", false),
              ElementsAre(80, 147, 201, 282, 215, 286, 598, 629, 10));
  EXPECT_THAT(tok->Encode("Once upon a time, there was a dog.", true),
              ElementsAre(1, 80, 147, 201, 282, 215, 286, 604, 10));
  // Added tokens are matched on normalised text, so " <|end_story|>" (-> "▁<|end_story|>")
  // is split out.
  EXPECT_THAT(tok->Encode("x <|end_story|> y", false), ElementsAre(80, 76, 2, 80, 77));
  EXPECT_TRUE(tok->Encode("", false).empty());
  EXPECT_THAT(tok->Encode("", true), ElementsAre(1));
}

TEST(TokenizerTest, EncodeForScoringDropsLonePrependToken) {
  const auto& tok = RealTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT(tok->EncodeForScoring("Once upon a time, there was a dog."),
              ElementsAre(1, 147, 201, 282, 215, 286, 604, 10));
  // When the "▁" merged into the first word, nothing is dropped.
  const std::vector<int> ids = tok->EncodeForScoring("a dog");
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(ids[0], 1);
  EXPECT_NE(ids[1], 80);
  EXPECT_EQ(tok->Decode(ids), "a dog");
}

TEST(TokenizerTest, RoundTripsRealStories) {
  const auto& tok = RealTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto stories = LoadStories(testing::DataFile());
  ASSERT_TRUE(stories.ok()) << stories.status();
  ASSERT_GT(stories->size(), 50u);
  size_t chars = 0, tokens = 0;
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& story : *stories) {
    const std::vector<int> ids = tok->Encode(story, true);
    chars += story.size();
    tokens += ids.size();
    ASSERT_EQ(tok->Decode(ids), story);
    for (int id : ids) ASSERT_NE(id, tok->unk_id()) << story;
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf("encoded+decoded %zu stories, %zu chars -> %zu tokens in %.2f ms\n", stories->size(),
              chars, tokens, ms);
  if (testing::kCheckTiming) {
    EXPECT_LT(ms / (chars / 1000.0), 5.0) << "ms per 1000 characters";
  }

  // BPE must not be quadratic: the whole file as one text (one 64k-character word, since
  // there is no pre-tokenizer) encodes in about the same time per character.
  const auto text = ReadFileToString(testing::DataFile());
  ASSERT_TRUE(text.ok());
  const auto big_start = std::chrono::steady_clock::now();
  const std::vector<int> big = tok->Encode(*text, false);
  const double big_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - big_start)
          .count();
  std::printf("encoded the whole file (%zu chars) as one text in %.2f ms\n", text->size(), big_ms);
  EXPECT_GT(big.size(), tokens / 2);
  if (testing::kCheckTiming) {
    EXPECT_LT(big_ms, 200.0);
  }
}

TEST(TokenizerTest, CharactersOutsideVocabBecomeFusedUnkWithoutByteTokens) {
  // tinystories-656k enables byte_fallback but its vocab holds no <0xXX> tokens, so (like
  // Hugging Face) unknown characters fall through to <unk>, consecutive ones fused.
  const auto& tok = RealTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT(tok->Encode("caf\xC3\xA9 \xF0\x9F\x99\x82", false),
              ElementsAre(80, 295, 58, 0, 80, 0));
  EXPECT_THAT(tok->Encode("\xC3\xA9\xC3\xA9", false), ElementsAre(80, 0));
}

TEST(TokenizerTest, ByteFallbackUsesByteTokens) {
  const auto tok = Tokenizer::Load(WriteToyTokenizer("toy_bytes", R"(["a b"])"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  // "é" = C3 A9 has byte tokens; "ö" = C3 B6 lacks <0xB6> and becomes <unk>.
  EXPECT_THAT(tok->Encode("ab\xC3\xA9", true), ElementsAre(1, 3, 7, 10, 11));
  EXPECT_THAT(tok->Encode("\xC3\xB6\xC3\xB6", false), ElementsAre(3, 0));
  EXPECT_EQ(tok->Decode({1, 3, 7, 10, 11, 2}), "ab\xC3\xA9");
  // A lone lead byte is not valid UTF-8 and decodes to U+FFFD.
  EXPECT_EQ(tok->Decode({4, 10}), "a\xEF\xBF\xBD");
}

TEST(TokenizerTest, MergesApplyInPriorityOrder) {
  // "abc": with "b c" ranked first, b+c merge and then nothing joins a+bc.
  const auto bc_first = Tokenizer::Load(WriteToyTokenizer("toy_bc", R"(["b c", "a b"])"));
  ASSERT_TRUE(bc_first.ok()) << bc_first.status();
  EXPECT_THAT(bc_first->Encode("abc", false), ElementsAre(3, 4, 8));
  const auto ab_first = Tokenizer::Load(WriteToyTokenizer("toy_ab", R"(["a b", "b c"])"));
  ASSERT_TRUE(ab_first.ok()) << ab_first.status();
  EXPECT_THAT(ab_first->Encode("abc", false), ElementsAre(3, 7, 6));
  // Chains: "ab c" after "a b"; array-form merges are accepted too.
  const auto chain =
      Tokenizer::Load(WriteToyTokenizer("toy_chain", R"([["a", "b"], ["ab", "c"], ["b", "c"]])"));
  ASSERT_TRUE(chain.ok()) << chain.status();
  EXPECT_THAT(chain->Encode("abcabc", false), ElementsAre(3, 9, 9));
  // "▁ a" outranks "a b", so "a" joins the prepend token and "b" stays alone.
  const auto prepend_merge = Tokenizer::Load(WriteToyTokenizer("toy_pm", R"(["\u2581 a", "a b"])"));
  ASSERT_TRUE(prepend_merge.ok()) << prepend_merge.status();
  EXPECT_THAT(prepend_merge->Encode("ab", false), ElementsAre(12, 5));
}

TEST(TokenizerTest, RejectsBadFiles) {
  const std::string dir = FreshDir("tok_bad");
  ASSERT_TRUE(WriteStringToFile(dir + "/garbage.json", "{not json").ok());
  EXPECT_EQ(Tokenizer::Load(dir + "/garbage.json").status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(
      WriteStringToFile(dir + "/wordpiece.json", R"({"model": {"type": "WordPiece", "vocab": {}}})")
          .ok());
  EXPECT_EQ(Tokenizer::Load(dir + "/wordpiece.json").status().code(),
            absl::StatusCode::kUnimplemented);
  // Wrong-typed or missing fields are errors or defaults, never exceptions.
  ASSERT_TRUE(WriteStringToFile(dir + "/odd.json", R"({"model": {"vocab": {"a": 0},
      "merges": [7], "byte_fallback": null}, "normalizer": {"type": "Sequence"}})")
                  .ok());
  EXPECT_EQ(Tokenizer::Load(dir + "/odd.json").status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(WriteStringToFile(dir + "/odd2.json", R"({"model": {"vocab": {"a": 0},
      "byte_fallback": null, "unk_token": 3}, "normalizer": {"type": "Sequence"}})")
                  .ok());
  EXPECT_EQ(Tokenizer::Load(dir + "/odd2.json").status().code(), absl::StatusCode::kUnimplemented);
  ASSERT_TRUE(WriteStringToFile(dir + "/odd3.json", R"({"model": {"vocab": {"a": 0, "b": 1},
      "fuse_unk": "yes"}, "added_tokens": [{"id": 2, "content": "<s>", "special": null}],
      "decoder": null, "post_processor": {"type": "TemplateProcessing", "single": [1]}})")
                  .ok());
  const auto odd3 = Tokenizer::Load(dir + "/odd3.json");
  ASSERT_TRUE(odd3.ok()) << odd3.status();
  EXPECT_THAT(odd3->Encode("ab<s>", true), ElementsAre(0, 1, 2));
  EXPECT_EQ(odd3->Decode({0, 1, 2}), "ab<s>");
  const auto bad_merge = Tokenizer::Load(WriteToyTokenizer("toy_badmerge", R"(["a z"])"));
  EXPECT_EQ(bad_merge.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace vqkv::model
