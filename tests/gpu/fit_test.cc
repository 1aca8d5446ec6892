// GPU residual k-means against the CPU FitCodebook on the same sample: quantization error of the
// fitted codebooks within 2%, the same table shapes, deterministic across runs.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/cuda/gpu_fit.h"
#include "kernels/rvq_fit.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels::cuda {
namespace {

namespace testing_data = ::vqkv::kernels::testing;

// Relative reconstruction error of `x` (one block) through the CPU rvq codec with `cb`.
double QuantError(std::shared_ptr<const Codebook> cb, const KvShape& s,
                  const std::vector<float>& x) {
  CodecSpec spec;
  spec.name = "rvq";
  spec.sink_tokens = 0;
  spec.codebook = std::move(cb);
  auto codec = CreateCodec(spec);
  EXPECT_TRUE(codec.ok());
  KvBlockView v{s, DType::kF32, x.data(), 0, 0};
  std::vector<std::string> p;
  EXPECT_TRUE((*codec)->Encode({&v, 1}, &p).ok());
  auto d = (*codec)->DecodeToFloat(p[0]);
  EXPECT_TRUE(d.ok());
  return gputest::Nmse(x.data(), d->data(), x.size());
}

struct FitCase {
  const char* name;
  int layers, heads, dim, tokens;
  StageConfig k, v;
  bool per_head;
  FitOptions::Init init;
  int64_t max_vectors;
  int64_t init_per_centroid;  // GpuFitOptions
};

class FitTest : public ::testing::TestWithParam<FitCase> {};

TEST_P(FitTest, QuantizationErrorWithinTwoPercentOfCpu) {
  VQKV_REQUIRE_GPU();
  const FitCase& tc = GetParam();
  const RvqConfig cfg = RvqConfig::Uniform(tc.layers, tc.heads, tc.dim, tc.k, tc.v, tc.per_head);
  // One draw of the data distribution; the last 64 tokens are held out.
  const KvShape all{tc.layers, tc.tokens + 64, tc.heads, tc.dim};
  const std::vector<float> xa = testing_data::RandomKv(all, 123);
  const KvShape s{tc.layers, tc.tokens, tc.heads, tc.dim};
  const KvShape hs{tc.layers, 64, tc.heads, tc.dim};
  std::vector<float> x(size_t(s.elements())), held(size_t(hs.elements()));
  for (int l = 0; l < tc.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const size_t row = size_t(tc.heads) * tc.dim;
      std::copy_n(xa.begin() + all.Offset(l, c, 0, 0), size_t(tc.tokens) * row,
                  x.begin() + s.Offset(l, c, 0, 0));
      std::copy_n(xa.begin() + all.Offset(l, c, tc.tokens, 0), size_t(64) * row,
                  held.begin() + hs.Offset(l, c, 0, 0));
    }
  }
  const KvSamples samples = testing_data::SamplesFrom(s, x);
  FitOptions fo;
  fo.iterations = 6;
  fo.seed = 9;
  fo.init = tc.init;
  fo.max_vectors = tc.max_vectors;
  auto cpu = FitCodebook(cfg, samples, fo);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  GpuFitOptions go;
  go.init_points_per_centroid = tc.init_per_centroid;
  auto gpu = FitCodebookGpu(cfg, samples, fo, go);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ(gpu->config().ToString(), cpu->config().ToString());

  // The fitting sample itself and held-out tokens of the same distribution.
  auto c = std::make_shared<Codebook>(*cpu);
  auto g = std::make_shared<Codebook>(*gpu);
  const double ec = QuantError(c, s, x), eg = QuantError(g, s, x);
  const double hc = QuantError(c, hs, held), hg = QuantError(g, hs, held);
  std::printf("[%s] train err cpu=%.5f gpu=%.5f (%.2f%%)  held-out cpu=%.5f gpu=%.5f (%.2f%%)\n",
              tc.name, ec, eg, 100 * (eg - ec) / ec, hc, hg, 100 * (hg - hc) / hc);
  EXPECT_LE(std::abs(eg - ec), 0.02 * ec + 1e-9);
  EXPECT_LE(std::abs(hg - hc), 0.02 * hc + 1e-9);

  // Deterministic: a second GPU fit gives the same tables (fixed-point sums).
  auto again = FitCodebookGpu(cfg, samples, fo, go);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->id(), gpu->id());
}

const FitCase kFitCases[] = {
    {"d128_plusplus",
     2,
     2,
     128,
     1500,
     {3, 64},
     {2, 32},
     false,
     FitOptions::Init::kPlusPlus,
     1 << 17,
     0},
    {"d64_per_head",
     1,
     3,
     64,
     900,
     {2, 32},
     {2, 16},
     true,
     FitOptions::Init::kPlusPlus,
     1 << 17,
     0},
    {"d96_sample_init",
     1,
     2,
     96,
     1200,
     {3, 128},
     {1, 64},
     false,
     FitOptions::Init::kSample,
     1 << 17,
     0},
    {"subsampled_init",
     1,
     4,
     128,
     2000,
     {2, 256},
     {2, 64},
     false,
     FitOptions::Init::kPlusPlus,
     5000,
     8},
    {"fewer_points_than_k",
     1,
     1,
     64,
     40,
     {2, 64},
     {1, 128},
     false,
     FitOptions::Init::kPlusPlus,
     1 << 17,
     0},
};

INSTANTIATE_TEST_SUITE_P(Configs, FitTest, ::testing::ValuesIn(kFitCases),
                         [](const ::testing::TestParamInfo<FitCase>& i) {
                           return std::string(i.param.name);
                         });

TEST(FitErrors, RejectsBadSamples) {
  VQKV_REQUIRE_GPU();
  const RvqConfig cfg = RvqConfig::Uniform(1, 2, 64, {2, 16}, {2, 16});
  KvSamples s;
  s.layers = 1;
  s.kv_heads = 2;
  s.head_dim = 64;
  s.k.emplace_back(128 * 10, 1.f);
  s.v.emplace_back(128 * 10, std::nanf(""));
  EXPECT_TRUE(absl::IsInvalidArgument(FitCodebookGpu(cfg, s, {}).status()));
  s.v[0].assign(100, 1.f);  // not a multiple of heads * dim
  EXPECT_TRUE(absl::IsInvalidArgument(FitCodebookGpu(cfg, s, {}).status()));
  s.head_dim = 32;
  EXPECT_TRUE(absl::IsInvalidArgument(FitCodebookGpu(cfg, s, {}).status()));
}

}  // namespace
}  // namespace vqkv::kernels::cuda
