// fp32 weights of a LLaMA-architecture model and their loader from a Hugging Face safetensors
// folder (model.safetensors, or shards listed in model.safetensors.index.json).
// Thread-safety: plain value types; immutable once loaded.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama_config.h"

namespace vqkv::model {

// A linear layer y = x W^T + b. w: [out, in] row-major (HF nn.Linear layout); b: [out] or empty.
struct LinearWeights {
  int in = 0, out = 0;
  std::vector<float> w;
  std::vector<float> b;
};

struct LlamaLayerWeights {
  std::vector<float> input_layernorm;           // [hidden]
  std::vector<float> post_attention_layernorm;  // [hidden]
  LinearWeights q_proj;                         // [heads * head_dim, hidden]
  LinearWeights k_proj;                         // [kv_heads * head_dim, hidden]
  LinearWeights v_proj;                         // [kv_heads * head_dim, hidden]
  LinearWeights o_proj;                         // [hidden, heads * head_dim]
  LinearWeights gate_proj;                      // [intermediate, hidden]
  LinearWeights up_proj;                        // [intermediate, hidden]
  LinearWeights down_proj;                      // [hidden, intermediate]
};

struct LlamaWeights {
  std::vector<float> embed_tokens;  // [vocab, hidden]
  std::vector<LlamaLayerWeights> layers;
  std::vector<float> norm;  // [hidden]
  LinearWeights lm_head;    // [vocab, hidden]; w empty when tied (embed_tokens serves)
};

// Loads every tensor named by HF's LlamaForCausalLM from `dir` and converts F32/F16/BF16 to
// fp32. With tie_word_embeddings the folder may hold either model.embed_tokens.weight or
// lm_head.weight (or both); the one present serves for both. Errors: NotFound naming the path
// when no model.safetensors / model.safetensors.index.json (or a listed shard) exists;
// InvalidArgument naming the tensor when one is missing, has the wrong shape or a non-float
// dtype; InvalidArgument for malformed files.
absl::StatusOr<LlamaWeights> LoadLlamaWeights(const std::string& dir, const LlamaConfig& config);

}  // namespace vqkv::model
