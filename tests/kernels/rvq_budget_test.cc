// The split chooser's error grid equals attention errors measured the plain way: decode the
// samples with each truncated codebook and run the reference attention (kernels/fidelity.h).
#include "kernels/rvq_budget.h"

#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/fidelity.h"
#include "kernels/rvq_fit.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels {
namespace {

TEST(RvqBudgetTest, PairErrorsMatchTheReferenceAttention) {
  const KvShape shape{2, 150, 2, 16};
  const auto x = testing::RandomKv(shape, 31);
  KvSamples s = testing::SamplesFrom(shape, x);
  // Two sequences (75 tokens each), four query heads per layer (GQA group 2).
  s.seq_lens = {75, 75};
  s.q_heads = 4;
  const auto q = testing::RandomKv({2, 150, 4, 16}, 32);
  for (int l = 0; l < 2; ++l) {
    s.q.emplace_back(q.begin() + KvShape{2, 150, 4, 16}.Offset(l, 0, 0, 0),
                     q.begin() + KvShape{2, 150, 4, 16}.Offset(l, 0, 0, 0) + 150 * 4 * 16);
  }
  FitOptions fo;
  fo.iterations = 3;
  const RvqConfig full_cfg = RvqConfig::Uniform(2, 2, 16, {4, 16}, {3, 8});
  auto full = FitCodebook(full_cfg, s, fo);
  ASSERT_TRUE(full.ok()) << full.status();
  BudgetOptions bo;
  bo.sink_tokens = 3;
  bo.recent_tokens = 5;
  bo.query_stride = 3;
  auto grid = MeasureSplitErrors(*full, s, bo);
  ASSERT_TRUE(grid.ok()) << grid.status();
  for (auto [a, b] : {std::pair{1, 1}, std::pair{4, 3}, std::pair{2, 3}, std::pair{3, 1}}) {
    RvqConfig cfg = full_cfg;
    for (int l = 0; l < 2; ++l) cfg.k[l].stages = a, cfg.v[l].stages = b;
    auto cb = TruncateCodebook(*full, cfg);
    ASSERT_TRUE(cb.ok());
    CodecSpec spec;
    spec.name = "rvq";
    spec.sink_tokens = 0;
    spec.codebook = std::make_shared<const Codebook>(*cb);
    auto codec = CreateCodec(spec);
    ASSERT_TRUE(codec.ok());
    std::vector<std::string> payload;
    ASSERT_TRUE((*codec)->Encode({{shape, DType::kF32, x.data(), 0, 0}}, &payload).ok());
    auto hat = (*codec)->DecodeToFloat(payload[0]);
    ASSERT_TRUE(hat.ok());
    for (int l = 0; l < 2; ++l) {
      AttentionAccumulator acc;
      for (int seq = 0; seq < 2; ++seq) {
        const int64_t off = seq * 75;
        AttentionInputs in;
        in.q = s.q[l].data() + off * 4 * 16;
        in.k = x.data() + shape.Offset(l, 0, int(off), 0);
        in.v = x.data() + shape.Offset(l, 1, int(off), 0);
        in.k_hat = hat->data() + shape.Offset(l, 0, int(off), 0);
        in.v_hat = hat->data() + shape.Offset(l, 1, int(off), 0);
        in.tokens = 75;
        in.q_heads = 4;
        in.kv_heads = 2;
        in.dim = 16;
        in.min_position = 8;
        in.query_stride = 3;
        in.sink_tokens = 3;
        in.recent_tokens = 5;
        in.output_only = true;
        acc.Add(in);
      }
      const double want = acc.Finish().output_rel_error;
      ASSERT_GT(want, 0);
      EXPECT_NEAR(grid->err[l][a - 1][b - 1], want, 1e-4 * want + 1e-7)
          << "layer " << l << " K " << a << " V " << b;
    }
  }
  // More stages never hurt on the calibration data itself by much: the full pair is the best.
  EXPECT_LT(grid->err[0][3][2], grid->err[0][0][0]);
}

// Two layers with the same error grid: without weights the budget is shared evenly; weighting
// layer 0's squared error 20x moves stages to it, and bad weights are refused.
TEST(RvqBudgetTest, LayerWeightsMoveBitsToTheSensitiveLayer) {
  const RvqConfig cfg = RvqConfig::Uniform(2, 1, 16, {8, 16}, {8, 16});  // 4 bits per stage
  SplitErrors errors;
  errors.err.assign(2, std::vector<std::vector<double>>(8, std::vector<double>(8)));
  for (int l = 0; l < 2; ++l) {
    for (int a = 0; a < 8; ++a) {
      for (int b = 0; b < 8; ++b) errors.err[l][a][b] = 1.0 / (a + 1) + 1.0 / (b + 1);
    }
  }
  BudgetOptions opts;
  opts.bits_per_element = 1.0;  // 2 * 16 * 2 layers = 64 bits: 16 stages in all
  auto even = ChooseSplitFromErrors(cfg, errors, opts);
  ASSERT_TRUE(even.ok()) << even.status();
  const auto stages = [](const RvqConfig& c, int l) { return c.k[l].stages + c.v[l].stages; };
  EXPECT_EQ(stages(even->config, 0), 8);
  EXPECT_EQ(stages(even->config, 1), 8);

  opts.layer_weights = {20.0, 1.0};
  auto weighted = ChooseSplitFromErrors(cfg, errors, opts);
  ASSERT_TRUE(weighted.ok()) << weighted.status();
  EXPECT_GT(stages(weighted->config, 0), stages(weighted->config, 1));
  EXPECT_EQ(stages(weighted->config, 0) + stages(weighted->config, 1), 16);
  double objective = 0;
  for (int l = 0; l < 2; ++l) {
    const double e =
        errors.err[l][weighted->config.k[l].stages - 1][weighted->config.v[l].stages - 1];
    objective += opts.layer_weights[l] * e * e;
  }
  EXPECT_NEAR(weighted->calib_error, objective, 1e-12);

  opts.layer_weights = {1.0};
  EXPECT_EQ(ChooseSplitFromErrors(cfg, errors, opts).status().code(),
            absl::StatusCode::kInvalidArgument);
  opts.layer_weights = {1.0, -1.0};
  EXPECT_EQ(ChooseSplitFromErrors(cfg, errors, opts).status().code(),
            absl::StatusCode::kInvalidArgument);
  opts.layer_weights = {1.0, std::nan("")};
  EXPECT_EQ(ChooseSplitFromErrors(cfg, errors, opts).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(RvqBudgetTest, LayerWeightsTextRoundTrip) {
  const std::vector<double> w = {0.0246, 0.153, 1e-9, 12.5};
  const std::string text = FormatLayerWeights(w, "made by a test\nsecond line");
  EXPECT_EQ(text.rfind("# made by a test\n# second line\n", 0), 0u) << text;
  auto back = ParseLayerWeights(text);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), w.size());
  for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR((*back)[i], w[i], 1e-8 * w[i]);
  for (const char* bad : {"1\nx\n", "1\n-2\n", "inf\n", "nan\n", "# only a comment\n", ""}) {
    EXPECT_EQ(ParseLayerWeights(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_NE(ParseLayerWeights("1\nx\n").status().message().find("line 2"), absl::string_view::npos);
}

TEST(RvqBudgetTest, HoldOutSequencesSplitsWholeSequences) {
  const KvShape shape{2, 30, 2, 8};
  const auto x = testing::RandomKv(shape, 41);
  KvSamples s = testing::SamplesFrom(shape, x);
  s.seq_lens = {10, 12, 8};
  s.seq_starts = {0, 100, 7};
  s.q_heads = 2;
  s.q = s.k;
  auto parts = HoldOutSequences(s, 0.34);
  ASSERT_TRUE(parts.ok()) << parts.status();
  const auto& [fit, held] = *parts;
  EXPECT_EQ(fit.seq_lens, (std::vector<int64_t>{10, 12}));
  EXPECT_EQ(held.seq_lens, (std::vector<int64_t>{8}));
  EXPECT_EQ(held.seq_starts, (std::vector<int64_t>{7}));
  EXPECT_EQ(fit.tokens(1), 22);
  EXPECT_EQ(held.tokens(1), 8);
  // The held-out rows are the original's last 8 tokens, K, V and Q alike.
  const size_t row = 2 * 8;
  EXPECT_TRUE(std::equal(held.k[1].begin(), held.k[1].end(), s.k[1].begin() + 22 * row));
  EXPECT_TRUE(std::equal(held.v[0].begin(), held.v[0].end(), s.v[0].begin() + 22 * row));
  EXPECT_TRUE(std::equal(held.q[1].begin(), held.q[1].end(), s.q[1].begin() + 22 * row));
  EXPECT_TRUE(std::equal(fit.k[0].begin(), fit.k[0].end(), s.k[0].begin()));
  // Always at least one sequence on each side; bad fractions and single sequences refused.
  EXPECT_EQ(HoldOutSequences(s, 0.01)->second.seq_lens.size(), 1u);
  EXPECT_EQ(HoldOutSequences(s, 0.99)->first.seq_lens.size(), 1u);
  EXPECT_FALSE(HoldOutSequences(s, 0).ok());
  EXPECT_FALSE(HoldOutSequences(s, 1).ok());
  s.seq_lens = {30};
  EXPECT_FALSE(HoldOutSequences(s, 0.5).ok());
}

}  // namespace
}  // namespace vqkv::kernels
