#include "kernels/ratio.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/codebook.h"

namespace vqkv::kernels {
namespace {

std::shared_ptr<const Codebook> ZeroCodebook(const RvqConfig& cfg) {
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < cfg.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const auto& s = cfg.at(l, c);
      tables.emplace_back(size_t(s.stages) * s.size * cfg.head_dim, 0.f);
    }
  }
  return std::make_shared<const Codebook>(*Codebook::Create(cfg, tables));
}

TEST(RatioTest, PaperSettingIs82Point8Percent) {
  // LLaMA-3.1-8B: keys 56x1024, values 16x512, head_dim 128.
  const RvqConfig cfg = RvqConfig::Uniform(1, 1, 128, {56, 1024}, {16, 512});
  EXPECT_NEAR(1 - cfg.BitsPerElement() / 16, 0.828125, 1e-9);
  CodecSpec spec;
  spec.name = "rvq";
  spec.codebook = ZeroCodebook(cfg);
  auto codec = *CreateCodec(spec);
  RatioInputs in;
  in.layers = 1;
  in.kv_heads = 1;
  in.head_dim = 128;
  in.context_tokens = 4096;
  const RatioReport r = ComputeRatio(*codec, in, cfg.CodebookBytes());
  EXPECT_NEAR(r.codes_only_ratio, 0.828125, 1e-9);
  EXPECT_NEAR(r.codes_bits_per_element, 2.75, 1e-9);
  // Overhead counted: all-in is strictly more than codes only.
  EXPECT_GT(r.all_in_bits_per_element, r.codes_bits_per_element);
}

TEST(RatioTest, ScalarTwoBitCostsAtLeastThreeBits) {
  auto codec = *CreateCodec(*ParseCodecSpec("scalar-2"));
  RatioInputs in;
  in.layers = 2;
  in.kv_heads = 4;
  in.head_dim = 128;
  in.context_tokens = 1024;
  const RatioReport r = ComputeRatio(*codec, in, 0);
  EXPECT_GE(r.codes_bits_per_element, 3.0);
  EXPECT_GT(r.longer_context, 4.0);
  EXPECT_LT(r.longer_context, 16.0 / 3.0);
}

TEST(RatioTest, RawIsNoCompression) {
  auto codec = *CreateCodec(*ParseCodecSpec("raw"));
  RatioInputs in;
  in.context_tokens = 512;
  const RatioReport r = ComputeRatio(*codec, in, 0);
  EXPECT_NEAR(r.codes_only_ratio, 0, 1e-12);
  EXPECT_LT(r.real_ratio, 0);  // headers make it slightly bigger
  EXPECT_LT(r.longer_context, 1.0);
}

}  // namespace
}  // namespace vqkv::kernels
