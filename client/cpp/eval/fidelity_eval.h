// End-to-end fidelity of a KV codec on a real model: K/V error, attention metrics and the
// model's own predictions (teacher-forced perplexity, top-1 agreement, KL of next-token
// distributions) when attention reads a compressed cache with exact sinks and an exact recent
// window. Used by `vqkv fidelity`, the demo and the fidelity tests, so all report one set of
// definitions (kernels/fidelity.h).
// Thread-safety: functions are reentrant; they parallelise internally.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/codec.h"
#include "kernels/fidelity.h"
#include "kernels/kv.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace vqkv::eval {

struct Corpus {
  std::vector<std::vector<int>> seqs;  // token ids, each starting with BOS
  int64_t tokens() const;
};

// Tokenizes stories (BOS + story, see Tokenizer::EncodeForScoring). With `pack`, consecutive
// stories are concatenated into contexts of up to `max_tokens` (each story keeps its BOS; a story
// that does not fit starts the next context), as a long-context request would look; otherwise
// each story is one sequence truncated at `max_tokens`. Sequences shorter than `min_tokens` are
// dropped; stops after `max_seqs` sequences (0 = all).
Corpus BuildCorpus(const model::Tokenizer& tok, const std::vector<std::string>& stories,
                   int max_tokens, int min_tokens, int max_seqs, bool pack = false);

// Exact post-RoPE K, V and Q of every sequence, concatenated with seq_lens.
absl::StatusOr<kernels::KvSamples> CaptureSamples(const model::LlamaModel& m, const Corpus& c);

// Model-written calibration text: more K/V to fit codebooks on than a small calibration text
// holds (deep residual stages memorise their training vectors). Each story starts with the first
// `prompt_tokens` tokens (BOS included) of one of `seeds`, in turn, and continues with the model's
// own sampled tokens (LlamaModel::Sample) up to `max_story_tokens` tokens or its EOS; stories are
// drawn until they hold `tokens` tokens. Deterministic for the given options. Returns the story
// texts (without BOS/EOS, trimmed, never holding the story separator: as a story file written
// from them loads back), for BuildCorpus like any other stories. InvalidArgument when `seeds`
// is empty or a count is not positive.
struct GenerateOptions {
  int64_t tokens = 0;
  int prompt_tokens = 8;
  int max_story_tokens = 512;
  model::SampleOptions sample;
  std::function<void(int64_t done, int64_t total, const std::string& what)> progress;
};
absl::StatusOr<std::vector<std::string>> GenerateStories(const model::LlamaModel& m,
                                                         const model::Tokenizer& tok,
                                                         const std::vector<std::string>& seeds,
                                                         const GenerateOptions& opts);

// Concatenates `b`'s sequences after `a`'s (same layers, heads and head_dim; queries kept only
// when both have them). InvalidArgument when the geometries differ.
absl::StatusOr<kernels::KvSamples> ConcatSamples(const kernels::KvSamples& a,
                                                 const kernels::KvSamples& b);

struct EvalOptions {
  int sink_tokens = 4;
  int recent_tokens = 32;
  int block_tokens = 256;             // storage block size for the bit accounting
  int64_t amortise_tokens = 1 << 20;  // codebooks are shared by this many stored tokens
  // Attention metrics (attn-out error, top-8 agreement) on at most this many query positions per
  // sequence, evenly spaced from the last one backwards (0: every position). Perplexity, top-1
  // and KL always score every position.
  int64_t max_attention_queries = 0;
  // Non-empty: only layers l with compress_layers[l] read the codec's reconstruction; the others
  // keep their exact cache (per-layer sensitivity, LayerSensitivity below). The bits and K/V
  // columns then cover the compressed layers only.
  std::vector<bool> compress_layers;
  // Diagnostic only: positions holding one of these token ids read their exact K/V in every
  // layer (stored as coded all the same, so the bits columns do not change). Shows how much of
  // the error comes from such tokens, e.g. the BOS of each story packed into a long context,
  // which later positions of that story attend to as a sink.
  std::vector<int> exact_token_ids;
};

struct EvalRow {
  std::string codec;       // label
  int64_t context = 0;     // tokens per evaluated sequence (0: not tracked); shown when set
  std::string split;       // rvq: stage split; others: ""
  double bits_all_in = 0;  // stored bits per compressed element, fp16 basis, all overhead
  double bits_codes = 0;   // codes only
  kernels::VectorError k, v;
  kernels::AttentionFidelity attention;
  double ppl_ref = 0, ppl = 0, ppl_delta_pct = 0;
  double top1_pct = 0;
  double kl = 0;       // mean KL(p_exact || p_codec) of next-token distributions, nats
  int64_t scored = 0;  // predictions scored
  double seconds = 0;
};

// Precomputed exact logits of a corpus (shared by all codecs evaluated on it).
struct Reference {
  std::vector<std::vector<float>> logits;
};
absl::StatusOr<Reference> ComputeReference(const model::LlamaModel& m, const Corpus& c);

// Runs the corpus with `codec` compressing each layer's cache. `codebook_bytes` is amortised
// over opts.amortise_tokens.
absl::StatusOr<EvalRow> Evaluate(const model::LlamaModel& m, const Corpus& c, const Reference& ref,
                                 const kernels::Codec& codec, int64_t codebook_bytes,
                                 const EvalOptions& opts);

// How much each layer's compression moves the model's predictions: KL(p_exact || p_codec) of
// next-token distributions with only that layer compressed (every other layer exact), on `c`.
// For a small perturbation KL is quadratic in the attention-output error, and the layers'
// contributions add up; the split chooser weighs each layer's squared error by
// kl[l] / err[l]^2 (rvq_budget.h BudgetOptions::layer_weights). `all_kl` is the KL with every
// layer compressed, to check that additivity.
struct LayerSensitivity {
  std::vector<double> kl;
  double all_kl = 0;
};
absl::StatusOr<LayerSensitivity> MeasureLayerSensitivity(
    const model::LlamaModel& m, const Corpus& c, const Reference& ref, const kernels::Codec& codec,
    const EvalOptions& opts,
    const std::function<void(int64_t, int64_t, const std::string&)>& progress = nullptr);

// K/V and attention metrics of `codec` on sample vectors (no model): each sequence of each
// layer is stored as one block from position 0. Model columns (ppl, top-1, KL) are NaN.
absl::StatusOr<EvalRow> EvaluateOnSamples(const kernels::KvSamples& s, const kernels::Codec& codec,
                                          int64_t codebook_bytes, const EvalOptions& opts);

// Synthetic K/V/Q with LLaMA-like structure (per-channel offsets, a few outlier channels, RoPE-like
// rotation), for machines without a model. Always labelled SYNTHETIC by callers.
kernels::KvSamples SyntheticSamples(int layers, int kv_heads, int q_heads, int head_dim, int seqs,
                                    int seq_len, uint32_t seed);

// Markdown table of rows.
std::string FormatTable(const std::vector<EvalRow>& rows);

}  // namespace vqkv::eval
