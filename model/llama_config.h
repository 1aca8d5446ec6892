// Hyper-parameters of a LLaMA-architecture checkpoint, parsed from a Hugging Face config.json.
// Thread-safety: plain value type.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::model {

// How RoPE frequencies are rescaled for long contexts (HF `rope_scaling`).
enum class RopeScaling { kNone, kLinear, kLlama3 };

struct LlamaConfig {
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;  // == num_attention_heads when absent (no GQA)
  int head_dim = 0;             // config's head_dim, else hidden_size / num_attention_heads
  float rms_norm_eps = 1e-6f;
  double rope_theta = 10000.0;
  int vocab_size = 0;
  int max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v/o projections carry a bias
  bool mlp_bias = false;        // gate/up/down projections carry a bias
  int bos_token_id = -1;
  std::vector<int> eos_token_ids;  // config may give one id or a list

  RopeScaling rope_scaling = RopeScaling::kNone;
  double rope_factor = 1.0;               // kLinear, kLlama3
  double rope_low_freq_factor = 1.0;      // kLlama3
  double rope_high_freq_factor = 4.0;     // kLlama3
  int rope_original_max_position = 8192;  // kLlama3

  // Number of query heads sharing one KV head.
  int group_size() const { return num_attention_heads / num_key_value_heads; }
  bool IsEos(int id) const;
};

// Parses config.json text; `what` names the source in errors. InvalidArgument for missing or
// inconsistent fields (e.g. heads not a multiple of KV heads, odd head_dim); Unimplemented for
// a model_type other than "llama", an activation other than SiLU, or an unknown rope_scaling.
absl::StatusOr<LlamaConfig> ParseLlamaConfig(const std::string& json_text, const std::string& what);

// Reads and parses `path`. NotFound (naming the path) when missing.
absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path);

// RoPE inverse frequencies [head_dim / 2] for `config`, in double precision:
// theta^(-2i/head_dim), rescaled per config.rope_scaling.
std::vector<double> RopeInverseFrequencies(const LlamaConfig& config);

}  // namespace vqkv::model
