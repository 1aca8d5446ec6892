// The split chooser's error grid equals attention errors measured the plain way: decode the
// samples with each truncated codebook and run the reference attention (kernels/fidelity.h).
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/fidelity.h"
#include "kernels/rvq_budget.h"
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

}  // namespace
}  // namespace vqkv::kernels
