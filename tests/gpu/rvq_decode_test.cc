// GPU rvq decode into every supported KV layout (contiguous, vLLM paged, SGLang per-layer,
// TensorRT-LLM pool), in fp16/bf16/fp32, from fp32 and fp16 tables, against the CPU decode of
// the same payloads. Every destination starts poisoned: each element the decode should write
// must hold the reference value, every other element must keep the poison, and the guard
// bands around each buffer must be intact.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/codec.h"
#include "kernels/cuda/device_codebook.h"
#include "kernels/cuda/gpu_rvq.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels::cuda {
namespace {

namespace testing_data = ::vqkv::kernels::testing;
using gputest::GuardedBuffer;
using gputest::RandomCodebook;

struct BlockSpec {
  int tokens, sinks, first_layer, layers;
};

struct LayoutCase {
  KvLayoutKind kind;
  DType out;
  bool fp16_tables;
  int dim;
};

std::string Name(const ::testing::TestParamInfo<LayoutCase>& i) {
  const char* k[] = {"contiguous", "vllm", "sglang", "trtllm"};
  return std::string(k[int(i.param.kind)]) + "_" + std::string(DTypeName(i.param.out)) +
         (i.param.fp16_tables ? "_f16tab" : "_f32tab") + "_d" + std::to_string(i.param.dim);
}

class RvqDecodeLayoutTest : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(RvqDecodeLayoutTest, WritesExactlyTheReferenceRows) {
  VQKV_REQUIRE_GPU();
  const LayoutCase& lc = GetParam();
  const int L = 3, H = 4, D = lc.dim, page_tokens = 16, num_pages = 12;
  const RvqConfig cfg = RvqConfig::Uniform(L, H, D, {4, 256}, {2, 64});
  auto cb = std::make_shared<Codebook>(RandomCodebook(cfg, 21));
  auto dcb = DeviceCodebook::Create(cb);
  ASSERT_TRUE(dcb.ok()) << dcb.status();
  CodecSpec spec;
  spec.name = "rvq";
  spec.sink_tokens = 4;
  spec.codebook = cb;
  auto cpu = CreateCodec(spec);
  ASSERT_TRUE(cpu.ok());

  const std::vector<BlockSpec> bs = {
      {16, 4, 0, 3}, {16, 0, 0, 3}, {9, 0, 0, 3}, {16, 0, 1, 2}, {1, 0, 0, 3}};
  const int nb = int(bs.size());
  std::mt19937 rng(5);
  std::vector<int> pages(num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  int total_tokens = 0;
  for (const BlockSpec& b : bs) total_tokens += b.tokens;
  const int num_slots = total_tokens + 7;
  std::vector<int64_t> slots(num_slots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(total_tokens);

  // CPU payloads and reference decodes (fp16 input).
  std::vector<std::string> payloads;
  std::vector<std::vector<float>> ref;
  for (int b = 0; b < nb; ++b) {
    const KvShape s{bs[b].layers, bs[b].tokens, H, D};
    const std::vector<float> xf = testing_data::RandomKv(s, 300 + b);
    std::vector<uint16_t> xh(xf.size());
    FromFloat(xf.data(), xf.size(), DType::kF16, xh.data());
    KvBlockView v{s, DType::kF16, xh.data(), bs[b].sinks > 0 ? 0 : 100, bs[b].first_layer};
    ASSERT_TRUE((*cpu)->Encode({&v, 1}, &payloads).ok());
    auto dec = (*cpu)->DecodeToFloat(payloads.back());
    ASSERT_TRUE(dec.ok()) << dec.status();
    ref.push_back(*dec);
  }

  // Upload bodies and sinks.
  std::vector<std::unique_ptr<GuardedBuffer>> bodies, sinks;
  std::vector<DeviceRvqBody> dev(nb);
  int64_t slot_base = 0;
  for (int b = 0; b < nb; ++b) {
    const KvShape s{bs[b].layers, bs[b].tokens, H, D};
    const size_t sink_bytes = size_t(s.layers) * 2 * bs[b].sinks * H * D * 2;
    const std::string_view p(payloads[b]);
    const std::string_view body = p.substr(sizeof(PayloadHeader) + sink_bytes);
    bodies.push_back(std::make_unique<GuardedBuffer>((body.size() + 3) & ~size_t{3}));
    bodies.back()->Poison(0);
    bodies.back()->Upload(body.data(), body.size());
    sinks.push_back(std::make_unique<GuardedBuffer>(std::max<size_t>(sink_bytes, 4)));
    sinks.back()->Upload(p.data() + sizeof(PayloadHeader), sink_bytes);
    dev[b].shape = s;
    dev[b].sinks = bs[b].sinks;
    dev[b].body = bodies.back()->as<uint8_t>();
    dev[b].sink_data = bs[b].sinks > 0 ? sinks.back()->get() : nullptr;
    dev[b].sink_dtype = DType::kF16;
    dev[b].block_id = pages[b];
    dev[b].slot_base = slot_base;
    dev[b].first_layer = bs[b].first_layer;
    slot_base += bs[b].tokens;
  }

  // Destination and the host mirror of its addressing.
  const size_t es = DTypeSize(lc.out);
  int64_t elems = 0;
  std::vector<int64_t> block_off(nb, 0);
  switch (lc.kind) {
    case KvLayoutKind::kContiguous:
      for (int b = 0; b < nb; ++b) {
        block_off[b] = elems;
        const int64_t n = int64_t(bs[b].layers) * 2 * bs[b].tokens * H * D;
        elems += (n * int64_t(es) + 255) / 256 * 256 / int64_t(es);
      }
      break;
    case KvLayoutKind::kVllm:
      elems = int64_t(L) * 2 * num_pages * page_tokens * H * D;
      break;
    case KvLayoutKind::kSglang:
      elems = int64_t(L) * 2 * num_slots * H * D;
      break;
    case KvLayoutKind::kTrtllm:
      elems = int64_t(num_pages) * L * 2 * H * page_tokens * D;
      break;
  }
  auto index = [&](int b, int l, int c, int t, int h) -> int64_t {
    const int ml = bs[b].first_layer + l;
    switch (lc.kind) {
      case KvLayoutKind::kContiguous:
        return block_off[b] + (((int64_t(l) * 2 + c) * bs[b].tokens + t) * H + h) * D;
      case KvLayoutKind::kVllm:
        return int64_t(ml) * 2 * num_pages * page_tokens * H * D +
               ((int64_t(c) * num_pages + pages[b]) * page_tokens + t) * H * D + int64_t(h) * D;
      case KvLayoutKind::kSglang:
        return (int64_t(ml) * 2 + c) * num_slots * H * D +
               (slots[dev[b].slot_base + t] * H + h) * D;
      case KvLayoutKind::kTrtllm:
        return ((((int64_t(pages[b]) * L + ml) * 2 + c) * H + h) * page_tokens + t) * D;
    }
    return 0;
  };
  GuardedBuffer dst(size_t(elems) * es);
  ASSERT_TRUE(dst.ok());
  GuardedBuffer dslots(slots.size() * 8);
  dslots.Upload(slots.data(), slots.size() * 8);
  KvLayout layout;
  layout.kind = lc.kind;
  layout.dtype = lc.out;
  char* base = dst.as<char>();
  if (lc.kind == KvLayoutKind::kContiguous) {
    for (int b = 0; b < nb; ++b) dev[b].out = base + block_off[b] * es;
  } else if (lc.kind == KvLayoutKind::kVllm) {
    for (int l = 0; l < L; ++l) {
      layout.layer_ptrs.push_back(base + size_t(l) * 2 * num_pages * page_tokens * H * D * es);
    }
  } else if (lc.kind == KvLayoutKind::kSglang) {
    for (int l = 0; l < L; ++l) {
      layout.layer_ptrs.push_back(base + (size_t(l) * 2 + 0) * num_slots * H * D * es);
      layout.layer_ptrs2.push_back(base + (size_t(l) * 2 + 1) * num_slots * H * D * es);
    }
    layout.slots = dslots.as<int64_t>();
  } else {
    layout.pool = base;
  }
  layout.num_pages = num_pages;
  layout.page_tokens = page_tokens;

  GpuRvqOptions opts;
  opts.fp16_decode_tables = lc.fp16_tables;
  const absl::Status st = RvqDecode(**dcb, dev, layout, nullptr, opts);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dst.GuardDamage(), 0u);
  for (auto& b : bodies) EXPECT_EQ(b->GuardDamage(), 0u);

  const std::vector<uint8_t> raw = dst.Download<uint8_t>();
  std::vector<float> got(static_cast<size_t>(elems));
  ToFloat(lc.out, raw.data(), got.size(), got.data());
  std::vector<char> written(size_t(elems), 0);
  std::vector<float> r32, cpu_out, gpu_out;  // fp32 reference, its rounding to `out`, the GPU's
  int64_t mismatched = 0;
  std::vector<uint8_t> want_bits(es);
  for (int b = 0; b < nb; ++b) {
    const KvShape s{bs[b].layers, bs[b].tokens, H, D};
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        for (int t = 0; t < s.tokens; ++t) {
          for (int h = 0; h < H; ++h) {
            const int64_t at = index(b, l, c, t, h);
            const float* r = ref[b].data() + s.Offset(l, c, t, h);
            for (int d = 0; d < D; ++d) {
              ASSERT_FALSE(written[at + d]) << "two rows map to one element";
              written[at + d] = 1;
              FromFloat(r + d, 1, lc.out, want_bits.data());
              const bool same = std::memcmp(want_bits.data(), raw.data() + (at + d) * es, es) == 0;
              float wf;
              ToFloat(lc.out, want_bits.data(), 1, &wf);
              r32.push_back(r[d]);
              cpu_out.push_back(wf);
              gpu_out.push_back(got[at + d]);
              if (!same) ++mismatched;
            }
          }
        }
      }
    }
  }
  int64_t stray = 0;
  for (int64_t i = 0; i < elems; ++i) {
    if (written[i]) continue;
    for (size_t k = 0; k < es; ++k) stray += raw[i * es + k] != 0xFF;
  }
  // The CPU decode rounded to `out` has its own error against fp32; fp16 tables may add at most
  // 1e-6 on top of it (bf16 outputs then flip some roundings, fp32/fp16 outputs see ~1e-7).
  const double nmse_cpu = gputest::Nmse(r32.data(), cpu_out.data(), r32.size());
  const double nmse_gpu = gputest::Nmse(r32.data(), gpu_out.data(), r32.size());
  std::printf("[%s] written=%zu mismatched=%lld nmse vs fp32: gpu=%.3g cpu=%.3g stray_bytes=%lld\n",
              Name({lc, 0}).c_str(), r32.size(), (long long)mismatched, nmse_gpu, nmse_cpu,
              (long long)stray);
  EXPECT_EQ(stray, 0) << "bytes outside the decoded rows changed";
  EXPECT_LE(nmse_gpu, nmse_cpu + 1e-6);
  if (!lc.fp16_tables) {
    EXPECT_EQ(mismatched, 0) << "fp32 tables must reproduce the CPU exactly";
  }
}

std::vector<LayoutCase> AllLayouts() {
  std::vector<LayoutCase> v;
  for (KvLayoutKind k : {KvLayoutKind::kContiguous, KvLayoutKind::kVllm, KvLayoutKind::kSglang,
                         KvLayoutKind::kTrtllm}) {
    for (DType t : {DType::kF16, DType::kBF16, DType::kF32}) {
      for (bool f16 : {true, false}) v.push_back({k, t, f16, 128});
    }
  }
  v.push_back({KvLayoutKind::kVllm, DType::kF16, true, 64});
  v.push_back({KvLayoutKind::kTrtllm, DType::kBF16, true, 96});
  v.push_back({KvLayoutKind::kSglang, DType::kF16, false, 256});
  v.push_back({KvLayoutKind::kContiguous, DType::kF32, false, 80});  // generic kernel
  return v;
}

INSTANTIATE_TEST_SUITE_P(Layouts, RvqDecodeLayoutTest, ::testing::ValuesIn(AllLayouts()), Name);

TEST(RvqDecodeErrors, RejectsBadLayouts) {
  VQKV_REQUIRE_GPU();
  const RvqConfig cfg = RvqConfig::Uniform(2, 2, 64, {2, 64}, {2, 64});
  auto cb = std::make_shared<Codebook>(RandomCodebook(cfg, 3));
  auto dcb = DeviceCodebook::Create(cb);
  ASSERT_TRUE(dcb.ok());
  GuardedBuffer body(1024), out(1 << 16);
  DeviceRvqBody in;
  in.shape = {2, 4, 2, 64};
  in.body = body.as<uint8_t>();
  in.out = out.get();
  KvLayout layout;
  EXPECT_TRUE(RvqDecode(**dcb, {&in, 1}, layout, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  in.out = out.as<char>() + 2;  // misaligned
  EXPECT_TRUE(absl::IsInvalidArgument(RvqDecode(**dcb, {&in, 1}, layout, nullptr)));
  in.out = out.get();
  layout.kind = KvLayoutKind::kVllm;  // no layer pointers
  EXPECT_TRUE(absl::IsInvalidArgument(RvqDecode(**dcb, {&in, 1}, layout, nullptr)));
  layout.layer_ptrs = {out.get(), out.get()};
  layout.num_pages = 4;
  layout.page_tokens = 4;
  in.block_id = 4;  // out of range
  EXPECT_TRUE(absl::IsInvalidArgument(RvqDecode(**dcb, {&in, 1}, layout, nullptr)));
  in.block_id = 0;
  layout.page_tokens = 3;  // block does not fit a page
  EXPECT_TRUE(absl::IsInvalidArgument(RvqDecode(**dcb, {&in, 1}, layout, nullptr)));
}

}  // namespace
}  // namespace vqkv::kernels::cuda
