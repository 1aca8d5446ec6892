// GPU rvq encode against the CPU rvq codec: codes equal except near-ties (counted and bounded),
// packed bodies equal to the CPU bit stream of the same codes, decoded output equal to the CPU
// decode of the same codes (NMSE <= 1e-6), over many shapes, dtypes and codebook sizes.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/bitpack.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/cuda/device_codebook.h"
#include "kernels/cuda/gpu_rvq.h"
#include "kernels/rvq_fit.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/test_data.h"

namespace vqkv::kernels::cuda {
namespace {

namespace testing_data = ::vqkv::kernels::testing;
using gputest::GuardedBuffer;
using gputest::Nmse;
using gputest::RandomCodebook;

struct EncCase {
  const char* name;
  int dim, heads, layers, tokens, sinks;
  StageConfig k, v;
  bool per_head = false;
  DType dtype = DType::kF16;
  int model_layers = 0;  // 0: == layers
  int first_layer = 0;
  bool tensor_cores = true;
  bool fitted = false;  // CPU-fitted codebook instead of a random one
  uint32_t seed = 1;
  int variant = 0;  // encode tile configuration
};

struct CodeStats {
  int64_t vectors = 0, exact = 0, near_ties = 0, far = 0;
  double worst_gap = 0;  // (d_gpu - d_cpu) / |r|^2 at the first differing stage
};

// Data in `dtype`, and its fp32 values (what both encoders see).
struct Data {
  std::vector<uint16_t> half;
  std::vector<float> f;
  const void* ptr(DType t) const {
    return t == DType::kF32 ? static_cast<const void*>(f.data()) : half.data();
  }
};

Data MakeData(const KvShape& s, DType t, uint32_t seed) {
  Data d;
  d.f = testing_data::RandomKv(s, seed);
  if (t != DType::kF32) {
    d.half.resize(d.f.size());
    FromFloat(d.f.data(), d.f.size(), t, d.half.data());
    ToFloat(t, d.half.data(), d.f.size(), d.f.data());
  }
  return d;
}

std::vector<uint32_t> Unpack(std::string_view body, const RvqConfig& cfg, int first_layer,
                             int layers, int t1) {
  std::vector<uint32_t> out;
  BitReader rd(body);
  for (int l = 0; l < layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const StageConfig& sc = cfg.at(first_layer + l, c);
      const int64_t n = int64_t(t1) * cfg.kv_heads * sc.stages;
      for (int64_t i = 0; i < n; ++i) out.push_back(rd.Get(sc.bits()));
    }
  }
  return out;
}

CodeStats Compare(const Codebook& cb, const KvShape& s, int sinks, int first_layer,
                  const std::vector<float>& x, const std::vector<uint32_t>& cpu,
                  const std::vector<uint32_t>& gpu, double tol) {
  CodeStats st;
  const RvqConfig& cfg = cb.config();
  const int t1 = s.tokens - sinks, H = s.kv_heads, D = s.head_dim;
  size_t at = 0;
  std::vector<float> r(D);
  for (int l = 0; l < s.layers; ++l) {
    const int ml = first_layer + l;
    for (int c = 0; c < 2; ++c) {
      const int stages = cfg.at(ml, c).stages;
      for (int t = 0; t < t1; ++t) {
        for (int h = 0; h < H; ++h, at += stages) {
          ++st.vectors;
          int i = 0;
          while (i < stages && cpu[at + i] == gpu[at + i]) ++i;
          if (i == stages) {
            ++st.exact;
            continue;
          }
          // Residual before stage i (both encoders agree up to there).
          const float* xv = x.data() + s.Offset(l, c, sinks + t, h);
          std::copy(xv, xv + D, r.begin());
          const int g = cfg.per_head ? h : 0;
          for (int j = 0; j < i; ++j) {
            const float* cw = cb.Table(ml, c, g, j) + int64_t(cpu[at + j]) * D;
            for (int d = 0; d < D; ++d) r[d] -= cw[d];
          }
          double rr = 0, dc = 0, dg = 0;
          const float* cc = cb.Table(ml, c, g, i) + int64_t(cpu[at + i]) * D;
          const float* cg = cb.Table(ml, c, g, i) + int64_t(gpu[at + i]) * D;
          for (int d = 0; d < D; ++d) {
            rr += double(r[d]) * r[d];
            dc += (double(r[d]) - cc[d]) * (double(r[d]) - cc[d]);
            dg += (double(r[d]) - cg[d]) * (double(r[d]) - cg[d]);
          }
          const double gap = std::abs(dg - dc) / std::max(rr, 1e-30);
          st.worst_gap = std::max(st.worst_gap, gap);
          if (gap <= tol) {
            ++st.near_ties;
          } else {
            ++st.far;
          }
        }
      }
    }
  }
  return st;
}

// A CPU fit of cfg on 512 tokens of random KV (seed + 100), 4 iterations.
absl::StatusOr<Codebook> FitOnRandomKv(const RvqConfig& cfg, uint32_t seed) {
  const KvShape fs{cfg.layers, 512, cfg.kv_heads, cfg.head_dim};
  const std::vector<float> fx = testing_data::RandomKv(fs, seed + 100);
  FitOptions fo;
  fo.iterations = 4;
  return FitCodebook(cfg, testing_data::SamplesFrom(fs, fx), fo);
}

class RvqEncodeTest : public ::testing::TestWithParam<EncCase> {};

TEST_P(RvqEncodeTest, MatchesCpuCodec) {
  VQKV_REQUIRE_GPU();
  const EncCase& tc = GetParam();
  const int model_layers = tc.model_layers > 0 ? tc.model_layers : tc.layers;
  RvqConfig cfg = RvqConfig::Uniform(model_layers, tc.heads, tc.dim, tc.k, tc.v, tc.per_head);
  std::shared_ptr<const Codebook> cb;
  if (tc.fitted) {
    auto fit = FitOnRandomKv(cfg, tc.seed);
    ASSERT_TRUE(fit.ok()) << fit.status();
    cb = std::make_shared<Codebook>(*std::move(fit));
  } else {
    cb = std::make_shared<Codebook>(RandomCodebook(cfg, tc.seed));
  }
  auto dcb = DeviceCodebook::Create(cb);
  ASSERT_TRUE(dcb.ok()) << dcb.status();

  const KvShape s{tc.layers, tc.tokens, tc.heads, tc.dim};
  const Data data = MakeData(s, tc.dtype, tc.seed + 7);
  const int t1 = s.tokens - tc.sinks;

  // CPU reference payload.
  CodecSpec spec;
  spec.name = "rvq";
  spec.sink_tokens = tc.sinks;
  spec.codebook = cb;
  auto cpu_codec = CreateCodec(spec);
  ASSERT_TRUE(cpu_codec.ok()) << cpu_codec.status();
  KvBlockView view{s, tc.dtype, data.ptr(tc.dtype), 0, tc.first_layer};
  std::vector<std::string> cpu_payloads;
  ASSERT_TRUE((*cpu_codec)->Encode({&view, 1}, &cpu_payloads).ok());
  const std::string& cpu_payload = cpu_payloads[0];
  auto hdr = ReadPayloadHeader(cpu_payload);
  ASSERT_TRUE(hdr.ok());
  ASSERT_EQ(hdr->sink_tokens, tc.sinks);
  const size_t sink_bytes =
      size_t(s.layers) * 2 * tc.sinks * s.kv_heads * s.head_dim * DTypeSize(tc.dtype);
  const std::string_view cpu_body =
      std::string_view(cpu_payload).substr(sizeof(PayloadHeader) + sink_bytes);
  const std::vector<uint32_t> cpu_codes = Unpack(cpu_body, cfg, tc.first_layer, s.layers, t1);

  // GPU encode into guarded code and body buffers.
  const size_t in_bytes = size_t(s.elements()) * DTypeSize(tc.dtype);
  GuardedBuffer din(in_bytes);
  ASSERT_TRUE(din.ok());
  din.Upload(data.ptr(tc.dtype), in_bytes);
  const int64_t ncodes = int64_t(t1) * RvqCodesPerToken(cfg, tc.first_layer, s.layers);
  ASSERT_EQ(size_t(ncodes), cpu_codes.size());
  GuardedBuffer dcodes(size_t(std::max<int64_t>(ncodes, 1)) * 2);
  const int64_t body_bytes = RvqBodyBytes(cfg, s, tc.sinks, tc.first_layer);
  ASSERT_EQ(size_t(body_bytes), cpu_body.size());
  GuardedBuffer dbody((size_t(body_bytes) + 3) & ~size_t{3});
  const DeviceKvBlock blk{s, tc.dtype, din.get(), tc.sinks, tc.first_layer};
  GpuRvqOptions opts;
  opts.tensor_cores = tc.tensor_cores;
  opts.encode_variant = tc.variant;
  ASSERT_TRUE(RvqEncodeCodes(**dcb, {&blk, 1}, dcodes.as<uint16_t>(), nullptr, opts).ok());
  uint8_t* bodies[1] = {dbody.as<uint8_t>()};
  ASSERT_TRUE(RvqPackCodes(**dcb, {&blk, 1}, dcodes.as<uint16_t>(), bodies, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dcodes.GuardDamage(), 0u);
  EXPECT_EQ(dbody.GuardDamage(), 0u);
  EXPECT_EQ(din.GuardDamage(), 0u);

  const std::vector<uint16_t> gcodes16 = dcodes.Download<uint16_t>();
  std::vector<uint32_t> gpu_codes(gcodes16.begin(), gcodes16.begin() + ncodes);
  for (int64_t i = 0; i < ncodes; ++i) {
    ASSERT_NE(gcodes16[i], 0xFFFF) << "code " << i << " never written";
  }

  // 1) codes: equal except near-ties.
  const double tol = tc.tensor_cores ? 2e-3 : 1e-5;
  const CodeStats st = Compare(*cb, s, tc.sinks, tc.first_layer, data.f, cpu_codes, gpu_codes, tol);
  std::printf("[%s] vectors=%lld exact=%lld near_ties=%lld far=%lld worst_gap=%.3g\n", tc.name,
              (long long)st.vectors, (long long)st.exact, (long long)st.near_ties,
              (long long)st.far, st.worst_gap);
  EXPECT_EQ(st.far, 0) << "codes that are not near-ties";
  EXPECT_LE(st.near_ties, std::max<int64_t>(2, st.vectors * 3 / 100));

  // 2) the packed body is the CPU bit stream of the GPU's codes.
  std::vector<uint8_t> gbody = dbody.Download<uint8_t>();
  const std::string gpu_body(reinterpret_cast<const char*>(gbody.data()), size_t(body_bytes));
  EXPECT_EQ(Unpack(gpu_body, cfg, tc.first_layer, s.layers, t1), gpu_codes);
  if (st.exact == st.vectors) {
    EXPECT_EQ(gpu_body, std::string(cpu_body));
  }
  {
    std::string ref;
    BitWriter w(&ref);
    int64_t at = 0;
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        const StageConfig& sc = cfg.at(tc.first_layer + l, c);
        const int64_t n = int64_t(t1) * cfg.kv_heads * sc.stages;
        for (int64_t i = 0; i < n; ++i) w.Put(gpu_codes[at++], sc.bits());
      }
    }
    w.Flush();
    EXPECT_EQ(gpu_body, ref) << "pack differs from BitWriter (padding bits included)";
  }

  // 3) decode of the GPU body: equal to the CPU decode of the same payload.
  std::string mixed = cpu_payload.substr(0, sizeof(PayloadHeader) + sink_bytes) + gpu_body;
  auto cpu_dec = (*cpu_codec)->DecodeToFloat(mixed);
  ASSERT_TRUE(cpu_dec.ok()) << cpu_dec.status();
  for (bool fp16_tables : {false, true}) {
    GuardedBuffer dout(size_t(s.elements()) * 4);
    DeviceRvqBody in;
    in.shape = s;
    in.sinks = tc.sinks;
    in.body = dbody.as<uint8_t>();
    in.out = dout.get();
    in.first_layer = tc.first_layer;
    KvLayout layout;
    layout.dtype = DType::kF32;
    GpuRvqOptions dopts;
    dopts.fp16_decode_tables = fp16_tables;
    ASSERT_TRUE(RvqDecode(**dcb, {&in, 1}, layout, nullptr, dopts).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(dout.GuardDamage(), 0u);
    const std::vector<float> got = dout.Download<float>();
    // Non-sink rows only (the sink rows were not asked for and stay poisoned).
    std::vector<float> a, b;
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        const int64_t o = s.Offset(l, c, tc.sinks, 0);
        const int64_t n = int64_t(t1) * s.kv_heads * s.head_dim;
        a.insert(a.end(), cpu_dec->begin() + o, cpu_dec->begin() + o + n);
        b.insert(b.end(), got.begin() + o, got.begin() + o + n);
      }
    }
    const double nmse = Nmse(a.data(), b.data(), a.size());
    std::printf("[%s] decode nmse (fp16 tables=%d) = %.3g\n", tc.name, int(fp16_tables), nmse);
    EXPECT_LE(nmse, fp16_tables ? 1e-6 : 1e-12);
    if (!fp16_tables) {
      EXPECT_EQ(a, b) << "fp32-table decode is the CPU's sum, bit for bit";
    }
  }
}

const EncCase kCases[] = {
    {"llama_like_d128", 128, 8, 2, 64, 4, {8, 1024}, {4, 512}},
    {"one_token", 128, 8, 1, 1, 0, {4, 256}, {2, 16}},
    {"d64_bf16", 64, 3, 2, 37, 4, {6, 128}, {3, 64}, false, DType::kBF16},
    {"d96_f32", 96, 2, 2, 50, 0, {5, 256}, {3, 32}, false, DType::kF32},
    {"d256", 256, 4, 1, 70, 4, {6, 512}, {2, 128}},
    {"per_head", 128, 2, 3, 33, 4, {4, 64}, {2, 16}, true},
    {"many_tiles", 128, 8, 1, 300, 0, {12, 1024}, {6, 512}},
    {"odd_dim_exact", 80, 2, 1, 20, 4, {3, 32}, {2, 16}, false, DType::kF32},
    {"layer_range", 64, 2, 2, 20, 3, {3, 128}, {2, 32}, false, DType::kF16, 5, 2},
    {"exact_kernel", 128, 8, 1, 40, 4, {4, 256}, {2, 64}, false, DType::kF16, 0, 0, false},
    {"tiny_codebooks", 64, 2, 1, 25, 0, {3, 2}, {2, 4}},
    {"size4096", 128, 1, 1, 64, 0, {2, 4096}, {1, 8}},
    {"all_sinks", 64, 2, 1, 3, 3, {2, 64}, {2, 64}},
    {"fitted_d128", 128, 4, 2, 96, 4, {8, 256}, {4, 128}, false, DType::kF16, 0, 0, true, true},
    {"fitted_d64_f32",
     64,
     2,
     1,
     200,
     0,
     {16, 64},
     {4, 64},
     false,
     DType::kF32,
     0,
     0,
     true,
     true,
     5},
    {"variant1", 128, 8, 2, 77, 4, {8, 1024}, {4, 64}, false, DType::kF16, 0, 0, true, false, 2, 1},
    {"variant2", 128, 8, 2, 77, 4, {8, 1024}, {4, 64}, false, DType::kF16, 0, 0, true, false, 3, 2},
    {"variant1_per_head",
     128,
     3,
     1,
     45,
     0,
     {5, 256},
     {2, 16},
     true,
     DType::kBF16,
     0,
     0,
     true,
     false,
     4,
     1},
    {"variant3",
     128,
     8,
     1,
     300,
     0,
     {12, 1024},
     {6, 512},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     6,
     3},
    // Explicit configurations: the mma.sync default tiles (what non-Hopper GPUs run by default)
    // and both wgmma tilings (variants 5/6 fall back to the default without sm_90a); shapes with
    // partial tiles, several segments per tile and deep stage counts.
    {"variant4_mma",
     128,
     8,
     2,
     77,
     4,
     {8, 1024},
     {4, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     8,
     4},
    {"variant4_d64",
     64,
     3,
     2,
     37,
     4,
     {6, 128},
     {3, 64},
     false,
     DType::kBF16,
     0,
     0,
     true,
     false,
     9,
     4},
    {"variant5",
     128,
     8,
     1,
     300,
     0,
     {12, 1024},
     {6, 512},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     10,
     5},
    {"variant5_per_head",
     128,
     3,
     1,
     45,
     0,
     {5, 256},
     {2, 16},
     true,
     DType::kBF16,
     0,
     0,
     true,
     false,
     11,
     5},
    {"variant6",
     128,
     8,
     2,
     77,
     4,
     {8, 1024},
     {4, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     12,
     6},
    {"variant6_d64_f32",
     64,
     2,
     1,
     200,
     0,
     {16, 64},
     {4, 64},
     false,
     DType::kF32,
     0,
     0,
     true,
     true,
     13,
     6},
    {"variant7",
     128,
     8,
     2,
     77,
     4,
     {8, 1024},
     {4, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     15,
     7},
    {"variant7_d64_bf16",
     64,
     3,
     2,
     37,
     4,
     {6, 128},
     {3, 64},
     false,
     DType::kBF16,
     0,
     0,
     true,
     false,
     16,
     7},
    {"variant7_tiny",
     64,
     2,
     1,
     25,
     0,
     {3, 2},
     {2, 4},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     17,
     7},
    {"variant6_size4096",
     128,
     1,
     1,
     300,
     0,
     {2, 4096},
     {1, 8},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     14,
     6},
    // The overlapped wgmma configurations (8: 128-row tiles, 9: 256-row tiles): partial tiles,
    // tiles across segments, one-chunk stages (odd chunk counts), per-head tables, size 4096.
    {"variant8",
     128,
     8,
     2,
     77,
     4,
     {8, 1024},
     {4, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     18,
     8},
    {"variant8_d64_bf16",
     64,
     3,
     2,
     37,
     4,
     {6, 128},
     {3, 64},
     false,
     DType::kBF16,
     0,
     0,
     true,
     false,
     19,
     8},
    {"variant8_tiny",
     64,
     2,
     1,
     25,
     0,
     {3, 2},
     {2, 4},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     20,
     8},
    {"variant8_per_head",
     128,
     3,
     1,
     45,
     0,
     {5, 256},
     {2, 16},
     true,
     DType::kBF16,
     0,
     0,
     true,
     false,
     21,
     8},
    {"variant9",
     128,
     8,
     1,
     300,
     0,
     {12, 1024},
     {6, 512},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     22,
     9},
    {"variant9_d64_f32",
     64,
     2,
     1,
     200,
     0,
     {16, 64},
     {4, 64},
     false,
     DType::kF32,
     0,
     0,
     true,
     true,
     23,
     9},
    {"variant9_size4096",
     128,
     1,
     1,
     300,
     0,
     {2, 4096},
     {1, 8},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     24,
     9},
    // 10 / 11: 8 / 9 with TMA chunk loads (one tensor map over the codebook's fp16 tables).
    {"variant10",
     128,
     8,
     2,
     77,
     4,
     {8, 1024},
     {4, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     25,
     10},
    {"variant10_d64_bf16",
     64,
     3,
     2,
     37,
     4,
     {6, 128},
     {3, 64},
     false,
     DType::kBF16,
     0,
     0,
     true,
     false,
     26,
     10},
    {"variant10_tiny_per_head",
     64,
     2,
     1,
     25,
     0,
     {3, 2},
     {2, 4},
     true,
     DType::kF16,
     0,
     0,
     true,
     false,
     27,
     10},
    {"variant10_layer_range",
     128,
     2,
     2,
     20,
     3,
     {3, 256},
     {2, 32},
     false,
     DType::kF16,
     5,
     2,
     true,
     false,
     28,
     10},
    {"variant11",
     128,
     8,
     1,
     300,
     0,
     {12, 1024},
     {6, 512},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     29,
     11},
    {"variant11_d64_f32",
     64,
     2,
     1,
     200,
     0,
     {16, 64},
     {4, 64},
     false,
     DType::kF32,
     0,
     0,
     true,
     true,
     30,
     11},
    // 12 / 13 (13: the default on sm_90): ping-pong warpgroups (128 / 192-row tiles, producer
    // warp, staggered starts).
    {"variant12",
     128,
     8,
     2,
     77,
     4,
     {8, 1024},
     {4, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     31,
     12},
    {"variant12_big_tiles",
     128,
     2,
     1,
     700,
     0,
     {5, 1024},
     {3, 512},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     32,
     12},
    {"variant12_d64_bf16",
     64,
     3,
     2,
     37,
     4,
     {6, 128},
     {3, 64},
     false,
     DType::kBF16,
     0,
     0,
     true,
     false,
     33,
     12},
    {"variant12_tiny_per_head",
     64,
     2,
     1,
     25,
     0,
     {3, 2},
     {2, 4},
     true,
     DType::kF16,
     0,
     0,
     true,
     false,
     34,
     12},
    {"variant12_layer_range",
     128,
     2,
     2,
     20,
     3,
     {3, 256},
     {2, 32},
     false,
     DType::kF16,
     5,
     2,
     true,
     false,
     35,
     12},
    {"variant12_d64_f32_fitted",
     64,
     2,
     1,
     200,
     0,
     {16, 64},
     {4, 64},
     false,
     DType::kF32,
     0,
     0,
     true,
     true,
     36,
     12},
    {"variant13",
     128,
     8,
     2,
     77,
     4,
     {8, 1024},
     {4, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     37,
     13},
    {"variant13_big_tiles",
     128,
     2,
     1,
     700,
     0,
     {5, 1024},
     {3, 512},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     38,
     13},
    {"variant13_d64_f32",
     64,
     2,
     1,
     200,
     0,
     {16, 64},
     {4, 64},
     false,
     DType::kF32,
     0,
     0,
     true,
     true,
     39,
     13},
    {"variant13_tiny_per_head",
     64,
     2,
     1,
     25,
     0,
     {3, 2},
     {2, 4},
     true,
     DType::kF16,
     0,
     0,
     true,
     false,
     40,
     13},
    {"variant13_size4096",
     128,
     1,
     1,
     300,
     0,
     {2, 4096},
     {1, 8},
     false,
     DType::kF16,
     0,
     0,
     true,
     false,
     41,
     13},
    {"variant13_d64_bf16",
     64,
     3,
     2,
     37,
     4,
     {6, 128},
     {3, 64},
     false,
     DType::kBF16,
     0,
     0,
     true,
     false,
     42,
     13},
    {"variant13_layer_range",
     128,
     2,
     2,
     20,
     3,
     {3, 256},
     {2, 32},
     false,
     DType::kF16,
     5,
     2,
     true,
     false,
     43,
     13},
    {"fitted_deep_d128",
     128,
     2,
     1,
     256,
     0,
     {32, 256},
     {8, 64},
     false,
     DType::kF16,
     0,
     0,
     true,
     true,
     7},
};

// The configurations that vary variant 13 (rvq_encode_sm90.cu): checked on 13's shapes and for
// 13's codes.
constexpr int kVariantsOf13[] = {14, 15, 16};

// kCases, plus variant 13's shapes for each of kVariantsOf13 (same shapes and seeds, so each has
// what 13 is checked on).
std::vector<EncCase> AllCases() {
  static const std::vector<std::string>* names = [] {
    auto* n = new std::vector<std::string>;
    for (int v : kVariantsOf13) {
      for (const EncCase& c : kCases) {
        if (c.variant == 13) n->push_back("variant" + std::to_string(v) + (c.name + 9));
      }
    }
    return n;
  }();
  std::vector<EncCase> all(std::begin(kCases), std::end(kCases));
  size_t at = 0;
  for (int v : kVariantsOf13) {
    for (const EncCase& c : kCases) {
      if (c.variant != 13) continue;
      EncCase e = c;
      e.variant = v;
      e.name = (*names)[at++].c_str();
      all.push_back(e);
    }
  }
  return all;
}

INSTANTIATE_TEST_SUITE_P(Shapes, RvqEncodeTest, ::testing::ValuesIn(AllCases()),
                         [](const ::testing::TestParamInfo<EncCase>& i) {
                           return std::string(i.param.name);
                         });

// Many blocks of different sizes, dtypes and sink counts in one call: every block's codes
// equal the codes of that block encoded alone.
TEST(RvqEncodeBatch, MixedBlocksMatchSingleBlockEncodes) {
  VQKV_REQUIRE_GPU();
  const RvqConfig cfg = RvqConfig::Uniform(3, 4, 128, {6, 256}, {3, 64});
  auto cb = std::make_shared<Codebook>(RandomCodebook(cfg, 11));
  auto dcb = DeviceCodebook::Create(cb);
  ASSERT_TRUE(dcb.ok()) << dcb.status();
  struct B {
    KvShape s;
    DType t;
    int sinks, first_layer;
  };
  const std::vector<B> spec = {
      {{3, 16, 4, 128}, DType::kF16, 4, 0}, {{3, 16, 4, 128}, DType::kF16, 0, 0},
      {{1, 7, 4, 128}, DType::kBF16, 0, 2}, {{2, 100, 4, 128}, DType::kF32, 2, 1},
      {{3, 1, 4, 128}, DType::kF16, 0, 0},  {{3, 4, 4, 128}, DType::kF16, 4, 0}};
  std::vector<Data> data;
  std::vector<std::unique_ptr<GuardedBuffer>> ins;
  std::vector<DeviceKvBlock> blocks;
  int64_t total = 0;
  for (size_t i = 0; i < spec.size(); ++i) {
    data.push_back(MakeData(spec[i].s, spec[i].t, 50 + i));
    const size_t bytes = size_t(spec[i].s.elements()) * DTypeSize(spec[i].t);
    ins.push_back(std::make_unique<GuardedBuffer>(bytes));
    ins.back()->Upload(data.back().ptr(spec[i].t), bytes);
    blocks.push_back({spec[i].s, spec[i].t, ins.back()->get(), spec[i].sinks, spec[i].first_layer});
    total += int64_t(spec[i].s.tokens - spec[i].sinks) *
             RvqCodesPerToken(cfg, spec[i].first_layer, spec[i].s.layers);
  }
  GuardedBuffer all(size_t(total) * 2);
  ASSERT_TRUE(RvqEncodeCodes(**dcb, blocks, all.as<uint16_t>(), nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(all.GuardDamage(), 0u);
  const std::vector<uint16_t> batch = all.Download<uint16_t>();
  int64_t at = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t n = int64_t(spec[i].s.tokens - spec[i].sinks) *
                      RvqCodesPerToken(cfg, spec[i].first_layer, spec[i].s.layers);
    GuardedBuffer one(size_t(std::max<int64_t>(n, 1)) * 2);
    ASSERT_TRUE(RvqEncodeCodes(**dcb, {&blocks[i], 1}, one.as<uint16_t>(), nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint16_t> single = one.Download<uint16_t>();
    for (int64_t j = 0; j < n; ++j) {
      ASSERT_EQ(batch[at + j], single[j]) << "block " << i << " code " << j;
    }
    at += n;
  }
  EXPECT_EQ(at, total);
}

// Variants 14-16 change only when loads are issued (14, 16) and skip the exact rescore where the
// tensor-core scores provably decide between a row's two candidates (15, 16): their codes must be
// those of variant 13, bit for bit, on random, fitted and tie-laden codebooks (the ties: every
// fourth codeword of each table duplicated, so that many rows' two best scores are equal).
TEST(RvqEncodeVariants, SameCodesAsVariant13) {
  VQKV_REQUIRE_GPU();
  if (RvqEncodeResolvedVariant(128, 15) != 15) GTEST_SKIP() << "no sm_90a wgmma path";
  struct V {
    const char* name;
    int dim, heads, layers, tokens;
    StageConfig k, v;
    DType dtype;
    int codebook;  // 0 random, 1 fitted, 2 random with duplicated codewords
    uint32_t seed;
  };
  const std::vector<V> cases = {
      {"random_d128", 128, 8, 2, 700, {8, 1024}, {4, 512}, DType::kF16, 0, 61},
      {"fitted_d128", 128, 4, 2, 400, {16, 256}, {6, 128}, DType::kF16, 1, 62},
      {"ties_d128", 128, 4, 2, 300, {6, 256}, {3, 64}, DType::kF32, 2, 63},
      {"random_d64_bf16", 64, 4, 3, 257, {6, 128}, {3, 64}, DType::kBF16, 0, 64},
      {"ties_d64", 64, 2, 2, 190, {5, 64}, {2, 256}, DType::kF16, 2, 65},
  };
  for (const V& tc : cases) {
    SCOPED_TRACE(tc.name);
    const RvqConfig cfg = RvqConfig::Uniform(tc.layers, tc.heads, tc.dim, tc.k, tc.v, false);
    std::shared_ptr<const Codebook> cb;
    const KvShape s{tc.layers, tc.tokens, tc.heads, tc.dim};
    if (tc.codebook == 1) {
      auto fit = FitOnRandomKv(cfg, tc.seed);
      ASSERT_TRUE(fit.ok()) << fit.status();
      cb = std::make_shared<Codebook>(*std::move(fit));
    } else {
      Codebook r = RandomCodebook(cfg, tc.seed);
      if (tc.codebook == 2) {
        std::vector<std::vector<float>> tables;
        for (int l = 0; l < cfg.layers; ++l) {
          for (int c = 0; c < 2; ++c) {
            const StageConfig& sc = cfg.at(l, c);
            std::vector<float> t(size_t(sc.stages) * sc.size * tc.dim);
            for (int st = 0; st < sc.stages; ++st) {
              const float* src = r.Table(l, c, 0, st);
              float* dst = t.data() + size_t(st) * sc.size * tc.dim;
              std::copy(src, src + size_t(sc.size) * tc.dim, dst);
              for (int j = 1; j < sc.size; j += 4) {
                std::copy(dst + size_t(j - 1) * tc.dim, dst + size_t(j) * tc.dim,
                          dst + size_t(j) * tc.dim);
              }
            }
            tables.push_back(std::move(t));
          }
        }
        auto made = Codebook::Create(cfg, std::move(tables));
        ASSERT_TRUE(made.ok()) << made.status();
        cb = std::make_shared<Codebook>(*std::move(made));
      } else {
        cb = std::make_shared<Codebook>(std::move(r));
      }
    }
    auto dcb = DeviceCodebook::Create(cb);
    ASSERT_TRUE(dcb.ok()) << dcb.status();
    const Data data = MakeData(s, tc.dtype, tc.seed + 7);
    const size_t in_bytes = size_t(s.elements()) * DTypeSize(tc.dtype);
    GuardedBuffer din(in_bytes);
    din.Upload(data.ptr(tc.dtype), in_bytes);
    const DeviceKvBlock blk{s, tc.dtype, din.get(), 0, 0};
    const int64_t n = int64_t(s.tokens) * RvqCodesPerToken(cfg, 0, s.layers);
    auto encode = [&](int variant) {
      GuardedBuffer dc(size_t(n) * 2);
      GpuRvqOptions o;
      o.encode_variant = variant;
      EXPECT_TRUE(RvqEncodeCodes(**dcb, {&blk, 1}, dc.as<uint16_t>(), nullptr, o).ok());
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(dc.GuardDamage(), 0u);
      return dc.Download<uint16_t>();
    };
    const std::vector<uint16_t> ref = encode(13);
    for (int variant : kVariantsOf13) {
      ASSERT_EQ(RvqEncodeResolvedVariant(tc.dim, variant), variant);
      const std::vector<uint16_t> got = encode(variant);
      int64_t diff = 0, first = -1;
      for (int64_t i = 0; i < n; ++i) {
        if (got[i] != ref[i]) {
          if (first < 0) first = i;
          ++diff;
        }
      }
      EXPECT_EQ(diff, 0) << "variant " << variant << ": " << diff << " of " << n
                         << " codes differ from variant 13, first at " << first;
    }
  }
}

TEST(RvqEncodeErrors, RejectsBadInput) {
  VQKV_REQUIRE_GPU();
  const RvqConfig cfg = RvqConfig::Uniform(2, 2, 64, {2, 64}, {2, 64});
  auto cb = std::make_shared<Codebook>(RandomCodebook(cfg, 3));
  auto dcb = DeviceCodebook::Create(cb);
  ASSERT_TRUE(dcb.ok());
  const KvShape s{2, 8, 2, 64};
  std::vector<float> x = testing_data::RandomKv(s, 9);
  x[s.Offset(1, 1, 5, 1) + 7] = std::nanf("");
  GuardedBuffer din(x.size() * 4);
  din.Upload(x.data(), x.size() * 4);
  GuardedBuffer codes(size_t(8) * RvqCodesPerToken(cfg, 0, 2) * 2);
  DeviceKvBlock blk{s, DType::kF32, din.get(), 0, 0};
  absl::Status st = RvqEncodeCodes(**dcb, {&blk, 1}, codes.as<uint16_t>(), nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  blk.shape.head_dim = 32;
  st = RvqEncodeCodes(**dcb, {&blk, 1}, codes.as<uint16_t>(), nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  blk.shape.head_dim = 64;
  blk.first_layer = 1;  // layers [1, 3) of a 2-layer codebook
  st = RvqEncodeCodes(**dcb, {&blk, 1}, codes.as<uint16_t>(), nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  blk.first_layer = 0;
  blk.data = nullptr;
  st = RvqEncodeCodes(**dcb, {&blk, 1}, codes.as<uint16_t>(), nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
}

}  // namespace
}  // namespace vqkv::kernels::cuda
