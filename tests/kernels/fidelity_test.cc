#include "kernels/fidelity.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace vqkv::kernels {
namespace {

TEST(FidelityTest, VectorMetrics) {
  std::vector<float> x = {1, 0, 0, 1}, y = {1, 0, 0, 1};
  auto e = CompareVectors(x.data(), y.data(), 2, 2);
  EXPECT_EQ(e.rel_error, 0);
  EXPECT_DOUBLE_EQ(e.cosine, 1);
  y = {0, 1, 0, 2};
  e = CompareVectors(x.data(), y.data(), 2, 2);
  EXPECT_DOUBLE_EQ(e.rel_error, (2.0 + 1.0) / 2.0);
  EXPECT_DOUBLE_EQ(e.cosine, 0.5);
}

TEST(FidelityTest, AttentionIdenticalIsPerfectAndNoiseIsNot) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 1);
  const int T = 40, H = 4, KVH = 2, D = 8;
  std::vector<float> q(T * H * D), k(T * KVH * D), v(T * KVH * D);
  for (auto* a : {&q, &k, &v}) {
    for (auto& x : *a) x = nd(rng);
  }
  AttentionInputs in{q.data(), k.data(), v.data(), k.data(), v.data(), T, H, KVH, D, 4, 1, 0, 0, 0};
  AttentionAccumulator acc;
  acc.Add(in);
  auto f = acc.Finish();
  EXPECT_EQ(f.queries, T * H);
  EXPECT_EQ(f.output_rel_error, 0);
  EXPECT_EQ(f.logit_rel_error, 0);
  EXPECT_DOUBLE_EQ(f.topk_agreement, 1);
  EXPECT_NEAR(f.kl, 0, 1e-12);
  std::vector<float> kn = k, vn = v;
  for (auto& x : kn) x += 0.3f * nd(rng);
  for (auto& x : vn) x += 0.3f * nd(rng);
  in.k_hat = kn.data();
  in.v_hat = vn.data();
  AttentionAccumulator noisy;
  noisy.Add(in);
  f = noisy.Finish();
  EXPECT_GT(f.output_rel_error, 0.01);
  EXPECT_GT(f.kl, 1e-4);
  EXPECT_LT(f.topk_agreement, 1);
  // Changing only V leaves logits, KL and top-k untouched.
  in.k_hat = k.data();
  AttentionAccumulator vonly;
  vonly.Add(in);
  f = vonly.Finish();
  EXPECT_EQ(f.logit_rel_error, 0);
  EXPECT_NEAR(f.kl, 0, 1e-12);
  EXPECT_GT(f.output_rel_error, 0.01);
  // With every key inside the exact window nothing changes.
  in.k_hat = kn.data();
  in.sink_tokens = 4;
  in.recent_tokens = T;
  AttentionAccumulator window;
  window.Add(in);
  f = window.Finish();
  EXPECT_EQ(f.output_rel_error, 0);
  EXPECT_EQ(f.logit_rel_error, 0);
}

}  // namespace
}  // namespace vqkv::kernels
