#include <cmath>
#include <cstring>
#include <random>

#include "gtest/gtest.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/rvq_fit.h"
#include "kernels/vq_search.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels {
namespace {

double RelError(const std::vector<float>& x, const std::vector<float>& y) {
  double e = 0, r = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    e += double(x[i] - y[i]) * (x[i] - y[i]);
    r += double(x[i]) * x[i];
  }
  return e / r;
}

std::shared_ptr<const Codebook> Fit(const KvShape& s, const std::vector<float>& x, StageConfig k,
                                    StageConfig v, bool per_head = false, uint64_t seed = 1) {
  FitOptions opts;
  opts.iterations = 8;
  opts.seed = seed;
  auto cb = FitCodebook(RvqConfig::Uniform(s.layers, s.kv_heads, s.head_dim, k, v, per_head),
                        testing::SamplesFrom(s, x), opts);
  EXPECT_TRUE(cb.ok()) << cb.status();
  return std::make_shared<const Codebook>(std::move(*cb));
}

std::vector<float> RoundTrip(std::shared_ptr<const Codebook> cb, const KvShape& s,
                             const std::vector<float>& x, int beam = 1,
                             std::string* payload = nullptr) {
  CodecSpec spec;
  spec.name = "rvq";
  spec.sink_tokens = 0;
  spec.beam = beam;
  spec.codebook = cb;
  auto codec = CreateCodec(spec);
  EXPECT_TRUE(codec.ok()) << codec.status();
  std::vector<std::string> out;
  auto st = (*codec)->Encode({{s, DType::kF32, x.data(), 0}}, &out);
  EXPECT_TRUE(st.ok()) << st;
  if (payload) *payload = out[0];
  EXPECT_EQ(int64_t(out[0].size()), (*codec)->PayloadBytes(s, DType::kF32, 0));
  return *(*codec)->DecodeToFloat(out[0]);
}

TEST(RvqCodecTest, ErrorFallsAsStagesGrow) {
  const KvShape s{1, 256, 2, 16};
  const auto x = testing::RandomKv(s, 11);
  double prev = 1e9;
  for (int stages : {1, 2, 4, 8}) {
    auto cb = Fit(s, x, {stages, 64}, {stages, 64});
    const double e = RelError(x, RoundTrip(cb, s, x));
    EXPECT_LT(e, prev) << stages << " stages";
    prev = e;
  }
  EXPECT_LT(prev, 0.05);
}

TEST(RvqCodecTest, CodewordsAreRecoveredExactly) {
  // Data built as sums of codewords of a hand-made codebook decodes back exactly.
  const KvShape s{1, 20, 2, 8};
  const StageConfig sc{2, 4};
  RvqConfig cfg = RvqConfig::Uniform(1, 2, 8, sc, sc);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 1);
  std::vector<std::vector<float>> tables(2, std::vector<float>(2 * 4 * 8));
  for (auto& t : tables) {
    for (int j = 0; j < 4 * 8; ++j) t[j] = 10 * nd(rng);  // stage 0: far apart
    for (int j = 32; j < 64; ++j) t[j] = 0.1f * nd(rng);  // stage 1: small
  }
  auto cb = std::make_shared<const Codebook>(*Codebook::Create(cfg, tables));
  std::vector<float> x(s.elements());
  for (int c = 0; c < 2; ++c) {
    for (int t = 0; t < s.tokens; ++t) {
      for (int h = 0; h < 2; ++h) {
        const int a = rng() % 4, b = rng() % 4;
        for (int d = 0; d < 8; ++d)
          x[s.Offset(0, c, t, h) + d] = tables[c][a * 8 + d] + tables[c][32 + b * 8 + d];
      }
    }
  }
  const auto y = RoundTrip(cb, s, x);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], y[i], 1e-5f);
}

TEST(RvqCodecTest, BeamSearchNeverWorseThanGreedy) {
  const KvShape s{1, 128, 2, 16};
  const auto x = testing::RandomKv(s, 12);
  const auto other = testing::RandomKv(s, 13);  // fit on other data so codes are imperfect
  auto cb = Fit(s, other, {4, 16}, {4, 16});
  std::vector<const float*> tabs, norms;
  std::vector<int> sizes;
  for (int i = 0; i < 4; ++i) {
    tabs.push_back(cb->Table(0, 0, 0, i));
    norms.push_back(cb->Norms(0, 0, 0, i));
    sizes.push_back(16);
  }
  int better = 0;
  for (int t = 0; t < s.tokens; ++t) {
    const float* v = &x[s.Offset(0, 0, t, 0)];
    int32_t cg[4], cbm[4];
    const float eg = EncodeVector(v, 16, tabs, norms, sizes, 1, cg);
    const float eb = EncodeVector(v, 16, tabs, norms, sizes, 8, cbm);
    ASSERT_LE(eb, eg * (1 + 1e-6f) + 1e-6f) << "token " << t;
    better += eb < eg * 0.999f;
  }
  EXPECT_GT(better, 0) << "beam search found nothing better on any vector";
  EXPECT_LE(RelError(x, RoundTrip(cb, s, x, 8)), RelError(x, RoundTrip(cb, s, x, 1)));
}

TEST(RvqCodecTest, BatchedBeamMatchesPerVectorBeam) {
  // 131 tokens x 2 heads = 262 rows: not a multiple of the 8-vector chunks or 4-row tiles.
  const KvShape s{1, 131, 2, 16};
  const auto x = testing::RandomKv(s, 21);
  const auto other = testing::RandomKv(s, 22);
  constexpr int kStages = 6;
  auto cb = Fit(s, other, {kStages, 64}, {kStages, 64});
  std::vector<const float*> tabs, norms;
  std::vector<int> sizes;
  for (int i = 0; i < kStages; ++i) {
    tabs.push_back(cb->Table(0, 0, 0, i));
    norms.push_back(cb->Norms(0, 0, 0, i));
    sizes.push_back(64);
  }
  const int64_t n = int64_t{s.tokens} * s.kv_heads;
  const float* rows = &x[s.Offset(0, 0, 0, 0)];
  auto error_of = [&](const float* v, const int32_t* codes) {
    std::vector<float> r(v, v + 16);
    for (int i = 0; i < kStages; ++i) {
      for (int d = 0; d < 16; ++d) r[d] -= tabs[i][codes[i] * 16 + d];
    }
    double e = 0;
    for (float f : r) e += double(f) * f;
    return e;
  };
  for (int beam : {1, 3, 8}) {
    std::vector<int32_t> batch(n * kStages, -1);
    EncodeVectorsBeam(rows, n, 16, tabs, norms, sizes, beam, batch.data());
    int same = 0;
    double sum_batch = 0, sum_one = 0;
    for (int64_t v = 0; v < n; ++v) {
      int32_t one[kStages];
      const float e1 = EncodeVector(rows + v * 16, 16, tabs, norms, sizes, beam, one);
      const double eb = error_of(rows + v * 16, &batch[v * kStages]);
      ASSERT_NEAR(eb, e1, 1e-4 * e1 + 1e-5) << "beam " << beam << " row " << v;
      same += std::equal(one, one + kStages, &batch[v * kStages]);
      sum_batch += eb;
      sum_one += e1;
    }
    EXPECT_GE(same, n * 95 / 100) << "beam " << beam;
    EXPECT_NEAR(sum_batch, sum_one, 1e-5 * sum_one) << "beam " << beam;
  }
}

TEST(RvqCodecTest, PerHeadCodebooks) {
  const KvShape s{2, 96, 3, 8};
  const auto x = testing::RandomKv(s, 14);
  auto shared = Fit(s, x, {2, 32}, {2, 32}, false);
  auto per_head = Fit(s, x, {2, 32}, {2, 32}, true);
  EXPECT_EQ(per_head->config().CodebookBytes(), 3 * shared->config().CodebookBytes());
  EXPECT_LT(RelError(x, RoundTrip(per_head, s, x)), 0.5);
}

TEST(RvqCodecTest, CodesArePackedAtLog2Size) {
  const KvShape s{1, 64, 2, 16};
  const auto x = testing::RandomKv(s, 15);
  auto cb = Fit(s, x, {3, 1024}, {2, 512});
  std::string payload;
  RoundTrip(cb, s, x, 1, &payload);
  const int64_t bits = 64 * 2 * (3 * 10 + 2 * 9);
  EXPECT_EQ(int64_t(payload.size()), int64_t(sizeof(PayloadHeader)) + (bits + 7) / 8);
}

TEST(RvqCodecTest, RejectsShapeMismatchAndForeignCodebook) {
  const KvShape s{1, 64, 2, 16};
  const auto x = testing::RandomKv(s, 16);
  auto cb = Fit(s, x, {2, 16}, {2, 16});
  CodecSpec spec;
  spec.name = "rvq";
  spec.codebook = cb;
  auto codec = *CreateCodec(spec);
  std::vector<std::string> out;
  std::vector<float> y(2 * 64 * 2 * 32);
  auto st = codec->Encode({{{1, 64, 2, 32}, DType::kF32, y.data(), 0}}, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("head_dim"), absl::string_view::npos) << st;
  ASSERT_TRUE(codec->Encode({{s, DType::kF32, x.data(), 0}}, &out).ok());
  spec.codebook = Fit(s, x, {2, 16}, {2, 16}, false, /*seed=*/99);
  auto other = *CreateCodec(spec);
  EXPECT_EQ(other->DecodeToFloat(out[0]).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(RvqCodecTest, LayerRangeBlocksMatchTheWholeBlock) {
  // A block holding layer 1 alone (first_layer = 1) is coded with layer 1's codebooks: its
  // reconstruction equals layer 1 of the whole block's.
  const KvShape s{2, 48, 2, 16};
  const auto x = testing::RandomKv(s, 19);
  RvqConfig cfg = RvqConfig::Uniform(2, 2, 16, {3, 32}, {2, 32});
  cfg.k[1] = {1, 8};  // different stages per layer make a wrong layer choice visible
  FitOptions opts;
  opts.iterations = 4;
  auto cb = std::make_shared<const Codebook>(*FitCodebook(cfg, testing::SamplesFrom(s, x), opts));
  CodecSpec spec;
  spec.name = "rvq";
  spec.codebook = cb;
  auto codec = *CreateCodec(spec);
  std::vector<std::string> whole, part;
  ASSERT_TRUE(codec->Encode({{s, DType::kF32, x.data(), 0, 0}}, &whole).ok());
  const KvShape one{1, 48, 2, 16};
  const std::vector<float> layer1(x.begin() + s.Offset(1, 0, 0, 0), x.end());
  ASSERT_TRUE(codec->Encode({{one, DType::kF32, layer1.data(), 0, 1}}, &part).ok());
  EXPECT_EQ(int64_t(part[0].size()), codec->PayloadBytes(one, DType::kF32, 0, 1));
  const auto a = *codec->DecodeToFloat(whole[0]);
  const auto b = *codec->DecodeToFloat(part[0]);
  ASSERT_EQ(b.size(), layer1.size());
  for (size_t i = 0; i < b.size(); ++i) ASSERT_EQ(a[s.Offset(1, 0, 0, 0) + i], b[i]) << i;
  // Past the codebook's layers is an error naming the mismatch.
  EXPECT_EQ(codec->Encode({{one, DType::kF32, layer1.data(), 0, 2}}, &part).code(),
            absl::StatusCode::kInvalidArgument);
}

// Token-level relative error of (layer l, kind c) over all heads.
double TokenRelError(const KvShape& s, const std::vector<float>& x, const std::vector<float>& y,
                     int l, int c, int t) {
  double e = 0, r = 0;
  for (int h = 0; h < s.kv_heads; ++h) {
    for (int d = 0; d < s.head_dim; ++d) {
      const int64_t i = s.Offset(l, c, t, h) + d;
      e += double(x[i] - y[i]) * (x[i] - y[i]);
      r += double(x[i]) * x[i];
    }
  }
  return e / r;
}

std::unique_ptr<Codec> RvqWithOutliers(std::shared_ptr<const Codebook> cb, int outliers) {
  CodecSpec spec;
  spec.name = "rvq";
  spec.sink_tokens = 0;
  spec.outliers = outliers;
  spec.codebook = std::move(cb);
  auto codec = CreateCodec(spec);
  EXPECT_TRUE(codec.ok()) << codec.status();
  return std::move(*codec);
}

TEST(RvqCodecTest, OutliersCorrectTheWorstCodedTokens) {
  // Tokens shrunk 100x (like attention sinks: rare, small-norm vectors) are coded badly by
  // codebooks fitted on the bulk; outliers=2 stores their residual as int8 and nothing else.
  const KvShape s{2, 64, 2, 16};
  auto x = testing::RandomKv(s, 21);
  auto cb = Fit(s, x, {2, 32}, {2, 32});
  const int planted[2][2] = {{10, 41}, {3, 63}};  // per layer
  for (int l = 0; l < 2; ++l) {
    for (int t : planted[l]) {
      for (int c = 0; c < 2; ++c) {
        for (int h = 0; h < 2; ++h) {
          for (int d = 0; d < 16; ++d) x[s.Offset(l, c, t, h) + d] *= 0.01f;
        }
      }
    }
  }
  auto plain = RvqWithOutliers(cb, 0);
  auto with = RvqWithOutliers(cb, 2);
  std::vector<std::string> a, b;
  ASSERT_TRUE(plain->Encode({{s, DType::kF32, x.data(), 0}}, &a).ok());
  ASSERT_TRUE(with->Encode({{s, DType::kF32, x.data(), 0}}, &b).ok());
  // Two entries per layer: token index + per (kind, head) fp16 scale and 16 int8 values.
  EXPECT_EQ(int64_t(b[0].size()), int64_t(a[0].size()) + 2 * 2 * (4 + 2 * 2 * (2 + 16)));
  EXPECT_EQ(int64_t(b[0].size()), with->PayloadBytes(s, DType::kF32, 0));
  EXPECT_EQ(0, std::memcmp(a[0].data() + sizeof(PayloadHeader), b[0].data() + sizeof(PayloadHeader),
                           a[0].size() - sizeof(PayloadHeader)))
      << "the codes themselves must not change";
  const auto ya = *plain->DecodeToFloat(a[0]);
  const auto yb = *with->DecodeToFloat(b[0]);
  for (int l = 0; l < 2; ++l) {
    for (int t = 0; t < s.tokens; ++t) {
      const bool out = t == planted[l][0] || t == planted[l][1];
      for (int c = 0; c < 2; ++c) {
        if (out) {
          EXPECT_GT(TokenRelError(s, x, ya, l, c, t), 0.5) << l << " " << c << " " << t;
          EXPECT_LT(TokenRelError(s, x, yb, l, c, t), 1e-3) << l << " " << c << " " << t;
        } else {
          for (int h = 0; h < 2; ++h) {
            for (int d = 0; d < 16; ++d) {
              ASSERT_EQ(ya[s.Offset(l, c, t, h) + d], yb[s.Offset(l, c, t, h) + d]);
            }
          }
        }
      }
    }
  }
  EXPECT_LT(RelError(x, yb), RelError(x, ya));
  EXPECT_NE(with->Label().find("+outliers2"), std::string::npos) << with->Label();
}

TEST(RvqCodecTest, OutliersTakeSinkLikeTokensFirst) {
  // Token 20 shrunk to 0.3x in K and V (sink-like: both norms under half the block's median),
  // token 40 pushed far off the codewords (3x, sign-flipped in half of its channels), which the
  // plain codes reconstruct worse in relative terms. With one outlier slot the sink-like token
  // gets it.
  // The codebooks are fitted on data where a quarter of the tokens are shrunk alike, so that
  // they code such tokens well in relative terms (as SmolLM2's tables code the BOS positions
  // the calibration text holds).
  const KvShape s{1, 64, 2, 16};
  auto fit_x = testing::RandomKv(s, 33);
  for (int t = 0; t < 16; ++t) {
    for (int c = 0; c < 2; ++c) {
      for (int h = 0; h < 2; ++h) {
        for (int d = 0; d < 16; ++d) fit_x[s.Offset(0, c, t * 4, h) + d] *= 0.3f;
      }
    }
  }
  auto cb = Fit(s, fit_x, {2, 32}, {2, 32});
  auto x = testing::RandomKv(s, 34);
  const int sink = 20, off = 40;
  for (int c = 0; c < 2; ++c) {
    for (int h = 0; h < 2; ++h) {
      for (int d = 0; d < 16; ++d) {
        x[s.Offset(0, c, sink, h) + d] *= 0.3f;
        x[s.Offset(0, c, off, h) + d] *= (d % 2 ? -3.f : 3.f);
      }
    }
  }
  auto plain = RvqWithOutliers(cb, 0);
  auto with = RvqWithOutliers(cb, 1);
  std::vector<std::string> a, b;
  ASSERT_TRUE(plain->Encode({{s, DType::kF32, x.data(), 0}}, &a).ok());
  ASSERT_TRUE(with->Encode({{s, DType::kF32, x.data(), 0}}, &b).ok());
  const auto ya = *plain->DecodeToFloat(a[0]);
  const auto yb = *with->DecodeToFloat(b[0]);
  const double rel_sink = TokenRelError(s, x, ya, 0, 0, sink) + TokenRelError(s, x, ya, 0, 1, sink);
  const double rel_off = TokenRelError(s, x, ya, 0, 0, off) + TokenRelError(s, x, ya, 0, 1, off);
  double rel_max_other = 0;
  for (int t = 0; t < s.tokens; ++t) {
    if (t == sink) continue;
    rel_max_other = std::max(rel_max_other,
                             TokenRelError(s, x, ya, 0, 0, t) + TokenRelError(s, x, ya, 0, 1, t));
  }
  // The construction holds: by relative error alone, another token would take the slot.
  ASSERT_GT(rel_max_other, rel_sink) << rel_off;
  int32_t entry = -1;
  std::memcpy(&entry, b[0].data() + a[0].size(), 4);
  EXPECT_EQ(entry, sink);
  for (int c = 0; c < 2; ++c) {
    EXPECT_LT(TokenRelError(s, x, yb, 0, c, sink), 1e-3) << c;
    EXPECT_EQ(TokenRelError(s, x, yb, 0, c, off), TokenRelError(s, x, ya, 0, c, off)) << c;
  }
}

TEST(RvqCodecTest, OutlierEntriesAreValidated) {
  const KvShape s{1, 16, 2, 8};
  const auto x = testing::RandomKv(s, 22);
  auto cb = Fit(s, x, {1, 8}, {1, 8});
  auto with = RvqWithOutliers(cb, 3);
  std::vector<std::string> out;
  ASSERT_TRUE(with->Encode({{s, DType::kF32, x.data(), 0}}, &out).ok());
  const size_t entry = 4 + 2 * 2 * (2 + 8);
  const size_t first = out[0].size() - 3 * entry;
  auto set_token = [&](size_t e, int32_t t) {
    std::string p = out[0];
    std::memcpy(p.data() + first + e * entry, &t, 4);
    return p;
  };
  int32_t t0, t1;
  std::memcpy(&t0, out[0].data() + first, 4);
  std::memcpy(&t1, out[0].data() + first + entry, 4);
  ASSERT_LT(t0, t1);
  for (const std::string& bad : {set_token(0, 16), set_token(0, -1), set_token(1, t0)}) {
    const auto st = with->DecodeToFloat(bad).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_NE(st.message().find("outlier entry"), absl::string_view::npos) << st;
  }
  std::string nan_scale = out[0];
  const uint16_t inf = 0x7c00;
  std::memcpy(nan_scale.data() + first + 4, &inf, 2);
  EXPECT_EQ(with->DecodeToFloat(nan_scale).status().code(), absl::StatusCode::kInvalidArgument);
  // Another outlier count cannot read it; the spec string carries the setting.
  EXPECT_EQ(RvqWithOutliers(cb, 0)->DecodeToFloat(out[0]).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto spec = ParseCodecSpec("rvq:beam=2,outliers=3");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->outliers, 3);
  EXPECT_EQ(CodecSpecString(*spec), "rvq:beam=2,sinks=4,outliers=3");
  spec->outliers = -1;
  spec->codebook = cb;
  EXPECT_EQ(CreateCodec(*spec).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RvqFitTest, SameSeedSameCodebook) {
  const KvShape s{1, 128, 2, 16};
  const auto x = testing::RandomKv(s, 17);
  EXPECT_EQ(Fit(s, x, {2, 32}, {1, 32})->id(), Fit(s, x, {2, 32}, {1, 32})->id());
  EXPECT_NE(Fit(s, x, {2, 32}, {1, 32}, false, 1)->id(),
            Fit(s, x, {2, 32}, {1, 32}, false, 2)->id());
}

TEST(RvqFitTest, TruncationEqualsFittingFewerStages) {
  const KvShape s{1, 128, 2, 16};
  const auto x = testing::RandomKv(s, 18);
  auto full = Fit(s, x, {4, 32}, {3, 32});
  auto small = Fit(s, x, {2, 32}, {1, 32});
  auto cut = TruncateCodebook(*full, small->config());
  ASSERT_TRUE(cut.ok()) << cut.status();
  EXPECT_EQ(cut->id(), small->id());
}

TEST(RvqFitTest, KMeansHandlesFewPointsAndEmptyClusters) {
  std::vector<float> pts = {0, 0, 1, 1, 0, 0, 1, 1};  // 4 points, 2 distinct, dim 2
  FitOptions opts;
  double mse = -1;
  auto c = KMeans(pts.data(), 4, 2, 8, opts, 1, &mse);  // more centroids than points
  EXPECT_EQ(c.size(), 16u);
  EXPECT_EQ(mse, 0);
  std::vector<float> many(200 * 2);
  for (int i = 0; i < 200; ++i) many[2 * i] = many[2 * i + 1] = float(i % 2);  // 2 distinct
  c = KMeans(many.data(), 200, 2, 4, opts, 1, &mse);
  EXPECT_NEAR(mse, 0, 1e-9);
}

TEST(RvqFitTest, RejectsBadSamples) {
  KvSamples s;
  s.layers = 1;
  s.kv_heads = 1;
  s.head_dim = 4;
  s.k = {{1, 2, 3}};
  s.v = {{1, 2, 3, 4}};
  auto st = FitCodebook(RvqConfig::Uniform(1, 1, 4, {1, 2}, {1, 2}), s, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  s.k = {{1, 2, 3, NAN}};
  st = FitCodebook(RvqConfig::Uniform(1, 1, 4, {1, 2}, {1, 2}), s, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("NaN"), absl::string_view::npos);
  st = FitCodebook(RvqConfig::Uniform(1, 1, 8, {1, 2}, {1, 2}), s, {}).status();
  EXPECT_NE(st.message().find("head_dim"), absl::string_view::npos);
}

}  // namespace
}  // namespace vqkv::kernels
