#include "model/gguf_model.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/parallel.h"
#include "common/status_macros.h"

namespace vqkv::model {
namespace {

absl::Status Bad(const GgufFile& g, const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("gguf ", g.what(), ": ", msg));
}

absl::Status PositiveInt(const GgufFile& g, const std::string& key, int* out) {
  VQKV_ASSIGN_OR_RETURN(int64_t v, g.GetInt(key));
  if (v <= 0 || v > (int64_t{1} << 30)) return Bad(g, absl::StrCat(key, " = ", v, " is absurd"));
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

// One tensor to dequantize into `dest`, with its expected ggml dims.
struct Job {
  std::string name;
  std::vector<int64_t> dims;
  std::vector<float>* dest;
  int rope_heads = 0;  // > 0: undo the RoPE row permutation with this many heads
};

}  // namespace

void UnpermuteRopeRows(std::vector<float>* w, int heads, int head_dim, int cols) {
  const int half = head_dim / 2;
  std::vector<float> block(static_cast<size_t>(head_dim) * cols);
  for (int h = 0; h < heads; ++h) {
    float* base = w->data() + static_cast<size_t>(h) * head_dim * cols;
    std::copy(base, base + block.size(), block.begin());
    for (int i = 0; i < half; ++i) {
      for (int j = 0; j < 2; ++j) {
        std::copy_n(block.data() + static_cast<size_t>(2 * i + j) * cols, cols,
                    base + static_cast<size_t>(j * half + i) * cols);
      }
    }
  }
}

absl::StatusOr<LlamaConfig> LlamaConfigFromGguf(const GgufFile& g) {
  VQKV_ASSIGN_OR_RETURN(std::string arch, g.GetString("general.architecture"));
  if (arch != "llama") {
    return absl::UnimplementedError(
        absl::StrCat("gguf ", g.what(), ": general.architecture '", arch, "' (only llama)"));
  }
  const std::string p = arch + ".";
  LlamaConfig c;
  VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "block_count", &c.num_hidden_layers));
  VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "embedding_length", &c.hidden_size));
  VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "feed_forward_length", &c.intermediate_size));
  VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "attention.head_count", &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  if (g.Find(p + "attention.head_count_kv")) {
    VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "attention.head_count_kv", &c.num_key_value_heads));
  }
  c.max_position_embeddings = 2048;
  if (g.Find(p + "context_length")) {
    VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "context_length", &c.max_position_embeddings));
  }
  if (g.Find(p + "attention.key_length")) {
    VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "attention.key_length", &c.head_dim));
  } else if (c.hidden_size % c.num_attention_heads == 0) {
    c.head_dim = c.hidden_size / c.num_attention_heads;
  } else {
    return Bad(g, "embedding_length is not a multiple of attention.head_count");
  }
  if (c.head_dim % 2 != 0 || c.num_attention_heads % c.num_key_value_heads != 0) {
    return Bad(g, absl::StrCat("head_dim ", c.head_dim, " odd or ", c.num_attention_heads,
                               " heads not a multiple of ", c.num_key_value_heads, " KV heads"));
  }
  if (g.Find(p + "rope.dimension_count")) {
    int rope_dims = 0;
    VQKV_RETURN_IF_ERROR(PositiveInt(g, p + "rope.dimension_count", &rope_dims));
    if (rope_dims != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat("gguf ", g.what(), ": partial RoPE (", rope_dims,
                                                   " of ", c.head_dim, " dims)"));
    }
  }
  if (g.Find(p + "rope.freq_base")) {
    VQKV_ASSIGN_OR_RETURN(c.rope_theta, g.GetFloat(p + "rope.freq_base"));
  }
  if (!(c.rope_theta > 0)) return Bad(g, "rope.freq_base must be positive");
  VQKV_ASSIGN_OR_RETURN(double eps, g.GetFloat(p + "attention.layer_norm_rms_epsilon"));
  c.rms_norm_eps = static_cast<float>(eps);
  if (g.Find(p + "rope.scaling.type")) {
    VQKV_ASSIGN_OR_RETURN(std::string type, g.GetString(p + "rope.scaling.type"));
    if (type == "linear") {
      c.rope_scaling = RopeScaling::kLinear;
      VQKV_ASSIGN_OR_RETURN(c.rope_factor, g.GetFloat(p + "rope.scaling.factor"));
      if (!(c.rope_factor > 0)) return Bad(g, "rope.scaling.factor must be positive");
    } else if (type != "none") {
      return absl::UnimplementedError(
          absl::StrCat("gguf ", g.what(), ": rope.scaling.type '", type, "'"));
    }
  }
  if (g.FindTensor("rope_freqs.weight") != nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("gguf ", g.what(), ": rope_freqs (LLaMA-3.1 RoPE scaling) not supported"));
  }
  const GgufTensorInfo* embd = g.FindTensor("token_embd.weight");
  if (embd == nullptr || embd->dims.size() != 2) return Bad(g, "no 2-d token_embd.weight");
  c.vocab_size = static_cast<int>(embd->dims[1]);
  c.tie_word_embeddings = g.FindTensor("output.weight") == nullptr;
  if (g.Find("tokenizer.ggml.bos_token_id")) {
    VQKV_ASSIGN_OR_RETURN(int64_t bos, g.GetInt("tokenizer.ggml.bos_token_id"));
    c.bos_token_id = static_cast<int>(bos);
  }
  if (g.Find("tokenizer.ggml.eos_token_id")) {
    VQKV_ASSIGN_OR_RETURN(int64_t eos, g.GetInt("tokenizer.ggml.eos_token_id"));
    c.eos_token_ids.push_back(static_cast<int>(eos));
  }
  // A plain-text continuation also ends at the document separator.
  if (auto tokens = g.GetStringArray("tokenizer.ggml.tokens"); tokens.ok()) {
    const auto it = std::find(tokens->begin(), tokens->end(), "<|endoftext|>");
    if (it != tokens->end() && !c.IsEos(static_cast<int>(it - tokens->begin()))) {
      c.eos_token_ids.push_back(static_cast<int>(it - tokens->begin()));
    }
  }
  return c;
}

absl::StatusOr<LlamaWeights> LlamaWeightsFromGguf(const GgufFile& g, const LlamaConfig& c) {
  const int64_t h = c.hidden_size, qd = int64_t{c.num_attention_heads} * c.head_dim,
                kvd = int64_t{c.num_key_value_heads} * c.head_dim, ff = c.intermediate_size;
  LlamaWeights w;
  w.layers.resize(c.num_hidden_layers);
  std::vector<Job> jobs;
  jobs.push_back({"token_embd.weight", {h, c.vocab_size}, &w.embed_tokens});
  jobs.push_back({"output_norm.weight", {h}, &w.norm});
  if (!c.tie_word_embeddings) jobs.push_back({"output.weight", {h, c.vocab_size}, &w.lm_head.w});
  w.lm_head.in = static_cast<int>(h);
  w.lm_head.out = c.vocab_size;
  auto linear = [&](LinearWeights* l, const std::string& name, int64_t out, int64_t in,
                    int rope_heads) {
    l->in = static_cast<int>(in);
    l->out = static_cast<int>(out);
    jobs.push_back({name, {in, out}, &l->w, rope_heads});
  };
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("blk.", i, ".");
    LlamaLayerWeights& l = w.layers[i];
    jobs.push_back({p + "attn_norm.weight", {h}, &l.input_layernorm});
    jobs.push_back({p + "ffn_norm.weight", {h}, &l.post_attention_layernorm});
    linear(&l.q_proj, p + "attn_q.weight", qd, h, c.num_attention_heads);
    linear(&l.k_proj, p + "attn_k.weight", kvd, h, c.num_key_value_heads);
    linear(&l.v_proj, p + "attn_v.weight", kvd, h, 0);
    linear(&l.o_proj, p + "attn_output.weight", h, qd, 0);
    linear(&l.gate_proj, p + "ffn_gate.weight", ff, h, 0);
    linear(&l.up_proj, p + "ffn_up.weight", ff, h, 0);
    linear(&l.down_proj, p + "ffn_down.weight", h, ff, 0);
  }
  for (const Job& j : jobs) {
    const GgufTensorInfo* t = g.FindTensor(j.name);
    if (t == nullptr) return Bad(g, absl::StrCat("missing tensor ", j.name));
    if (t->dims != j.dims) {
      return Bad(g, absl::StrCat("tensor ", j.name, " has dims [", absl::StrJoin(t->dims, ", "),
                                 "], expected [", absl::StrJoin(j.dims, ", "), "]"));
    }
  }
  std::mutex mu;
  absl::Status status;
  ParallelFor(static_cast<int64_t>(jobs.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Job& j = jobs[i];
      absl::StatusOr<std::vector<float>> data = g.ReadFloat(j.name);
      if (!data.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        status.Update(data.status());
        return;
      }
      if (j.rope_heads > 0) {
        UnpermuteRopeRows(&*data, j.rope_heads, c.head_dim, static_cast<int>(j.dims[0]));
      }
      *j.dest = std::move(*data);
    }
  });
  VQKV_RETURN_IF_ERROR(status);
  return w;
}

absl::StatusOr<LlamaModel> LoadGgufModel(const std::string& path) {
  VQKV_ASSIGN_OR_RETURN(GgufFile g, GgufFile::Open(path));
  VQKV_ASSIGN_OR_RETURN(LlamaConfig config, LlamaConfigFromGguf(g));
  VQKV_ASSIGN_OR_RETURN(LlamaWeights weights, LlamaWeightsFromGguf(g, config));
  return LlamaModel::Create(std::move(config), std::move(weights));
}

}  // namespace vqkv::model
