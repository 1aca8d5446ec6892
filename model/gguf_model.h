// A LLaMA-architecture model from a GGUF file (llama.cpp's format): LlamaConfig from the
// `llama.*` metadata and fp32 LlamaWeights from the dequantized tensors (token_embd,
// blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm, output_norm, output or tied
// embeddings). llama.cpp's converter permutes the rows of attn_q / attn_k within each head so
// that its RoPE rotates adjacent pairs; the loader undoes that permutation so the Hugging Face
// rotate-half forward in llama.cc (and the captured K) match the original checkpoint.
// Thread-safety: plain functions; loading uses vqkv::ParallelFor.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/gguf.h"
#include "model/llama.h"
#include "model/llama_config.h"
#include "model/llama_weights.h"

namespace vqkv::model {

// Unimplemented for general.architecture other than "llama", partial RoPE, or RoPE scaling
// other than none/linear; InvalidArgument (naming the key) for missing or inconsistent values.
absl::StatusOr<LlamaConfig> LlamaConfigFromGguf(const GgufFile& gguf);

// Dequantizes every tensor the config needs; InvalidArgument naming the tensor when one is
// missing or has the wrong shape; Unimplemented for tensor types gguf_dequant.h lacks.
absl::StatusOr<LlamaWeights> LlamaWeightsFromGguf(const GgufFile& gguf, const LlamaConfig& config);

// Inverse of convert_hf_to_gguf.py's permute(): within each of `heads` blocks of `head_dim`
// rows (of `cols` values), GGUF row 2i + j holds Hugging Face row j * head_dim / 2 + i.
void UnpermuteRopeRows(std::vector<float>* w, int heads, int head_dim, int cols);

// Opens `path` and builds the model. NotFound when the file is missing; errors as above.
absl::StatusOr<LlamaModel> LoadGgufModel(const std::string& path);

}  // namespace vqkv::model
