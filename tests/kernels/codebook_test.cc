#include "kernels/codebook.h"

#include <unistd.h>

#include <cstring>

#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "kernels/rvq_fit.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels {
namespace {

Codebook Small() {
  const KvShape s{2, 64, 2, 8};
  const auto x = testing::RandomKv(s, 21);
  FitOptions opts;
  opts.iterations = 3;
  RvqConfig cfg = RvqConfig::Uniform(2, 2, 8, {2, 16}, {1, 8});
  cfg.k[1] = {3, 4};
  return *FitCodebook(cfg, testing::SamplesFrom(s, x), opts);
}

TEST(CodebookTest, SafetensorsRoundTrip) {
  const Codebook cb = Small();
  const std::string path =
      ::testing::TempDir() + "/cb_" + std::to_string(getpid()) + ".safetensors";
  ASSERT_TRUE(cb.Save(path).ok());
  auto back = Codebook::Load(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->id(), cb.id());
  EXPECT_EQ(back->config().ToString(), cb.config().ToString());
  EXPECT_EQ(std::memcmp(back->Table(1, 0, 0, 2), cb.Table(1, 0, 0, 2), 4 * 8 * 4), 0);
  unlink(path.c_str());
}

TEST(CodebookTest, RejectsDamagedFiles) {
  const Codebook cb = Small();
  const std::string good = cb.Serialize();
  // A flipped bit in a table is caught by the content id.
  std::string flipped = good;
  flipped[flipped.size() - 5] ^= 0x10;
  auto st = Codebook::FromBytes(flipped, "flipped").status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("content hash"), absl::string_view::npos) << st;
  // Truncation.
  EXPECT_EQ(Codebook::FromBytes(good.substr(0, good.size() / 2), "cut").status().code(),
            absl::StatusCode::kInvalidArgument);
  // Garbage.
  EXPECT_EQ(Codebook::FromBytes(std::string(100, 'x'), "junk").status().code(),
            absl::StatusCode::kInvalidArgument);
  // A safetensors file that is not a codebook.
  SafetensorsWriter w;
  const float f[2] = {1, 2};
  w.AddF32("t", {2}, f);
  st = Codebook::FromBytes(w.Serialize(), "other").status();
  EXPECT_NE(st.message().find("format"), absl::string_view::npos) << st;
  // Missing file.
  EXPECT_EQ(Codebook::Load("/nonexistent.safetensors").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(CodebookTest, ConfigValidation) {
  EXPECT_FALSE(ParseStageConfig("7x1000").ok());  // not a power of two
  EXPECT_FALSE(ParseStageConfig("7x1").ok());
  EXPECT_FALSE(ParseStageConfig("7x131072").ok());
  EXPECT_FALSE(ParseStageConfig("0x1024").ok());
  EXPECT_FALSE(ParseStageConfig("seven").ok());
  auto c = ParseStageConfig("56x1024");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->bits(), 10);
  EXPECT_EQ(ParseStageConfig("1x65536")->bits(), 16);
  EXPECT_EQ(ParseStageConfig("1x2")->bits(), 1);
}

}  // namespace
}  // namespace vqkv::kernels
