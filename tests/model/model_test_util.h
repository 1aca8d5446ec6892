// Shared helpers for vqkv_model_tests: paths of the real checkpoint and data (compile
// definitions set by tests/model/CMakeLists.txt), a once-loaded real model, and a small
// synthetic LLaMA checkpoint writer.
// Thread-safety: test-only; RealModel() is initialised once (thread-safe static).
#pragma once

#include <filesystem>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace vqkv::model::testing {

// Timing assertions hold only for optimised builds without sanitizers; otherwise the tests
// just print their measurements.
#if defined(NDEBUG) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
inline constexpr bool kCheckTiming = true;
#else
inline constexpr bool kCheckTiming = false;
#endif

inline std::string ModelDir() { return VQKV_TEST_MODEL_DIR; }
inline std::string DataFile() { return VQKV_TEST_DATA_FILE; }

// The real tinystories-656k model / tokenizer, loaded once. Tests call
// ASSERT_TRUE(RealModel().ok()) first: a missing shared/ folder fails them, with the path.
inline const absl::StatusOr<LlamaModel>& RealModel() {
  static const absl::StatusOr<LlamaModel>* model =
      new absl::StatusOr<LlamaModel>(LlamaModel::Load(ModelDir()));
  return *model;
}
inline const absl::StatusOr<Tokenizer>& RealTokenizer() {
  static const absl::StatusOr<Tokenizer>* tok =
      new absl::StatusOr<Tokenizer>(Tokenizer::Load(ModelDir() + "/tokenizer.json"));
  return *tok;
}

// A fresh empty directory under the gtest temp dir.
inline std::string FreshDir(const std::string& name) {
  const std::filesystem::path p = std::filesystem::path(::testing::TempDir()) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// A tiny random LLaMA: 2 layers, hidden 16, 4 heads, 2 KV heads, head_dim 4, FFN 24, vocab 32.
struct TinyCheckpoint {
  int hidden = 16, heads = 4, kv_heads = 2, ff = 24, vocab = 32, layers = 2, max_pos = 64;
  bool tie = true;
  // name -> (shape, values)
  std::vector<std::pair<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>> tensors;

  static TinyCheckpoint Make(bool tie, uint32_t seed = 7) {
    TinyCheckpoint c;
    c.tie = tie;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 0.3f);
    auto add = [&](const std::string& name, std::vector<int64_t> shape, bool ones = false) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::vector<float> v(n);
      for (float& x : v) x = ones ? 1.0f + 0.1f * nd(rng) : nd(rng);
      c.tensors.push_back({name, {shape, v}});
    };
    const int hd = c.hidden / c.heads;
    add("model.embed_tokens.weight", {c.vocab, c.hidden});
    if (!tie) add("lm_head.weight", {c.vocab, c.hidden});
    for (int l = 0; l < c.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      add(p + "input_layernorm.weight", {c.hidden}, true);
      add(p + "post_attention_layernorm.weight", {c.hidden}, true);
      add(p + "self_attn.q_proj.weight", {c.heads * hd, c.hidden});
      add(p + "self_attn.k_proj.weight", {c.kv_heads * hd, c.hidden});
      add(p + "self_attn.v_proj.weight", {c.kv_heads * hd, c.hidden});
      add(p + "self_attn.o_proj.weight", {c.hidden, c.heads * hd});
      add(p + "mlp.gate_proj.weight", {c.ff, c.hidden});
      add(p + "mlp.up_proj.weight", {c.ff, c.hidden});
      add(p + "mlp.down_proj.weight", {c.hidden, c.ff});
    }
    add("model.norm.weight", {c.hidden}, true);
    return c;
  }

  std::string ConfigJson() const {
    return "{\"model_type\": \"llama\", \"hidden_size\": " + std::to_string(hidden) +
           ", \"intermediate_size\": " + std::to_string(ff) +
           ", \"num_hidden_layers\": " + std::to_string(layers) +
           ", \"num_attention_heads\": " + std::to_string(heads) +
           ", \"num_key_value_heads\": " + std::to_string(kv_heads) +
           ", \"vocab_size\": " + std::to_string(vocab) +
           ", \"max_position_embeddings\": " + std::to_string(max_pos) +
           ", \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"tie_word_embeddings\": " +
           (tie ? "true" : "false") + ", \"bos_token_id\": 1, \"eos_token_id\": 2}";
  }

  // Writes config.json and model.safetensors into `dir`, skipping tensor `skip` and writing
  // tensors as `dtype` ("F32" or "BF16").
  absl::Status Write(const std::string& dir, const std::string& skip = "",
                     const std::string& dtype = "F32") const {
    absl::Status s = WriteStringToFile(dir + "/config.json", ConfigJson());
    if (!s.ok()) return s;
    SafetensorsWriter w;
    for (const auto& [name, t] : tensors) {
      if (name == skip) continue;
      if (dtype == "BF16") {
        std::string bytes(t.second.size() * 2, '\0');
        FromFloat(t.second.data(), t.second.size(), DType::kBF16, bytes.data());
        w.AddRaw(name, "BF16", t.first, bytes);
      } else {
        w.AddF32(name, t.first, t.second.data());
      }
    }
    return w.WriteFile(dir + "/model.safetensors");
  }

  // Rounds every value to bf16 precision (so F32 and BF16 files hold the same model).
  void RoundToBf16() {
    for (auto& [name, t] : tensors) {
      for (float& x : t.second) x = BF16ToFloat(FloatToBF16(x));
    }
  }
};

}  // namespace vqkv::model::testing
