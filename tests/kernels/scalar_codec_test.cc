#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels {
namespace {

// Every reconstructed value lies within half a quantization step (plus fp16 rounding of the
// zero point) of the input: the step of a group is (max - min) / (2^bits - 1).
void CheckBound(int bits, int group, const KvShape& s) {
  CodecSpec spec;
  spec.name = "scalar";
  spec.scalar_bits = bits;
  spec.scalar_group = group;
  spec.sink_tokens = 0;
  auto codec = CreateCodec(spec);
  ASSERT_TRUE(codec.ok());
  const auto x = testing::RandomKv(s, bits * 100 + group);
  std::vector<std::string> out;
  ASSERT_TRUE((*codec)->Encode({{s, DType::kF32, x.data(), 0}}, &out).ok());
  auto y = (*codec)->DecodeToFloat(out[0]);
  ASSERT_TRUE(y.ok()) << y.status();
  const int levels = (1 << bits) - 1;
  const int gv = std::min(group, s.head_dim);
  double worst = 0;
  for (int l = 0; l < s.layers; ++l) {
    for (int h = 0; h < s.kv_heads; ++h) {
      for (int d = 0; d < s.head_dim; ++d) {
        for (int t0 = 0; t0 < s.tokens; t0 += group) {  // keys: per channel over tokens
          float lo = 1e30f, hi = -1e30f;
          const int t1 = std::min(s.tokens, t0 + group);
          for (int t = t0; t < t1; ++t) {
            lo = std::min(lo, x[s.Offset(l, 0, t, h) + d]);
            hi = std::max(hi, x[s.Offset(l, 0, t, h) + d]);
          }
          const double bound = (hi - lo) / levels * 0.5 * 1.002 + std::abs(lo) * 1e-3 + 1e-6;
          for (int t = t0; t < t1; ++t) {
            const double e = std::abs(x[s.Offset(l, 0, t, h) + d] - (*y)[s.Offset(l, 0, t, h) + d]);
            ASSERT_LE(e, bound) << "K l" << l << " h" << h << " d" << d << " t" << t;
            worst = std::max(worst, e / std::max(bound, 1e-9));
          }
        }
      }
      for (int t = 0; t < s.tokens; ++t) {  // values: per token over channels
        for (int d0 = 0; d0 < s.head_dim; d0 += gv) {
          const int64_t o = s.Offset(l, 1, t, h);
          const int d1 = std::min(s.head_dim, d0 + gv);
          const float lo = *std::min_element(&x[o + d0], &x[o + d1]);
          const float hi = *std::max_element(&x[o + d0], &x[o + d1]);
          const double bound = (hi - lo) / levels * 0.5 * 1.002 + std::abs(lo) * 1e-3 + 1e-6;
          for (int d = d0; d < d1; ++d) ASSERT_LE(std::abs(x[o + d] - (*y)[o + d]), bound);
        }
      }
    }
  }
  EXPECT_GT(worst, 0.3) << "bound is loose enough to be meaningless";
}

TEST(ScalarCodecTest, TwoBitWithinBound) { CheckBound(2, 32, {2, 70, 2, 16}); }
TEST(ScalarCodecTest, FourBitWithinBound) { CheckBound(4, 32, {1, 64, 3, 64}); }
TEST(ScalarCodecTest, OddGroups) { CheckBound(2, 7, {1, 23, 1, 20}); }

TEST(ScalarCodecTest, FourBitsBeatTwoBits) {
  const KvShape s{2, 64, 2, 32};
  const auto x = testing::RandomKv(s, 9);
  double err[2];
  for (int i = 0; i < 2; ++i) {
    auto codec = CreateCodec(*ParseCodecSpec(i == 0 ? "scalar-2:sinks=0" : "scalar-4:sinks=0"));
    std::vector<std::string> out;
    ASSERT_TRUE((*codec)->Encode({{s, DType::kF32, x.data(), 0}}, &out).ok());
    auto y = (*codec)->DecodeToFloat(out[0]);
    err[i] = 0;
    for (size_t j = 0; j < x.size(); ++j) err[i] += ((*y)[j] - x[j]) * ((*y)[j] - x[j]);
  }
  EXPECT_LT(err[1], err[0] / 10);
}

TEST(ScalarCodecTest, ConstantGroupIsExact) {
  const KvShape s{1, 32, 1, 32};
  std::vector<float> x(s.elements(), 0.75f);
  auto codec = CreateCodec(*ParseCodecSpec("scalar-2:sinks=0"));
  std::vector<std::string> out;
  ASSERT_TRUE((*codec)->Encode({{s, DType::kF32, x.data(), 0}}, &out).ok());
  EXPECT_EQ(*(*codec)->DecodeToFloat(out[0]), x);
}

}  // namespace
}  // namespace vqkv::kernels
