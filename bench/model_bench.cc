// CPU forward-pass benchmark: prefill seconds and tokens/s of the fp32 LLaMA forward (the
// one the fidelity tables run), with the time of its two hot kernels (linear layers,
// causal attention) measured separately on the model's own shapes. Figures go to
// docs/benchmarks.md.
//
//   vqkv_model_bench [--model PATH(.gguf or safetensors folder)] [--tokens 512,2048]
//                    [--repeats 1]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/parallel.h"
#include "model/gguf_model.h"
#include "model/llama.h"
#include "model/llama_ops.h"

namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

int Usage() {
  std::fprintf(stderr,
               "usage: vqkv_model_bench [--model PATH] [--tokens N,N,...] [--repeats R]\n"
               "  PATH: a LLaMA-architecture .gguf file or safetensors folder\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path;
  std::vector<int> token_counts = {512, 2048};
  int repeats = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      const std::string eq = std::string(name) + "=";
      if (a.rfind(eq, 0) == 0) return argv[i] + eq.size();
      if (a == name && i + 1 < argc) return argv[++i];
      return nullptr;
    };
    if (const char* v = value("--model")) {
      model_path = v;
    } else if (const char* v = value("--tokens")) {
      token_counts.clear();
      for (absl::string_view p : absl::StrSplit(v, ',')) {
        int n;
        if (!absl::SimpleAtoi(p, &n) || n < 1) return Usage();
        token_counts.push_back(n);
      }
    } else if (const char* v = value("--repeats")) {
      if (!absl::SimpleAtoi(v, &repeats) || repeats < 1) return Usage();
    } else {
      return Usage();
    }
  }
  if (model_path.empty()) {
    if (const char* home = std::getenv("HOME")) {
      model_path = std::string(home) + "/.cache/vqkv/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    }
  }
  const bool gguf = model_path.size() > 5 && model_path.substr(model_path.size() - 5) == ".gguf";
  auto model =
      gguf ? vqkv::model::LoadGgufModel(model_path) : vqkv::model::LlamaModel::Load(model_path);
  if (!model.ok()) {
    std::fprintf(stderr, "cannot load model %s: %s\n", model_path.c_str(),
                 std::string(model.status().message()).c_str());
    return 1;
  }
  const vqkv::model::LlamaConfig& c = model->config();
  std::printf(
      "model %s: %d layers, hidden %d, %d heads, %d KV heads, head_dim %d, ff %d; %d threads\n",
      model_path.c_str(), c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
      c.num_key_value_heads, c.head_dim, c.intermediate_size, vqkv::NumThreads());
  std::printf(
      "| tokens | prefill s | tok/s | linear GFLOP/s (gate/up shape) | attention s "
      "(one layer) | attention GFLOP/s | attention x layers, share of prefill |\n"
      "|---|---|---|---|---|---|---|\n");
  std::mt19937 g(7);
  for (int n : token_counts) {
    if (n > c.max_position_embeddings) {
      std::fprintf(stderr, "skipping %d tokens: above the model's context %d\n", n,
                   c.max_position_embeddings);
      continue;
    }
    std::vector<int> ids(n);
    std::uniform_int_distribution<int> tok(0, c.vocab_size - 1);
    for (int& t : ids) t = tok(g);
    double best_prefill = 1e30;
    for (int r = 0; r < repeats; ++r) {
      vqkv::model::KvCache cap;
      vqkv::model::ForwardOptions fo;
      fo.capture = &cap;
      fo.capture_queries = false;
      const auto t0 = Clock::now();
      auto logits = model->Forward(ids, fo);
      const double s = Since(t0);
      if (!logits.ok()) {
        std::fprintf(stderr, "forward failed: %s\n",
                     std::string(logits.status().message()).c_str());
        return 1;
      }
      best_prefill = std::min(best_prefill, s);
    }
    // Linear layer alone on the MLP's gate/up shape.
    const auto x = Random(static_cast<size_t>(n) * c.hidden_size, 1);
    const auto w = Random(static_cast<size_t>(c.intermediate_size) * c.hidden_size, 2);
    std::vector<float> y(static_cast<size_t>(n) * c.intermediate_size);
    auto t1 = Clock::now();
    vqkv::model::LinearForward(x.data(), n, w.data(), nullptr, c.hidden_size, c.intermediate_size,
                               y.data());
    const double lin_s = Since(t1);
    const double lin_gflops = 2.0 * n * c.hidden_size * c.intermediate_size / lin_s / 1e9;
    // Attention alone: one layer's causal GQA attention over n tokens.
    const int qd = c.num_attention_heads * c.head_dim, kvd = c.num_key_value_heads * c.head_dim;
    const auto q = Random(static_cast<size_t>(n) * qd, 3);
    const auto k = Random(static_cast<size_t>(n) * kvd, 4);
    const auto v = Random(static_cast<size_t>(n) * kvd, 5);
    std::vector<float> out(static_cast<size_t>(n) * qd);
    vqkv::model::AttentionArgs aa;
    aa.q = q.data();
    aa.k = k.data();
    aa.v = v.data();
    aa.n = n;
    aa.heads = c.num_attention_heads;
    aa.kv_heads = c.num_key_value_heads;
    aa.head_dim = c.head_dim;
    aa.out = out.data();
    t1 = Clock::now();
    vqkv::model::CausalAttention(aa);
    const double att_s = Since(t1);
    // QK^T and PV over the causal triangle: 2 * 2 * heads * head_dim * n(n+1)/2.
    const double att_flops = 2.0 * c.num_attention_heads * c.head_dim * double(n) * (n + 1);
    std::printf("| %d | %.2f | %.0f | %.1f | %.3f | %.1f | %.0f%% |\n", n, best_prefill,
                n / best_prefill, lin_gflops, att_s, att_flops / att_s / 1e9,
                100.0 * att_s * c.num_hidden_layers / best_prefill);
    std::fflush(stdout);
  }
  return 0;
}
