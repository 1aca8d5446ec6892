// A CPU fp32 LLaMA forward pass with Hugging Face semantics (RMSNorm, rotate-half RoPE, GQA,
// causal softmax attention, SwiGLU MLP, tied or separate lm_head), used to capture real K/V
// caches and to measure how a K/V codec changes the model's predictions: a hook can replace
// each layer's K/V by their compressed->decompressed reconstruction, as a decoder reading a
// compressed cache (with exact attention sinks and an exact recent window) would see them.
// Thread-safety: a LlamaModel is immutable after Load(); Forward() and Generate() are const
// and may run concurrently from several threads. Each call uses vqkv::ParallelFor internally.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/llama_config.h"
#include "model/llama_weights.h"

namespace vqkv::model {

// Per-layer attention tensors of one Forward() pass, post-RoPE, exact (never the transform's
// reconstruction).
struct KvCache {
  int layers = 0, tokens = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::vector<float>> k, v;  // [layer] -> [tokens, kv_heads, head_dim]
  std::vector<std::vector<float>> q;     // [layer] -> [tokens, heads, head_dim]; see
                                         // ForwardOptions::capture_queries
};

// Replaces one layer's full-sequence K and V ([tokens, kv_heads, head_dim], post-RoPE) by
// reconstructed copies. `k_hat` and `v_hat` arrive sized like `k` and `v` (zero-filled) and
// must keep that size. Called once per layer per Forward(), in layer order; a non-OK status
// aborts the Forward() and is returned from it.
using KvTransform =
    std::function<absl::Status(int layer, const std::vector<float>& k, const std::vector<float>& v,
                               std::vector<float>* k_hat, std::vector<float>* v_hat)>;

struct ForwardOptions {
  // If set, filled with the exact post-RoPE K/V (and Q) of every layer. With a transform, these
  // are the exact K/V computed in that pass (from hidden states that already reflect
  // compressed attention in lower layers).
  KvCache* capture = nullptr;
  bool capture_queries = true;  // also fill capture->q
  // If set, attention for query position t reads key/value position s <= t from the transform's
  // reconstruction, except the exact k/v when s < sink_tokens or s > t - recent_tokens.
  KvTransform transform;
  int sink_tokens = 4;
  int recent_tokens = 32;
};

// Sampling for LlamaModel::Sample.
struct SampleOptions {
  float temperature = 1.0f;  // logits / temperature before the softmax; 0: greedy (argmax)
  float top_p = 1.0f;        // nucleus: sample among the most likely tokens whose mass reaches
                             // top_p (1: the whole vocabulary)
  uint64_t seed = 1;         // prompt i draws from its own generator seeded by (seed, i)
  int batch = 16;            // prompts decoded together: one pass over the weights per step
                             // serves all of them
};

class LlamaModel {
 public:
  // Loads config.json and the safetensors weights from `dir`. NotFound naming the path when
  // the directory, config.json or the weights are missing; InvalidArgument naming the tensor
  // when one is missing or has the wrong shape; InvalidArgument / Unimplemented for configs
  // this implementation cannot run (see ParseLlamaConfig).
  static absl::StatusOr<LlamaModel> Load(const std::string& dir);

  // Builds a model from weights already in memory; InvalidArgument if any size disagrees with
  // `config`.
  static absl::StatusOr<LlamaModel> Create(LlamaConfig config, LlamaWeights weights);

  const LlamaConfig& config() const { return config_; }
  const LlamaWeights& weights() const { return weights_; }

  // Logits [tokens.size(), vocab_size] of a teacher-forced pass over `tokens` (positions
  // 0..n-1). InvalidArgument when `tokens` is empty, longer than max_position_embeddings, holds
  // an id outside [0, vocab_size), or options are negative; errors from the transform and
  // InvalidArgument when it resizes k_hat/v_hat.
  absl::StatusOr<std::vector<float>> Forward(const std::vector<int>& tokens,
                                             const ForwardOptions& opts = {}) const;

  // Greedy (argmax) continuation of `prompt` with an incremental K/V cache. Returns only the
  // new tokens: at most `max_new_tokens`, ending early after an EOS token (which is included)
  // or once prompt + new tokens reach max_position_embeddings (so a prompt already that long
  // gets none). Input errors as for Forward();
  // InvalidArgument when max_new_tokens < 0.
  absl::StatusOr<std::vector<int>> Generate(const std::vector<int>& prompt,
                                            int max_new_tokens) const;

  // Sampled continuations of several prompts, each ending as in Generate() (EOS included, at most
  // `max_new_tokens`, never past max_position_embeddings). Prompts are decoded `opts.batch` at a
  // time with one incremental K/V cache each, so the weights are read once per step for the
  // whole batch. Prompt i's draws depend only on (seed, i) and its logits; with temperature 0
  // and batch 1 the result equals Generate(). InvalidArgument for an invalid prompt (as
  // Forward()), max_new_tokens < 0, temperature < 0 or not finite, top_p outside (0, 1], or
  // batch < 1.
  absl::StatusOr<std::vector<std::vector<int>>> Sample(const std::vector<std::vector<int>>& prompts,
                                                       int max_new_tokens,
                                                       const SampleOptions& opts) const;

 private:
  // K/V of the positions processed so far, per layer: [positions, kv_heads, head_dim].
  struct DecodeCache {
    std::vector<std::vector<float>> k, v;
  };

  LlamaModel(LlamaConfig config, LlamaWeights weights)
      : config_(std::move(config)),
        weights_(std::move(weights)),
        inv_freq_(RopeInverseFrequencies(config_)) {}

  absl::Status CheckTokens(const std::vector<int>& tokens) const;
  // Runs `n` tokens at positions [pos0, pos0 + n) through the network, appending their K/V to
  // `cache`. `opts` (transform, capture) applies only when pos0 == 0. Writes logits for every
  // position, or for the last one only when `last_only`.
  absl::Status Run(const int* tokens, int n, int pos0, DecodeCache* cache,
                   const ForwardOptions& opts, bool last_only, std::vector<float>* logits) const;
  // One new token for each of `n` sequences: tokens[i] at position pos[i] of caches[i] (which
  // hold pos[i] positions and get one more). Writes logits [n, vocab_size].
  absl::Status Step(const int* tokens, const int* pos, DecodeCache* const* caches, int n,
                    std::vector<float>* logits) const;

  LlamaConfig config_;
  LlamaWeights weights_;
  std::vector<double> inv_freq_;  // [head_dim / 2]
};

}  // namespace vqkv::model
