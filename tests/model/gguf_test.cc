#include "model/gguf.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/model/gguf_test_util.h"

namespace vqkv::model {
namespace {

using testing::GgufBuilder;
using ::testing::HasSubstr;

std::string ValidFile() {
  GgufBuilder b;
  b.KvStr("general.architecture", "llama");
  b.KvU32("llama.block_count", 2);
  b.KvF32("llama.rope.freq_base", 10000.0f);
  b.KvBool("flag", true);
  b.KvU64("big", 1234567890123ull);
  b.KvStrArray("tokenizer.ggml.tokens", {"a", "b", "ab"});
  b.KvI32Array("ints", {-1, 2, 3});
  b.Tensor("t1", {4}, 0, GgufBuilder::F32s({1, 2, 3, 4}));
  b.Tensor("t2", {2, 3}, 0, GgufBuilder::F32s({1, 2, 3, 4, 5, 6}));
  return b.Build();
}

TEST(GgufTest, ParsesMetadataAndTensors) {
  auto g = GgufFile::Parse(ValidFile(), "valid");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->version(), 3u);
  EXPECT_EQ(g->alignment(), 32u);
  EXPECT_EQ(*g->GetString("general.architecture"), "llama");
  EXPECT_EQ(*g->GetInt("llama.block_count"), 2);
  EXPECT_EQ(*g->GetFloat("llama.rope.freq_base"), 10000.0);
  EXPECT_EQ(*g->GetInt("big"), 1234567890123ll);
  EXPECT_EQ(g->Find("flag")->i, 1);
  EXPECT_EQ(*g->GetStringArray("tokenizer.ggml.tokens"),
            (std::vector<std::string>{"a", "b", "ab"}));
  ASSERT_EQ(g->Find("ints")->array.size(), 3u);
  EXPECT_EQ(g->Find("ints")->array[0].i, -1);
  EXPECT_EQ(g->GetInt("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(g->GetInt("general.architecture").status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_EQ(g->tensors().size(), 2u);
  EXPECT_EQ(g->data_offset() % 32, 0u);
  const GgufTensorInfo* t2 = g->FindTensor("t2");
  ASSERT_NE(t2, nullptr);
  EXPECT_EQ(t2->dims, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t2->offset, 32u);  // t1's 16 bytes, padded to the alignment
  auto v = g->ReadFloat("t2");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(g->ReadFloat("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufTest, Version2AndCustomAlignment) {
  GgufBuilder b(2);
  b.set_alignment(64);
  b.KvU32("general.alignment", 64);
  b.Tensor("a", {3}, 0, GgufBuilder::F32s({1, 2, 3}));
  b.Tensor("b", {1}, 0, GgufBuilder::F32s({7}));
  auto g = GgufFile::Parse(b.Build(), "v2");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->alignment(), 64u);
  EXPECT_EQ(g->data_offset() % 64, 0u);
  EXPECT_EQ(g->FindTensor("b")->offset, 64u);
  EXPECT_EQ(*g->ReadFloat("b"), std::vector<float>{7});
}

TEST(GgufTest, EveryTruncationIsAnErrorNotACrash) {
  const std::string full = ValidFile();
  for (size_t n = 0; n < full.size(); ++n) {
    auto g = GgufFile::Parse(full.substr(0, n), "truncated");
    ASSERT_FALSE(g.ok()) << "accepted a file cut at " << n << " of " << full.size();
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << n;
  }
}

TEST(GgufTest, RejectsBadMagicAndVersion) {
  std::string f = ValidFile();
  f[0] = 'X';
  EXPECT_THAT(GgufFile::Parse(f, "m").status().message(), HasSubstr("magic"));
  f = ValidFile();
  f[4] = 7;
  EXPECT_THAT(GgufFile::Parse(f, "v").status().message(), HasSubstr("version 7"));
}

TEST(GgufTest, RejectsAbsurdCounts) {
  // Huge tensor / metadata counts in the header.
  for (int field : {0, 1}) {
    std::string f = ValidFile();
    const uint64_t huge = ~uint64_t{0} >> 1;
    std::memcpy(f.data() + 8 + 8 * field, &huge, 8);
    auto g = GgufFile::Parse(f, "counts");
    ASSERT_FALSE(g.ok());
    EXPECT_THAT(g.status().message(), HasSubstr("absurd"));
  }
  // A string longer than the file.
  GgufBuilder b;
  b.Kv("s", 8, GgufBuilder::Pod(uint64_t{1} << 60) + "abc");
  EXPECT_THAT(GgufFile::Parse(b.Build(), "str").status().message(), HasSubstr("exceeds"));
  // An array with more elements than bytes left.
  GgufBuilder a;
  a.Kv("arr", 9, GgufBuilder::Pod(uint32_t{4}) + GgufBuilder::Pod(uint64_t{1} << 40));
  EXPECT_THAT(GgufFile::Parse(a.Build(), "arr").status().message(), HasSubstr("cannot fit"));
  // Unknown value and element types; nesting too deep.
  GgufBuilder u;
  u.Kv("u", 77, "");
  EXPECT_FALSE(GgufFile::Parse(u.Build(), "u").ok());
  std::string nested;
  for (int i = 0; i < 10; ++i)
    nested += GgufBuilder::Pod(uint32_t{9}) + GgufBuilder::Pod(uint64_t{1});
  GgufBuilder d;
  d.Kv("deep", 9, nested);
  EXPECT_THAT(GgufFile::Parse(d.Build(), "deep").status().message(), HasSubstr("too deep"));
}

TEST(GgufTest, RejectsHostileTensorInfos) {
  {  // dimension product far beyond the file
    GgufBuilder b;
    b.Tensor("t", {1 << 20, 1 << 20}, 0, "");
    EXPECT_THAT(GgufFile::Parse(b.Build(), "dims").status().message(), HasSubstr("absurd"));
  }
  {  // too many dimensions
    GgufBuilder b;
    b.Tensor("t", {1, 1, 1, 1, 1}, 0, GgufBuilder::F32s({1}));
    EXPECT_THAT(GgufFile::Parse(b.Build(), "ndims").status().message(), HasSubstr("dimensions"));
  }
  {  // data past the end of the file
    GgufBuilder b;
    b.Tensor("t", {8}, 0, GgufBuilder::F32s({1, 2}));
    EXPECT_THAT(GgufFile::Parse(b.Build(), "short").status().message(), HasSubstr("truncated"));
  }
  {  // Q4_1 element count that is not whole blocks
    GgufBuilder b;
    b.Tensor("t", {33}, 3, std::string(64, '\0'));
    EXPECT_THAT(GgufFile::Parse(b.Build(), "blocks").status().message(), HasSubstr("blocks"));
  }
  {  // bad alignment value
    GgufBuilder b;
    b.KvU32("general.alignment", 48);
    EXPECT_THAT(GgufFile::Parse(b.Build(), "align").status().message(), HasSubstr("power of two"));
  }
  {  // unknown tensor types parse, but their data cannot be read
    GgufBuilder b;
    b.Tensor("q", {256}, 12, std::string(144, '\0'));
    auto g = GgufFile::Parse(b.Build(), "q4k");
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ(g->ReadFloat("q").status().code(), absl::StatusCode::kUnimplemented);
  }
}

TEST(GgufTest, RandomCorruptionNeverCrashes) {
  const std::string full = ValidFile();
  uint64_t state = 12345;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string f = full;
    for (int k = 0; k < 4; ++k) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      const size_t pos = (state >> 33) % f.size();
      f[pos] = static_cast<char>(state >> 24);
    }
    auto g = GgufFile::Parse(f, "fuzz");
    if (g.ok()) {
      for (const auto& t : g->tensors()) (void)g->ReadFloat(t.name);
    }
  }
}

TEST(GgufTest, OpenMissingFileIsNotFound) {
  EXPECT_EQ(GgufFile::Open("/nonexistent/x.gguf").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace vqkv::model
