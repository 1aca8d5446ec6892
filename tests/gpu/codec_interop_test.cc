// The GPU codecs through the Codec interface: registration, payloads exchangeable with the CPU
// codecs in both directions, Encode == EncodeBatch, Decode == DecodeBatch, and the interface's
// error contract (NaN input, wrong codebook, truncated or foreign payloads).
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/cuda/cuda_codecs.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels::cuda {
namespace {

namespace testing_data = ::vqkv::kernels::testing;
using gputest::Nmse;
using gputest::RandomCodebook;

struct Blocks {
  std::vector<std::vector<uint16_t>> data;
  std::vector<KvBlockView> views;
};

Blocks MakeBlocks(const KvShape& s, int n, uint32_t seed) {
  Blocks b;
  for (int i = 0; i < n; ++i) {
    const std::vector<float> x = testing_data::RandomKv(s, seed + i);
    b.data.emplace_back(x.size());
    FromFloat(x.data(), x.size(), DType::kF16, b.data.back().data());
  }
  for (int i = 0; i < n; ++i) {
    b.views.push_back({s, DType::kF16, b.data[i].data(), int64_t(i) * s.tokens, 0});
  }
  return b;
}

std::vector<std::string_view> Views(const std::vector<std::string>& p) {
  return std::vector<std::string_view>(p.begin(), p.end());
}

TEST(CudaCodecs, RvqPayloadsInterchangeWithCpu) {
  VQKV_REQUIRE_GPU();
  ASSERT_TRUE(RegisterCudaCodecs());
  const RvqConfig cfg = RvqConfig::Uniform(2, 4, 128, {8, 512}, {4, 256});
  auto cb = std::make_shared<Codebook>(RandomCodebook(cfg, 5));
  CodecSpec spec;
  spec.name = "rvq-cuda";
  spec.codebook = cb;
  auto gpu = CreateCodec(spec);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_NE((*gpu)->Label().find("rvq-cuda"), std::string::npos);
  spec.name = "rvq";
  auto cpu = CreateCodec(spec);
  ASSERT_TRUE(cpu.ok());

  const KvShape s{2, 16, 4, 128};
  const Blocks blocks = MakeBlocks(s, 4, 40);
  std::vector<std::string> p_gpu, p_batch, p_cpu;
  ASSERT_TRUE((*gpu)->Encode(blocks.views, &p_gpu).ok());
  ASSERT_TRUE(EncodeBatch(**gpu, blocks.views, &p_batch).ok());
  ASSERT_TRUE((*cpu)->Encode(blocks.views, &p_cpu).ok());
  ASSERT_EQ(p_gpu.size(), 4u);
  size_t differing = 0;
  for (size_t i = 0; i < p_gpu.size(); ++i) {
    EXPECT_EQ(p_gpu[i], p_batch[i]) << "Encode and EncodeBatch differ, block " << i;
    ASSERT_EQ(p_gpu[i].size(), p_cpu[i].size());
    EXPECT_EQ(p_gpu[i].substr(0, sizeof(PayloadHeader)), p_cpu[i].substr(0, sizeof(PayloadHeader)));
    for (size_t j = 0; j < p_gpu[i].size(); ++j) differing += p_gpu[i][j] != p_cpu[i][j];
  }
  std::printf("[rvq interop] payload bytes differing from the CPU encoder: %zu of %zu\n", differing,
              p_gpu.size() * p_gpu[0].size());

  // Each payload decodes identically on both sides (fp32 tables on the GPU path).
  const size_t n = size_t(s.elements());
  for (const auto* payloads : {&p_gpu, &p_cpu}) {
    std::vector<std::vector<float>> a(payloads->size(), std::vector<float>(n)),
        b(payloads->size(), std::vector<float>(n)), c(payloads->size(), std::vector<float>(n));
    std::vector<void*> pa, pb, pc;
    std::vector<size_t> sizes(payloads->size(), n * 4);
    for (size_t i = 0; i < payloads->size(); ++i) {
      pa.push_back(a[i].data());
      pb.push_back(b[i].data());
      pc.push_back(c[i].data());
    }
    const auto views = Views(*payloads);
    ASSERT_TRUE((*cpu)->Decode(views, DType::kF32, pa, sizes).ok());
    ASSERT_TRUE((*gpu)->Decode(views, DType::kF32, pb, sizes).ok());
    ASSERT_TRUE(DecodeBatch(**gpu, views, DType::kF32, pc, sizes).ok());
    for (size_t i = 0; i < payloads->size(); ++i) {
      EXPECT_EQ(a[i], b[i]) << "Decode differs from the CPU, block " << i;
      EXPECT_EQ(a[i], c[i]) << "DecodeBatch differs from the CPU, block " << i;
    }
  }
  // Reconstruction quality of both encoders is the same.
  for (int i = 0; i < 4; ++i) {
    std::vector<float> x(n);
    ToFloat(DType::kF16, blocks.data[i].data(), n, x.data());
    auto dg = (*cpu)->DecodeToFloat(p_gpu[i]);
    auto dc = (*cpu)->DecodeToFloat(p_cpu[i]);
    ASSERT_TRUE(dg.ok() && dc.ok());
    const double eg = Nmse(x.data(), dg->data(), n), ec = Nmse(x.data(), dc->data(), n);
    EXPECT_NEAR(eg, ec, 0.01 * ec) << "block " << i;
  }
}

// A codebook with a code space (keys before RoPE, channel scales) is served by the CPU codec
// under the rvq-cuda name: payloads and decodes equal the CPU codec's, blocks at any position.
TEST(CudaCodecs, RvqWithACodeSpaceRunsTheCpuCodec) {
  VQKV_REQUIRE_GPU();
  ASSERT_TRUE(RegisterCudaCodecs());
  const RvqConfig cfg = RvqConfig::Uniform(2, 4, 64, {4, 256}, {2, 256});
  const Codebook plain = RandomCodebook(cfg, 9);
  CodeSpace cs;
  for (int i = 0; i < 32; ++i) cs.key_rope_inv_freq.push_back(std::pow(10000.f, -i / 32.f));
  cs.scale.assign(4, std::vector<float>(4 * 64, 1.5f));
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < 2; ++l) {
    for (int c = 0; c < 2; ++c) {
      const float* t = plain.Table(l, c, 0, 0);
      tables.emplace_back(t, t + size_t(cfg.at(l, c).stages) * 256 * 64);
    }
  }
  auto cb = Codebook::Create(cfg, std::move(tables), cs);
  ASSERT_TRUE(cb.ok()) << cb.status();
  CodecSpec spec;
  spec.name = "rvq-cuda";
  spec.codebook = std::make_shared<const Codebook>(*std::move(cb));
  auto gpu = CreateCodec(spec);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  spec.name = "rvq";
  auto cpu = CreateCodec(spec);
  ASSERT_TRUE(cpu.ok());
  const Blocks blocks = MakeBlocks({2, 16, 4, 64}, 3, 70);
  std::vector<std::string> p_gpu, p_cpu;
  ASSERT_TRUE(EncodeBatch(**gpu, blocks.views, &p_gpu).ok());
  ASSERT_TRUE((*cpu)->Encode(blocks.views, &p_cpu).ok());
  ASSERT_EQ(p_gpu, p_cpu);
  for (const std::string& p : p_gpu) {
    auto a = (*gpu)->DecodeToFloat(p);
    auto b = (*cpu)->DecodeToFloat(p);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b);
  }
}

TEST(CudaCodecs, RvqErrorContract) {
  VQKV_REQUIRE_GPU();
  RegisterCudaCodecs();
  const RvqConfig cfg = RvqConfig::Uniform(1, 2, 64, {2, 64}, {2, 64});
  auto cb = std::make_shared<Codebook>(RandomCodebook(cfg, 1));
  auto other = std::make_shared<Codebook>(RandomCodebook(cfg, 2));
  CodecSpec spec;
  spec.name = "rvq-cuda";
  spec.codebook = cb;
  auto gpu = CreateCodec(spec);
  ASSERT_TRUE(gpu.ok());
  spec.codebook = other;
  auto gpu_other = CreateCodec(spec);
  ASSERT_TRUE(gpu_other.ok());

  const KvShape s{1, 8, 2, 64};
  Blocks blocks = MakeBlocks(s, 1, 3);
  std::vector<std::string> out;
  blocks.data[0][s.Offset(0, 1, 6, 1) + 2] = 0x7E00;  // fp16 NaN in a coded token
  EXPECT_TRUE(absl::IsInvalidArgument((*gpu)->Encode(blocks.views, &out)));
  EXPECT_TRUE(absl::IsInvalidArgument(EncodeBatch(**gpu, blocks.views, &out)));
  blocks = MakeBlocks(s, 1, 3);
  blocks.data[0][s.Offset(0, 0, 1, 0)] = 0x7C00;  // +Inf in a sink token
  EXPECT_TRUE(absl::IsInvalidArgument(EncodeBatch(**gpu, blocks.views, &out)));
  EXPECT_TRUE(out.empty()) << "nothing is appended on error";

  blocks = MakeBlocks(s, 1, 3);
  ASSERT_TRUE(EncodeBatch(**gpu, blocks.views, &out).ok());
  std::vector<float> x(size_t(s.elements()));
  void* ptr = x.data();
  size_t bytes = x.size() * 4;
  std::string_view p = out[0];
  EXPECT_TRUE(absl::IsFailedPrecondition(
      DecodeBatch(**gpu_other, {&p, 1}, DType::kF32, {&ptr, 1}, {&bytes, 1})));
  EXPECT_TRUE(absl::IsFailedPrecondition(
      (*gpu_other)->Decode({&p, 1}, DType::kF32, {&ptr, 1}, {&bytes, 1})));
  std::string_view cut = p.substr(0, p.size() - 1);
  EXPECT_TRUE(
      absl::IsInvalidArgument(DecodeBatch(**gpu, {&cut, 1}, DType::kF32, {&ptr, 1}, {&bytes, 1})));
  size_t small = bytes - 4;
  EXPECT_TRUE(
      absl::IsInvalidArgument(DecodeBatch(**gpu, {&p, 1}, DType::kF32, {&ptr, 1}, {&small, 1})));
  CodecSpec sspec;
  sspec.name = "scalar";
  auto scalar = CreateCodec(sspec);
  std::vector<std::string> sp;
  ASSERT_TRUE((*scalar)->Encode(blocks.views, &sp).ok());
  std::string_view sv = sp[0];
  EXPECT_TRUE(
      absl::IsInvalidArgument(DecodeBatch(**gpu, {&sv, 1}, DType::kF32, {&ptr, 1}, {&bytes, 1})));
  // A CPU codec handed to EncodeBatch runs its own (batched) encode.
  std::vector<std::string> via_batch;
  ASSERT_TRUE(EncodeBatch(**scalar, blocks.views, &via_batch).ok());
  EXPECT_EQ(via_batch, sp);

  // Beam search stays on the CPU.
  spec.codebook = cb;
  spec.beam = 4;
  auto beam = CreateCodec(spec);
  ASSERT_TRUE(beam.ok());
  EXPECT_EQ((*beam)->Label().find("rvq-cuda"), std::string::npos);
  // So do outlier tokens, with the CPU codec's payloads through the batch path.
  spec.beam = 1;
  spec.outliers = 1;
  auto with_outliers = CreateCodec(spec);
  ASSERT_TRUE(with_outliers.ok());
  EXPECT_NE((*with_outliers)->Label().find("+outliers1"), std::string::npos);
  spec.name = "rvq";
  auto cpu_outliers = CreateCodec(spec);
  ASSERT_TRUE(cpu_outliers.ok());
  std::vector<std::string> o_gpu, o_cpu;
  ASSERT_TRUE(EncodeBatch(**with_outliers, blocks.views, &o_gpu).ok());
  ASSERT_TRUE((*cpu_outliers)->Encode(blocks.views, &o_cpu).ok());
  EXPECT_EQ(o_gpu, o_cpu);
}

TEST(CudaCodecs, ScalarPayloadsEqualCpu) {
  VQKV_REQUIRE_GPU();
  RegisterCudaCodecs();
  for (int bits : {2, 4}) {
    CodecSpec spec;
    spec.name = "scalar-cuda";
    spec.scalar_bits = bits;
    auto gpu = CreateCodec(spec);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    spec.name = "scalar";
    auto cpu = CreateCodec(spec);
    const KvShape s{2, 20, 4, 128};
    const Blocks blocks = MakeBlocks(s, 3, 70);
    std::vector<std::string> pg, pb, pc;
    ASSERT_TRUE((*gpu)->Encode(blocks.views, &pg).ok());
    ASSERT_TRUE(EncodeBatch(**gpu, blocks.views, &pb).ok());
    ASSERT_TRUE((*cpu)->Encode(blocks.views, &pc).ok());
    EXPECT_EQ(pg, pc);
    EXPECT_EQ(pb, pc);
    const size_t n = size_t(s.elements());
    for (size_t i = 0; i < pc.size(); ++i) {
      std::vector<uint16_t> a(n), b(n), c(n);
      void* pa = a.data();
      void* pbp = b.data();
      void* pcp = c.data();
      size_t bytes = n * 2;
      std::string_view v = pc[i];
      ASSERT_TRUE((*cpu)->Decode({&v, 1}, DType::kBF16, {&pa, 1}, {&bytes, 1}).ok());
      ASSERT_TRUE((*gpu)->Decode({&v, 1}, DType::kBF16, {&pbp, 1}, {&bytes, 1}).ok());
      ASSERT_TRUE(DecodeBatch(**gpu, {&v, 1}, DType::kBF16, {&pcp, 1}, {&bytes, 1}).ok());
      EXPECT_EQ(a, b);
      EXPECT_EQ(a, c);
    }
  }
}

}  // namespace
}  // namespace vqkv::kernels::cuda
