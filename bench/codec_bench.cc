// CPU codec throughput (encode and decode) for two geometries:
//   tinystories-656k: 2 layers, 4 KV heads, head_dim 16, rvq K 7x1024 + V 2x512
//   LLaMA-3.1-8B:     32 layers, 8 KV heads, head_dim 128, rvq K 56x1024 + V 16x512 (the paper's)
// Blocks are fp16 in, fp16 out. Codebooks are random (speed does not depend on their content);
// data is random normal. Counters: tokens/s and logical fp16 KV bytes/s.
// Also the rvq search itself at SmolLM2's head_dim (64; 20 stages x 1024, 768 vectors = one
// 256-token block of 3 KV heads): greedy and beam search per vector (EncodeVector, the old beam
// path) against the batched tiled search (EncodeVectorsBeam), side by side.
//   build/bench/vqkv_codec_bench --benchmark_min_time=1
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "common/parallel.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/vq_search.h"

namespace vqkv::kernels {
namespace {

struct Geometry {
  const char* name;
  int layers, heads, dim;
  StageConfig k, v;
};
constexpr Geometry kTiny{"tinystories", 2, 4, 16, {7, 1024}, {2, 512}};
constexpr Geometry kLlama8B{"llama3.1-8b", 32, 8, 128, {56, 1024}, {16, 512}};

std::shared_ptr<const Codebook> RandomCodebook(const Geometry& g) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 0.3f);
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < g.layers; ++l) {
    for (const StageConfig& s : {g.k, g.v}) {
      std::vector<float> t(size_t(s.stages) * s.size * g.dim);
      for (auto& x : t) x = nd(rng);
      tables.push_back(std::move(t));
    }
  }
  return std::make_shared<const Codebook>(
      *Codebook::Create(RvqConfig::Uniform(g.layers, g.heads, g.dim, g.k, g.v), std::move(tables)));
}

std::unique_ptr<Codec> MakeCodec(const std::string& name, const Geometry& g) {
  CodecSpec spec = *ParseCodecSpec(name);
  if (spec.name == "rvq") spec.codebook = RandomCodebook(g);
  return std::move(*CreateCodec(spec));
}

std::string RandomBlock(const KvShape& s) {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> x(s.elements());
  for (auto& v : x) v = nd(rng);
  std::string out(x.size() * 2, '\0');
  FromFloat(x.data(), x.size(), DType::kF16, out.data());
  return out;
}

void Run(benchmark::State& state, const Geometry& g, const std::string& codec_name, bool encode) {
  const int tokens = static_cast<int>(state.range(0));
  const KvShape shape{g.layers, tokens, g.heads, g.dim};
  auto codec = MakeCodec(codec_name, g);
  const std::string block = RandomBlock(shape);
  // first_token past the sinks: steady-state blocks of a long sequence.
  const KvBlockView view{shape, DType::kF16, block.data(), 1 << 20, 0};
  std::vector<std::string> payload;
  if (!codec->Encode({view}, &payload).ok()) state.SkipWithError("encode failed");
  std::string out(block.size(), '\0');
  void* ptr = out.data();
  size_t bytes = out.size();
  for (auto _ : state) {
    if (encode) {
      std::vector<std::string> p;
      benchmark::DoNotOptimize(codec->Encode({view}, &p));
    } else {
      std::string_view p = payload[0];
      benchmark::DoNotOptimize(codec->Decode({&p, 1}, DType::kF16, {&ptr, 1}, {&bytes, 1}));
    }
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(tokens) * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["fp16_KV_B/s"] =
      benchmark::Counter(double(block.size()) * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["payload_bits/elem"] = double(payload[0].size()) * 8 / double(shape.elements());
  state.SetLabel(codec->Label());
}

void RunSearch(benchmark::State& state, bool batched) {
  const int beam = static_cast<int>(state.range(0));
  constexpr int kDim = 64, kStages = 20, kSize = 1024, kVectors = 768;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0, 1);
  std::vector<std::vector<float>> tables(kStages), norms(kStages);
  std::vector<const float*> tp, np;
  std::vector<int> sizes(kStages, kSize);
  for (int i = 0; i < kStages; ++i) {
    tables[i].resize(size_t(kSize) * kDim);
    const float scale = std::pow(0.85f, float(i));  // residual stages shrink
    for (auto& x : tables[i]) x = scale * nd(rng);
    norms[i].resize(kSize);
    for (int j = 0; j < kSize; ++j) {
      float n = 0;
      for (int d = 0; d < kDim; ++d) n += tables[i][j * kDim + d] * tables[i][j * kDim + d];
      norms[i][j] = n;
    }
    tp.push_back(tables[i].data());
    np.push_back(norms[i].data());
  }
  std::vector<float> x(size_t(kVectors) * kDim);
  for (auto& v : x) v = 2.5f * nd(rng);
  std::vector<int32_t> codes(size_t(kVectors) * kStages);
  for (auto _ : state) {
    if (batched) {
      EncodeVectorsBeam(x.data(), kVectors, kDim, tp, np, sizes, beam, codes.data());
    } else {
      ParallelFor(kVectors, 16, [&](int64_t b, int64_t e) {
        for (int64_t v = b; v < e; ++v)
          EncodeVector(x.data() + v * kDim, kDim, tp, np, sizes, beam, codes.data() + v * kStages);
      });
    }
    benchmark::DoNotOptimize(codes.data());
  }
  state.counters["vectors/s"] =
      benchmark::Counter(double(kVectors) * state.iterations(), benchmark::Counter::kIsRate);
}

void Register() {
  for (bool batched : {false, true}) {
    benchmark::RegisterBenchmark(
        (std::string("d64_20x1024/") + (batched ? "batched" : "per_vector") + "/beam").c_str(),
        [batched](benchmark::State& s) { RunSearch(s, batched); })
        ->Arg(1)
        ->Arg(4)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  for (const Geometry* g : {&kTiny, &kLlama8B}) {
    for (const char* c : {"raw", "scalar-2", "scalar-4", "rvq"}) {
      for (bool enc : {true, false}) {
        // rvq encode on 8B geometry costs ~4 GFLOP per token on the CPU: keep its block small.
        const int tokens = (g == &kLlama8B && std::string(c) == "rvq" && enc) ? 4 : 256;
        benchmark::RegisterBenchmark(
            (std::string(g->name) + "/" + c + (enc ? "/encode" : "/decode")).c_str(),
            [g, c, enc](benchmark::State& s) { Run(s, *g, c, enc); })
            ->Arg(tokens)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
    }
  }
}

}  // namespace
}  // namespace vqkv::kernels

int main(int argc, char** argv) {
  vqkv::kernels::Register();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
