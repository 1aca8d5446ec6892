// GPU scalar (KIVI-style) quantize/dequantize against the CPU scalar codec: bodies byte-for-byte
// equal, dequantized values bit-equal, guard bands intact, odd sizes and groups.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/cuda/gpu_scalar.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels::cuda {
namespace {

namespace testing_data = ::vqkv::kernels::testing;
using gputest::GuardedBuffer;

struct ScalarCase {
  const char* name;
  int dim, heads, layers, tokens, sinks, bits, group;
  DType dtype;
  int misalign = 0;      // elements by which the input and output pointers are shifted
  bool zeros = false;    // a third of the values and all of channel 0 are +-0
  float offset = 0;      // added to channels d % offset_every == 0 (zero points far from 0 in
  int offset_every = 1;  // units of the scale: the quantize paths that keep x - zero)
  bool grid = false;     // values 1 + k/2, k < 4 * levels + 1: exact rounding ties
};

class ScalarTest : public ::testing::TestWithParam<ScalarCase> {};

TEST_P(ScalarTest, MatchesCpuCodecBitForBit) {
  VQKV_REQUIRE_GPU();
  const ScalarCase& tc = GetParam();
  const KvShape s{tc.layers, tc.tokens, tc.heads, tc.dim};
  std::vector<float> xf = testing_data::RandomKv(s, 77);
  if (tc.zeros) {
    // Signed zeros decide the fp16 sign of a zero scale/zero point: the GPU must pick the one
    // the CPU's sequential std::min/std::max pick.
    std::mt19937 rng(5);
    for (size_t i = 0; i < xf.size(); ++i) {
      const uint32_t r = rng();
      if (r % 3 == 0 || i % s.head_dim == 0) {
        xf[i] = (r >> 8) % 2 ? -0.f : 0.f;
      }
    }
  }
  if (tc.offset != 0) {
    for (size_t i = 0; i < xf.size(); ++i) {
      if (int(i % s.head_dim) % tc.offset_every == 0) xf[i] += tc.offset;
    }
  }
  if (tc.grid) {
    // Groups spanning [1, 1 + 2 * levels] get scale 2; then half of the odd k sit exactly on a
    // rounding boundary (y = k / 4), which the GPU must resolve as the CPU's lround does.
    std::mt19937 rng(11);
    const uint32_t steps = 4u * ((1u << tc.bits) - 1u) + 1u;
    for (float& x : xf) x = 1.f + float(rng() % steps) / 2.f;
  }
  std::vector<uint16_t> xh;
  const void* host = xf.data();
  if (tc.dtype != DType::kF32) {
    xh.resize(xf.size());
    FromFloat(xf.data(), xf.size(), tc.dtype, xh.data());
    host = xh.data();
  }
  CodecSpec spec;
  spec.name = "scalar";
  spec.scalar_bits = tc.bits;
  spec.scalar_group = tc.group;
  spec.sink_tokens = tc.sinks;
  auto cpu = CreateCodec(spec);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  KvBlockView v{s, tc.dtype, host, 0, 0};
  std::vector<std::string> payloads;
  ASSERT_TRUE((*cpu)->Encode({&v, 1}, &payloads).ok());
  const size_t sink_bytes =
      size_t(s.layers) * 2 * tc.sinks * s.kv_heads * s.head_dim * DTypeSize(tc.dtype);
  const std::string cpu_body = payloads[0].substr(sizeof(PayloadHeader) + sink_bytes);
  const ScalarSpec ss{tc.bits, tc.group};
  ASSERT_EQ(ScalarBodyBytes(s, tc.sinks, ss), int64_t(cpu_body.size()));

  const size_t in_bytes = size_t(s.elements()) * DTypeSize(tc.dtype);
  const size_t shift = size_t(tc.misalign) * DTypeSize(tc.dtype);
  GuardedBuffer din(in_bytes + shift);
  (void)cudaMemcpy(din.as<uint8_t>() + shift, host, in_bytes, cudaMemcpyHostToDevice);
  GuardedBuffer dbody((cpu_body.size() + 3) & ~size_t{3});  // poisoned: quantize writes it all
  DeviceScalarBlock blk;
  blk.shape = s;
  blk.sinks = tc.sinks;
  blk.in = din.as<uint8_t>() + shift;
  blk.body = dbody.as<uint8_t>();
  const absl::Status st = ScalarQuantize({&blk, 1}, tc.dtype, ss, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dbody.GuardDamage(), 0u);
  const std::vector<uint8_t> gb = dbody.Download<uint8_t>();
  const std::string gpu_body(reinterpret_cast<const char*>(gb.data()), cpu_body.size());
  size_t diff = 0;
  for (size_t i = 0; i < cpu_body.size(); ++i) diff += gpu_body[i] != cpu_body[i];
  size_t pad_nonzero = 0;  // the bytes up to the 4-byte boundary are zero padding
  for (size_t i = cpu_body.size(); i < gb.size(); ++i) pad_nonzero += gb[i] != 0;
  std::printf("[%s] body bytes=%zu differing=%zu\n", tc.name, cpu_body.size(), diff);
  EXPECT_EQ(diff, 0u);
  EXPECT_EQ(pad_nonzero, 0u);

  // Dequantize the CPU body on the GPU, in every output dtype.
  auto ref = (*cpu)->DecodeToFloat(payloads[0]);
  ASSERT_TRUE(ref.ok());
  for (DType out : {DType::kF32, DType::kF16, DType::kBF16}) {
    GuardedBuffer dcpu((cpu_body.size() + 3) & ~size_t{3});
    dcpu.Poison(0);
    dcpu.Upload(cpu_body.data(), cpu_body.size());
    const size_t oshift = size_t(tc.misalign) * DTypeSize(out);
    GuardedBuffer dout(size_t(s.elements()) * DTypeSize(out) + oshift);
    DeviceScalarBlock d;
    d.shape = s;
    d.sinks = tc.sinks;
    d.out = dout.as<uint8_t>() + oshift;
    d.body = dcpu.as<uint8_t>();
    ASSERT_TRUE(ScalarDequantize({&d, 1}, out, ss, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(dout.GuardDamage(), 0u);
    std::vector<uint8_t> raw = dout.Download<uint8_t>();
    for (size_t i = 0; i < oshift; ++i) EXPECT_EQ(raw[i], 0xFF) << "byte before the output";
    raw.erase(raw.begin(), raw.begin() + oshift);
    std::vector<uint8_t> want(size_t(s.elements()) * DTypeSize(out));
    FromFloat(ref->data(), ref->size(), out, want.data());
    const size_t es = DTypeSize(out);
    int64_t bad = 0, poisoned_sinks = 0;
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        for (int t = 0; t < s.tokens; ++t) {
          const int64_t o = s.Offset(l, c, t, 0) * int64_t(es);
          const size_t n = size_t(s.kv_heads) * s.head_dim * es;
          if (t < tc.sinks) {
            for (size_t i = 0; i < n; ++i) poisoned_sinks += raw[o + i] == 0xFF;
            continue;
          }
          bad += std::memcmp(raw.data() + o, want.data() + o, n) != 0;
        }
      }
    }
    EXPECT_EQ(bad, 0) << "rows differing from the CPU decode, out " << DTypeName(out);
    EXPECT_EQ(poisoned_sinks, int64_t(s.layers) * 2 * tc.sinks * s.kv_heads * s.head_dim * es)
        << "sink rows must be left untouched";
  }
}

const ScalarCase kScalarCases[] = {
    {"llama_like", 128, 8, 2, 64, 4, 2, 32, DType::kF16},
    {"bits4_bf16", 128, 8, 2, 37, 0, 4, 32, DType::kBF16},
    {"group7_f32", 64, 3, 1, 5, 0, 2, 7, DType::kF32},
    {"group_gt_dim", 96, 2, 2, 100, 4, 4, 128, DType::kF16},
    {"odd_dim", 80, 1, 1, 33, 1, 2, 16, DType::kF16},
    {"one_token", 128, 2, 1, 1, 0, 2, 32, DType::kF16},
    {"huge_group", 64, 2, 1, 50, 0, 2, 4096, DType::kF16},
    {"odd_everything", 48, 3, 3, 29, 2, 4, 5, DType::kBF16},
    {"odd_dim33", 33, 3, 1, 17, 0, 2, 8, DType::kF16},
    {"long_groups_f32", 64, 2, 1, 300, 4, 4, 100, DType::kF32},
    // Vector paths: word-aligned K runs (tokens a multiple of 16 / 8 codes), bench geometry.
    {"aligned_f16", 128, 8, 2, 64, 0, 2, 32, DType::kF16},
    {"aligned_bits4_f32", 128, 4, 2, 48, 0, 4, 32, DType::kF32},
    {"aligned_bits4_bf16", 128, 8, 1, 96, 32, 4, 32, DType::kBF16},
    // K groups longer than the 32 rows kept in registers; tokens not a multiple of the group.
    {"group64_tail", 128, 2, 2, 150, 3, 2, 64, DType::kF16},
    {"group128_bf16", 64, 4, 1, 200, 0, 4, 128, DType::kBF16},
    // Head dims whose V groups take 4 lanes, or span a head boundary in the K vectors.
    {"dim96_f16", 96, 3, 2, 45, 2, 2, 32, DType::kF16},
    {"dim36_group6", 36, 3, 2, 21, 0, 2, 6, DType::kF16},
    {"group1_f32", 16, 2, 1, 9, 0, 4, 1, DType::kF32},
    {"group3_dim20_bf16", 20, 5, 2, 31, 5, 2, 3, DType::kBF16},
    // Pointers 2 and 8 bytes off a 16-byte boundary: the scalar and 8-byte paths.
    {"misaligned2_f16", 128, 8, 1, 40, 0, 2, 32, DType::kF16, 1},
    {"misaligned8_bf16", 64, 2, 2, 40, 0, 2, 32, DType::kBF16, 4},
    // Signed zeros (scale and zero point of +-0).
    {"signed_zeros_f16", 64, 2, 2, 70, 2, 2, 32, DType::kF16, 0, true},
    {"signed_zeros_bf16_odd", 33, 3, 1, 19, 0, 4, 8, DType::kBF16, 0, true},
    {"signed_zeros_f32", 128, 4, 1, 64, 0, 4, 32, DType::kF32, 0, true},
    // Word-aligned K path (2-byte types, group 32, tokens * bits % 32 == 0): a 16- and an
    // 8-token tail group, signed zeros, zero points far from 0 in every third channel (K warps
    // keep x - zero) or everywhere (V too), exact rounding ties.
    {"k32_tail_f16", 64, 4, 2, 48, 0, 2, 32, DType::kF16},
    {"k32_tail_bits4_bf16", 40, 3, 2, 45, 5, 4, 32, DType::kBF16},  // 60 pairs: idle lanes
    {"k32_misaligned4_f16", 64, 2, 2, 64, 0, 2, 32, DType::kF16, 2},
    {"k32_signed_zeros_f16", 64, 2, 2, 64, 0, 2, 32, DType::kF16, 0, true},
    {"k32_offset_f16", 128, 4, 2, 64, 0, 2, 32, DType::kF16, 0, false, 100.f, 3},
    {"k32_offset_all_bits4_bf16", 96, 3, 1, 32, 0, 4, 32, DType::kBF16, 0, false, 60.f, 1},
    {"k32_ties_f16", 64, 4, 2, 64, 0, 2, 32, DType::kF16, 0, false, 0.f, 1, true},
    {"k32_ties_bits4_bf16", 64, 2, 1, 40, 8, 4, 32, DType::kBF16, 0, false, 0.f, 1, true},
    {"ties_f32", 64, 2, 1, 48, 0, 2, 32, DType::kF32, 0, false, 0.f, 1, true},
};

INSTANTIATE_TEST_SUITE_P(Shapes, ScalarTest, ::testing::ValuesIn(kScalarCases),
                         [](const ::testing::TestParamInfo<ScalarCase>& i) {
                           return std::string(i.param.name);
                         });

// Several blocks of different token counts in one launch equal one launch per block.
TEST(ScalarBatch, MixedTokenCounts) {
  VQKV_REQUIRE_GPU();
  const ScalarSpec ss{2, 32};
  const std::vector<std::pair<int, int>> tok_sinks = {{16, 4}, {16, 0}, {33, 0}, {1, 0}, {4, 4}};
  std::vector<std::unique_ptr<GuardedBuffer>> ins, batch_bodies, single_bodies;
  std::vector<DeviceScalarBlock> blocks;
  for (size_t i = 0; i < tok_sinks.size(); ++i) {
    const KvShape s{2, tok_sinks[i].first, 4, 64};
    std::vector<float> x = testing_data::RandomKv(s, 900 + i);
    ins.push_back(std::make_unique<GuardedBuffer>(x.size() * 4));
    ins.back()->Upload(x.data(), x.size() * 4);
    const size_t nb = (size_t(ScalarBodyBytes(s, tok_sinks[i].second, ss)) + 3) & ~size_t{3};
    batch_bodies.push_back(std::make_unique<GuardedBuffer>(std::max<size_t>(nb, 4)));
    single_bodies.push_back(std::make_unique<GuardedBuffer>(std::max<size_t>(nb, 4)));
    DeviceScalarBlock b;
    b.shape = s;
    b.sinks = tok_sinks[i].second;
    b.in = ins.back()->get();
    b.body = batch_bodies.back()->as<uint8_t>();
    blocks.push_back(b);
  }
  ASSERT_TRUE(ScalarQuantize(blocks, DType::kF32, ss, nullptr).ok());
  for (size_t i = 0; i < blocks.size(); ++i) {
    DeviceScalarBlock b = blocks[i];
    b.body = single_bodies[i]->as<uint8_t>();
    ASSERT_TRUE(ScalarQuantize({&b, 1}, DType::kF32, ss, nullptr).ok());
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const size_t nb = size_t(ScalarBodyBytes(blocks[i].shape, blocks[i].sinks, ss));
    const auto a = batch_bodies[i]->Download<uint8_t>();
    const auto b = single_bodies[i]->Download<uint8_t>();
    EXPECT_TRUE(std::equal(a.begin(), a.begin() + nb, b.begin())) << "block " << i;
    EXPECT_EQ(batch_bodies[i]->GuardDamage(), 0u);
  }
}

// Blocks of several token counts (all multiples of 16: the word-aligned fp16 K path), one of
// them all sinks, quantized in one launch: each body equals the CPU codec's.
TEST(ScalarBatch, FastPathsMatchCpuPerBlock) {
  VQKV_REQUIRE_GPU();
  for (int bits : {2, 4}) {
    const ScalarSpec ss{bits, 32};
    CodecSpec spec;
    spec.name = "scalar";
    spec.scalar_bits = bits;
    spec.scalar_group = 32;
    const std::vector<std::pair<int, int>> tok_sinks = {{64, 0}, {36, 4}, {48, 0},
                                                        {3, 3},  {16, 0}, {96, 16}};
    std::vector<std::unique_ptr<GuardedBuffer>> ins, bodies;
    std::vector<std::string> want;
    std::vector<DeviceScalarBlock> blocks;
    for (size_t i = 0; i < tok_sinks.size(); ++i) {
      const KvShape s{2, tok_sinks[i].first, 4, 64};
      const std::vector<float> xf = testing_data::RandomKv(s, 300 + i);
      std::vector<uint16_t> xh(xf.size());
      FromFloat(xf.data(), xf.size(), DType::kF16, xh.data());
      spec.sink_tokens = tok_sinks[i].second;
      auto cpu = CreateCodec(spec);
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      KvBlockView v{s, DType::kF16, xh.data(), 0, 0};
      std::vector<std::string> payloads;
      ASSERT_TRUE((*cpu)->Encode({&v, 1}, &payloads).ok());
      const size_t sink_bytes = size_t(s.layers) * 2 * tok_sinks[i].second * 4 * 64 * 2;
      want.push_back(payloads[0].substr(sizeof(PayloadHeader) + sink_bytes));
      ins.push_back(std::make_unique<GuardedBuffer>(xh.size() * 2));
      ins.back()->Upload(xh.data(), xh.size() * 2);
      bodies.push_back(std::make_unique<GuardedBuffer>(
          std::max<size_t>((want.back().size() + 3) & ~size_t{3}, 4)));
      DeviceScalarBlock b;
      b.shape = s;
      b.sinks = tok_sinks[i].second;
      b.in = ins.back()->get();
      b.body = bodies.back()->as<uint8_t>();
      blocks.push_back(b);
    }
    ASSERT_TRUE(ScalarQuantize(blocks, DType::kF16, ss, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto got = bodies[i]->Download<uint8_t>();
      EXPECT_EQ(std::memcmp(want[i].data(), got.data(), want[i].size()), 0)
          << "bits " << bits << " block " << i;
      EXPECT_EQ(bodies[i]->GuardDamage(), 0u);
    }
  }
}

TEST(ScalarErrors, RejectsNonFiniteOnFastPaths) {
  VQKV_REQUIRE_GPU();
  const KvShape s{2, 64, 2, 64};
  const std::vector<float> x = testing_data::RandomKv(s, 2);
  for (int kv = 0; kv < 2; ++kv) {
    std::vector<uint16_t> xh(x.size());
    FromFloat(x.data(), x.size(), DType::kF16, xh.data());
    xh[s.Offset(1, kv, 37, 1) + 5] = 0x7C00;  // +inf
    GuardedBuffer din(xh.size() * 2), body(1 << 16);
    din.Upload(xh.data(), xh.size() * 2);
    DeviceScalarBlock b;
    b.shape = s;
    b.in = din.get();
    b.body = body.as<uint8_t>();
    EXPECT_TRUE(absl::IsInvalidArgument(ScalarQuantize({&b, 1}, DType::kF16, {2, 32}, nullptr)))
        << (kv ? "V" : "K");
    EXPECT_EQ(body.GuardDamage(), 0u);
  }
}

TEST(ScalarErrors, RejectsNonFiniteAndBadSpecs) {
  VQKV_REQUIRE_GPU();
  const KvShape s{1, 8, 2, 64};
  std::vector<float> x = testing_data::RandomKv(s, 1);
  x[s.Offset(0, 0, 5, 1) + 3] = std::numeric_limits<float>::infinity();
  GuardedBuffer din(x.size() * 4), body(1 << 14);
  din.Upload(x.data(), x.size() * 4);
  DeviceScalarBlock b;
  b.shape = s;
  b.in = din.get();
  b.body = body.as<uint8_t>();
  EXPECT_TRUE(absl::IsInvalidArgument(ScalarQuantize({&b, 1}, DType::kF32, {2, 32}, nullptr)));
  x[s.Offset(0, 0, 5, 1) + 3] = 1e9f;  // scale overflows fp16
  din.Upload(x.data(), x.size() * 4);
  EXPECT_TRUE(absl::IsInvalidArgument(ScalarQuantize({&b, 1}, DType::kF32, {2, 32}, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(ScalarQuantize({&b, 1}, DType::kF32, {3, 32}, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(ScalarQuantize({&b, 1}, DType::kF32, {2, 0}, nullptr)));
}

}  // namespace
}  // namespace vqkv::kernels::cuda
