// Codec-independent behaviour: raw is bit-exact in every dtype, sinks are lossless, bad input
// is rejected with the field named, and payload damage is detected.
#include "kernels/codec.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels {
namespace {

using ::vqkv::kernels::testing::RandomKv;

std::unique_ptr<Codec> Make(const std::string& text) {
  auto spec = ParseCodecSpec(text);
  EXPECT_TRUE(spec.ok()) << spec.status();
  auto c = CreateCodec(*spec);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(*c);
}

TEST(CodecTest, RawIsBitExactInEveryDtype) {
  const KvShape s{2, 33, 3, 16};
  const auto x = RandomKv(s, 1);
  auto codec = Make("raw");
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    std::string in(s.elements() * DTypeSize(dt), '\0');
    FromFloat(x.data(), x.size(), dt, in.data());
    for (int64_t first : {0, 2, 100}) {
      std::vector<std::string> out;
      ASSERT_TRUE(codec->Encode({{s, dt, in.data(), first}}, &out).ok());
      ASSERT_EQ(out.size(), 1u);
      EXPECT_EQ(int64_t(out[0].size()), codec->PayloadBytes(s, dt, first));
      std::string back(in.size(), '\x55');
      void* ptr = back.data();
      size_t bytes = back.size();
      std::string_view p = out[0];
      ASSERT_TRUE(codec->Decode({&p, 1}, dt, {&ptr, 1}, {&bytes, 1}).ok());
      EXPECT_EQ(back, in) << DTypeName(dt) << " first_token " << first;
    }
  }
}

TEST(CodecTest, SinkTokensStayLossless) {
  const KvShape s{2, 40, 2, 16};
  const auto x = RandomKv(s, 2);
  auto codec = Make("scalar-2:sinks=4");
  std::vector<std::string> out;
  ASSERT_TRUE(codec
                  ->Encode({{s, DType::kF32, x.data(), 0},
                            {s, DType::kF32, x.data(), 2},
                            {s, DType::kF32, x.data(), 40}},
                           &out)
                  .ok());
  for (int b = 0; b < 3; ++b) {
    auto y = codec->DecodeToFloat(out[b]);
    ASSERT_TRUE(y.ok()) << y.status();
    const int sinks = b == 0 ? 4 : b == 1 ? 2 : 0;
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        for (int t = 0; t < s.tokens; ++t) {
          const int64_t o = s.Offset(l, c, t, 0);
          const bool exact = std::memcmp(&x[o], &(*y)[o], s.kv_heads * s.head_dim * 4) == 0;
          if (t < sinks) {
            EXPECT_TRUE(exact) << "block " << b << " token " << t;
          } else {
            EXPECT_FALSE(exact) << "block " << b << " token " << t;
          }
        }
      }
    }
  }
}

TEST(CodecTest, RejectsBadInputNamingTheField) {
  auto codec = Make("scalar-4");
  std::vector<std::string> out;
  std::vector<float> x(2 * 2 * 8 * 2 * 16, 1.f);
  auto st = codec->Encode({{{2, 0, 2, 16}, DType::kF32, x.data(), 0}}, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("tokens"), absl::string_view::npos) << st;
  st = codec->Encode({{{2, 8, 2, -1}, DType::kF32, x.data(), 0}}, &out);
  EXPECT_NE(st.message().find("head_dim"), absl::string_view::npos) << st;
  x[17] = std::numeric_limits<float>::quiet_NaN();
  st = codec->Encode({{{2, 8, 2, 16}, DType::kF32, x.data(), 0}}, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("NaN"), absl::string_view::npos) << st;
  x[17] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(codec->Encode({{{2, 8, 2, 16}, DType::kF32, x.data(), 0}}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(codec->Encode({{{2, 8, 2, 16}, static_cast<DType>(9), x.data(), 0}}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(out.empty());
}

TEST(CodecTest, DetectsGarbageAndTruncation) {
  const KvShape s{1, 16, 2, 16};
  const auto x = RandomKv(s, 3);
  auto codec = Make("scalar-2");
  std::vector<std::string> out;
  ASSERT_TRUE(codec->Encode({{s, DType::kF32, x.data(), 0}}, &out).ok());
  std::vector<float> y(s.elements());
  void* ptr = y.data();
  size_t bytes = y.size() * 4;
  auto decode = [&](std::string_view p) {
    return codec->Decode({&p, 1}, DType::kF32, {&ptr, 1}, {&bytes, 1});
  };
  EXPECT_TRUE(decode(out[0]).ok());
  EXPECT_EQ(decode(std::string_view(out[0]).substr(0, out[0].size() - 1)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(decode("garbage bytes that are not a payload at all....").code(),
            absl::StatusCode::kInvalidArgument);
  std::string bad_shape = out[0];
  const int32_t huge = 1 << 30;
  std::memcpy(bad_shape.data() + 12, &huge, 4);  // tokens
  EXPECT_EQ(decode(bad_shape).code(), absl::StatusCode::kInvalidArgument);
  // A payload of another codec.
  auto raw = Make("raw");
  std::vector<std::string> raw_out;
  ASSERT_TRUE(raw->Encode({{s, DType::kF32, x.data(), 0}}, &raw_out).ok());
  EXPECT_EQ(decode(raw_out[0]).code(), absl::StatusCode::kInvalidArgument);
  // Output buffer too small.
  size_t small = 8;
  std::string_view p = out[0];
  EXPECT_EQ(codec->Decode({&p, 1}, DType::kF32, {&ptr, 1}, {&small, 1}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CodecTest, RegistryAndSpecParsing) {
  EXPECT_EQ(ParseCodecSpec("bogus").ok(), true);  // name checked at creation
  EXPECT_EQ(CreateCodec(*ParseCodecSpec("bogus")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseCodecSpec("scalar-2:colour=3").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateCodec(*ParseCodecSpec("scalar:bits=3")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateCodec(*ParseCodecSpec("rvq")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto spec = ParseCodecSpec("scalar-4:group=64,sinks=0");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->scalar_bits, 4);
  EXPECT_EQ(spec->scalar_group, 64);
  EXPECT_EQ(spec->sink_tokens, 0);
}

}  // namespace
}  // namespace vqkv::kernels
