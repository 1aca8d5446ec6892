// Code spaces (kernels/codebook.h): keys coded before RoPE, channel scales; the file format,
// the codec and the split chooser all honour them.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <random>

#include "gtest/gtest.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/rvq_budget.h"
#include "kernels/rvq_fit.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels {
namespace {

constexpr int kDim = 8, kHeads = 2, kLayers = 2;

std::vector<float> InvFreq() {
  std::vector<float> f(kDim / 2);
  for (int i = 0; i < kDim / 2; ++i) f[i] = float(std::pow(10000.0, -2.0 * i / kDim));
  return f;
}

// Applies RoPE (rotate-half) at `pos` to one [heads, dim] row, as a model does.
void Rope(float* x, int64_t pos, const std::vector<float>& inv) {
  for (int h = 0; h < kHeads; ++h) {
    float* v = x + h * kDim;
    for (int i = 0; i < kDim / 2; ++i) {
      const float c = float(std::cos(double(pos) * inv[i])),
                  s = float(std::sin(double(pos) * inv[i]));
      const float a = v[i], b = v[i + kDim / 2];
      v[i] = a * c - b * s;
      v[i + kDim / 2] = b * c + a * s;
    }
  }
}

CodeSpace RopeAndScale() {
  CodeSpace cs;
  cs.key_rope_inv_freq = InvFreq();
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.2f, 3.f);
  cs.scale.resize(kLayers * 2);
  for (auto& s : cs.scale) {
    s.resize(kHeads * kDim);
    for (float& v : s) v = u(rng);
  }
  return cs;
}

TEST(CodeSpaceTest, ToAndFromAreInverse) {
  const CodeSpace cs = RopeAndScale();
  const std::vector<int64_t> pos = {0, 7, 513, 8191, 100000};
  std::vector<float> x = testing::RandomKv({1, int(pos.size()), kHeads, kDim}, 3);
  x.resize(pos.size() * kHeads * kDim);
  for (int kind = 0; kind < 2; ++kind) {
    std::vector<float> y = x;
    ToCodeSpace(cs, 1, kind, kHeads, kDim, pos, y.data());
    EXPECT_NE(y, x);
    FromCodeSpace(cs, 1, kind, kHeads, kDim, pos, y.data());
    for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-4f * (1 + std::fabs(x[i])));
  }
}

TEST(CodeSpaceTest, ValidateRejectsBadSizesAndValues) {
  CodeSpace cs = RopeAndScale();
  EXPECT_TRUE(cs.Validate(kLayers, kHeads, kDim).ok());
  EXPECT_FALSE(cs.Validate(kLayers, kHeads, 2 * kDim).ok());
  EXPECT_FALSE(cs.Validate(kLayers + 1, kHeads, kDim).ok());
  cs.scale[1][3] = 0;
  EXPECT_FALSE(cs.Validate(kLayers, kHeads, kDim).ok());
  cs.scale[1][3] = NAN;
  EXPECT_FALSE(cs.Validate(kLayers, kHeads, kDim).ok());
}

Codebook Fit(const CodeSpace& cs, const KvSamples& s) {
  FitOptions o;
  o.iterations = 3;
  o.code_space = cs;
  auto cb = FitCodebook(RvqConfig::Uniform(kLayers, kHeads, kDim, {3, 16}, {2, 16}), s, o);
  EXPECT_TRUE(cb.ok()) << cb.status();
  return *cb;
}

TEST(CodeSpaceTest, FileRoundTripKeepsTheCodeSpaceAndChangesTheId) {
  const KvShape shape{kLayers, 96, kHeads, kDim};
  const auto x = testing::RandomKv(shape, 9);
  const KvSamples s = testing::SamplesFrom(shape, x);
  const Codebook plain = Fit({}, s);
  const Codebook coded = Fit(RopeAndScale(), s);
  EXPECT_NE(plain.id(), coded.id());
  const std::string bytes = coded.Serialize();
  auto back = Codebook::FromBytes(bytes, "test");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->id(), coded.id());
  EXPECT_EQ(back->code_space().key_rope_inv_freq, coded.code_space().key_rope_inv_freq);
  EXPECT_EQ(back->code_space().scale, coded.code_space().scale);
  // A plain codebook still writes version 1 (readable by older builds), with no code space.
  auto pb = Codebook::FromBytes(plain.Serialize(), "plain");
  ASSERT_TRUE(pb.ok());
  EXPECT_TRUE(pb->code_space().empty());
  EXPECT_NE(plain.Serialize().find("\"version\":\"1\""), std::string::npos);
  EXPECT_NE(bytes.find("\"version\":\"2\""), std::string::npos);
  // Damage one scale value: the recomputed id no longer matches.
  std::string bad = bytes;
  const float want = coded.code_space().scale[3][5];
  const size_t at = bad.find(std::string(reinterpret_cast<const char*>(&want), 4));
  ASSERT_NE(at, std::string::npos);
  bad[at] ^= 0x10;
  EXPECT_FALSE(Codebook::FromBytes(bad, "damaged").ok());
}

// With keys coded before RoPE, the same key at two positions gets the same codes, and its
// reconstruction is the model's key at each position; a plain codebook sees two different keys.
TEST(CodeSpaceTest, PreRopeKeysCodeTheSameAtEveryPosition) {
  const KvShape shape{kLayers, 128, kHeads, kDim};
  const auto x = testing::RandomKv(shape, 11);
  CodeSpace cs;
  cs.key_rope_inv_freq = InvFreq();
  // Calibration keys carry RoPE at their positions, as captured caches do.
  KvSamples s = testing::SamplesFrom(shape, x);
  for (int l = 0; l < kLayers; ++l) {
    for (int t = 0; t < shape.tokens; ++t)
      Rope(&s.k[l][size_t(t) * kHeads * kDim], t, cs.key_rope_inv_freq);
  }
  const Codebook cb = Fit(cs, s);
  CodecSpec spec;
  spec.name = "rvq";
  spec.sink_tokens = 0;
  spec.codebook = std::make_shared<const Codebook>(cb);
  auto codec = CreateCodec(spec);
  ASSERT_TRUE(codec.ok()) << codec.status();
  // One token block: the same pre-RoPE key/value placed at positions 40 and 5000.
  const KvShape one{kLayers, 1, kHeads, kDim};
  const auto base = testing::RandomKv(one, 17);
  std::vector<std::string> payloads;
  std::vector<std::vector<float>> blocks;
  for (int64_t pos : {int64_t{40}, int64_t{5000}}) {
    std::vector<float> b = base;
    for (int l = 0; l < kLayers; ++l)
      Rope(b.data() + one.Offset(l, 0, 0, 0), pos, cs.key_rope_inv_freq);
    blocks.push_back(b);
    ASSERT_TRUE(
        (*codec)->Encode({{one, DType::kF32, blocks.back().data(), pos, 0}}, &payloads).ok());
  }
  ASSERT_EQ(payloads.size(), 2u);
  PayloadHeader h0, h1;
  std::memcpy(&h0, payloads[0].data(), sizeof h0);
  std::memcpy(&h1, payloads[1].data(), sizeof h1);
  EXPECT_EQ(h0.first_token, 40);
  EXPECT_EQ(h1.first_token, 5000);
  EXPECT_EQ(payloads[0].substr(sizeof(PayloadHeader)), payloads[1].substr(sizeof(PayloadHeader)));
  // Decoded keys are the reconstruction rotated to each block's position: rotating the first
  // back to position 0 and forward to 5000 gives the second.
  auto d0 = (*codec)->DecodeToFloat(payloads[0]);
  auto d1 = (*codec)->DecodeToFloat(payloads[1]);
  ASSERT_TRUE(d0.ok() && d1.ok());
  double err = 0, ref = 0;
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k0(d0->begin() + one.Offset(l, 0, 0, 0),
                          d0->begin() + one.Offset(l, 0, 0, 0) + kHeads * kDim);
    std::vector<float> k1(d1->begin() + one.Offset(l, 0, 0, 0),
                          d1->begin() + one.Offset(l, 0, 0, 0) + kHeads * kDim);
    const std::vector<int64_t> p40 = {40};
    CodeSpace rope_only;
    rope_only.key_rope_inv_freq = cs.key_rope_inv_freq;
    ToCodeSpace(rope_only, l, 0, kHeads, kDim, p40, k0.data());  // back to position 0
    Rope(k0.data(), 5000, cs.key_rope_inv_freq);
    for (int i = 0; i < kHeads * kDim; ++i) EXPECT_NEAR(k0[i], k1[i], 1e-3f);
    for (int i = 0; i < kHeads * kDim; ++i) {
      const float want = blocks[1][one.Offset(l, 0, 0, 0) + i];
      err += (k1[i] - want) * (k1[i] - want);
      ref += want * want;
    }
  }
  EXPECT_LT(err / ref, 0.5) << "reconstruction must still approximate the key";
  // The plain codebook on the same samples codes the two placements differently.
  CodecSpec pspec = spec;
  pspec.codebook = std::make_shared<const Codebook>(Fit({}, s));
  auto plain = CreateCodec(pspec);
  ASSERT_TRUE(plain.ok());
  std::vector<std::string> pp;
  ASSERT_TRUE((*plain)
                  ->Encode({{one, DType::kF32, blocks[0].data(), 40, 0},
                            {one, DType::kF32, blocks[1].data(), 5000, 0}},
                           &pp)
                  .ok());
  EXPECT_NE(pp[0].substr(sizeof(PayloadHeader)), pp[1].substr(sizeof(PayloadHeader)));
}

TEST(CodeSpaceTest, BlocksPastInt32NeedAPositionForPreRopeKeys) {
  const KvShape shape{kLayers, 32, kHeads, kDim};
  const auto x = testing::RandomKv(shape, 13);
  CodeSpace cs;
  cs.key_rope_inv_freq = InvFreq();
  CodecSpec spec;
  spec.name = "rvq";
  spec.codebook = std::make_shared<const Codebook>(Fit(cs, testing::SamplesFrom(shape, x)));
  auto codec = CreateCodec(spec);
  ASSERT_TRUE(codec.ok());
  std::vector<std::string> out;
  const auto st = (*codec)->Encode({{shape, DType::kF32, x.data(), int64_t{1} << 32, 0}}, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(out.empty());
}

// The split chooser measures errors after mapping back from the code space: with a scale-only
// code space of all ones the errors equal the plain codebook's.
TEST(CodeSpaceTest, SplitErrorsAreMeasuredInModelSpace) {
  const KvShape shape{kLayers, 80, kHeads, kDim};
  const auto x = testing::RandomKv(shape, 15);
  KvSamples s = testing::SamplesFrom(shape, x);
  s.q_heads = kHeads;
  s.q = s.k;
  CodeSpace ones;
  ones.scale.assign(kLayers * 2, std::vector<float>(kHeads * kDim, 1.f));
  const Codebook a = Fit({}, s), b = Fit(ones, s);
  EXPECT_NE(a.id(), b.id());
  BudgetOptions bo;
  bo.sink_tokens = 2;
  bo.recent_tokens = 4;
  auto ea = MeasureSplitErrors(a, s, bo), eb = MeasureSplitErrors(b, s, bo);
  ASSERT_TRUE(ea.ok() && eb.ok());
  ASSERT_EQ(ea->err.size(), eb->err.size());
  for (size_t l = 0; l < ea->err.size(); ++l) EXPECT_EQ(ea->err[l], eb->err[l]);
  // Query scaling changes what is fitted.
  CodeSpaceOptions co;
  co.key_query_scale = true;
  auto cs = ComputeCodeSpace(s, co);
  ASSERT_TRUE(cs.ok()) << cs.status();
  EXPECT_TRUE(cs->scaled());
  EXPECT_TRUE(cs->scale[1].empty());  // values untouched without value_energy
  KvSamples noq = s;
  noq.q.clear();
  EXPECT_FALSE(ComputeCodeSpace(noq, co).ok());
}

}  // namespace
}  // namespace vqkv::kernels
