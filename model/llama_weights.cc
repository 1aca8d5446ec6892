#include "model/llama_weights.h"

#include <filesystem>
#include <map>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace vqkv::model {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The tensors of a checkpoint, possibly spread over several shard files.
class TensorSource {
 public:
  static absl::StatusOr<TensorSource> Open(const std::string& dir) {
    TensorSource src;
    const fs::path single = fs::path(dir) / "model.safetensors";
    const fs::path index = fs::path(dir) / "model.safetensors.index.json";
    if (fs::exists(single)) {
      VQKV_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(single.string()));
      src.files_.push_back(std::make_unique<SafetensorsFile>(std::move(f)));
      src.paths_.push_back(single.string());
    } else if (fs::exists(index)) {
      VQKV_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index.string()));
      const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(index.string(), ": no weight_map object"));
      }
      std::map<std::string, int> shard_index;
      for (const auto& [name, shard] : j["weight_map"].items()) {
        if (!shard.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(index.string(), ": weight_map entry ", name, " is not a file name"));
        }
        const std::string file = shard.get<std::string>();
        if (!shard_index.count(file)) {
          const fs::path p = fs::path(dir) / file;
          if (!fs::exists(p)) {
            return absl::NotFoundError(absl::StrCat("model shard not found: ", p.string()));
          }
          VQKV_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(p.string()));
          shard_index[file] = static_cast<int>(src.files_.size());
          src.files_.push_back(std::make_unique<SafetensorsFile>(std::move(f)));
          src.paths_.push_back(p.string());
        }
      }
    } else {
      return absl::NotFoundError(absl::StrCat("model weights not found: ", single.string(),
                                              " (nor ", index.string(), ")"));
    }
    return src;
  }

  bool Has(const std::string& name) const { return Find(name) >= 0; }

  // Tensor `name` as fp32, checked against `shape`.
  absl::StatusOr<std::vector<float>> Read(const std::string& name,
                                          const std::vector<int64_t>& shape) const {
    const int f = Find(name);
    if (f < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("missing tensor '", name, "' in ", absl::StrJoin(paths_, ", ")));
    }
    VQKV_ASSIGN_OR_RETURN(TensorInfo info, files_[f]->Info(name));
    if (info.shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' has shape [", absl::StrJoin(info.shape, ", "),
                       "], expected [", absl::StrJoin(shape, ", "), "] (", paths_[f], ")"));
    }
    auto data = files_[f]->ReadFloat(name);
    if (!data.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "': ", data.status().message()));
    }
    return data;
  }

 private:
  int Find(const std::string& name) const {
    for (size_t i = 0; i < files_.size(); ++i) {
      if (files_[i]->Has(name)) return static_cast<int>(i);
    }
    return -1;
  }

  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::string> paths_;
};

absl::StatusOr<LinearWeights> ReadLinear(const TensorSource& src, const std::string& prefix,
                                         int out, int in, bool bias) {
  LinearWeights l;
  l.in = in;
  l.out = out;
  VQKV_ASSIGN_OR_RETURN(l.w, src.Read(prefix + ".weight", {out, in}));
  if (bias) {
    VQKV_ASSIGN_OR_RETURN(l.b, src.Read(prefix + ".bias", {out}));
  }
  return l;
}

}  // namespace

absl::StatusOr<LlamaWeights> LoadLlamaWeights(const std::string& dir, const LlamaConfig& c) {
  if (!fs::is_directory(dir)) {
    return absl::NotFoundError(absl::StrCat("model directory not found: ", dir));
  }
  VQKV_ASSIGN_OR_RETURN(TensorSource src, TensorSource::Open(dir));
  const int h = c.hidden_size, qd = c.num_attention_heads * c.head_dim,
            kvd = c.num_key_value_heads * c.head_dim, ff = c.intermediate_size;
  LlamaWeights w;
  const std::string embed = "model.embed_tokens.weight", head = "lm_head.weight";
  const std::vector<int64_t> vocab_shape = {c.vocab_size, h};
  if (c.tie_word_embeddings) {
    const std::string& name = src.Has(embed) ? embed : (src.Has(head) ? head : embed);
    VQKV_ASSIGN_OR_RETURN(w.embed_tokens, src.Read(name, vocab_shape));
  } else {
    VQKV_ASSIGN_OR_RETURN(w.embed_tokens, src.Read(embed, vocab_shape));
    VQKV_ASSIGN_OR_RETURN(w.lm_head.w, src.Read(head, vocab_shape));
  }
  w.lm_head.in = h;
  w.lm_head.out = c.vocab_size;
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LlamaLayerWeights l;
    VQKV_ASSIGN_OR_RETURN(l.input_layernorm, src.Read(p + "input_layernorm.weight", {h}));
    VQKV_ASSIGN_OR_RETURN(l.post_attention_layernorm,
                          src.Read(p + "post_attention_layernorm.weight", {h}));
    const bool ab = c.attention_bias, mb = c.mlp_bias;
    VQKV_ASSIGN_OR_RETURN(l.q_proj, ReadLinear(src, p + "self_attn.q_proj", qd, h, ab));
    VQKV_ASSIGN_OR_RETURN(l.k_proj, ReadLinear(src, p + "self_attn.k_proj", kvd, h, ab));
    VQKV_ASSIGN_OR_RETURN(l.v_proj, ReadLinear(src, p + "self_attn.v_proj", kvd, h, ab));
    VQKV_ASSIGN_OR_RETURN(l.o_proj, ReadLinear(src, p + "self_attn.o_proj", h, qd, ab));
    VQKV_ASSIGN_OR_RETURN(l.gate_proj, ReadLinear(src, p + "mlp.gate_proj", ff, h, mb));
    VQKV_ASSIGN_OR_RETURN(l.up_proj, ReadLinear(src, p + "mlp.up_proj", ff, h, mb));
    VQKV_ASSIGN_OR_RETURN(l.down_proj, ReadLinear(src, p + "mlp.down_proj", h, ff, mb));
    w.layers.push_back(std::move(l));
  }
  VQKV_ASSIGN_OR_RETURN(w.norm, src.Read("model.norm.weight", {h}));
  return w;
}

}  // namespace vqkv::model
