#include "model/llama_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numbers>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "model/json_util.h"

namespace vqkv::model {
namespace {

using json = json_util::json;

absl::Status Bad(const std::string& what, const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("config ", what, ": ", msg));
}

// Reads a positive integer field; `fallback` <= 0 means the field is required.
absl::Status GetPositiveInt(const json& j, const char* key, int fallback, const std::string& what,
                            int* out) {
  if (!j.contains(key) || j[key].is_null()) {
    if (fallback > 0) {
      *out = fallback;
      return absl::OkStatus();
    }
    return Bad(what, absl::StrCat("missing ", key));
  }
  if (!j[key].is_number_integer() || j[key].get<int64_t>() <= 0 ||
      j[key].get<int64_t>() > (int64_t{1} << 30)) {
    return Bad(what, absl::StrCat(key, " must be a positive integer, got ", j[key].dump()));
  }
  *out = j[key].get<int>();
  return absl::OkStatus();
}

absl::Status GetNumber(const json& j, const char* key, const std::string& what, double* out) {
  if (!j.contains(key) || j[key].is_null()) return absl::OkStatus();  // keep default
  if (!j[key].is_number()) return Bad(what, absl::StrCat(key, " must be a number"));
  *out = j[key].get<double>();
  return absl::OkStatus();
}

}  // namespace

bool LlamaConfig::IsEos(int id) const {
  return std::find(eos_token_ids.begin(), eos_token_ids.end(), id) != eos_token_ids.end();
}

absl::StatusOr<LlamaConfig> ParseLlamaConfig(const std::string& json_text,
                                             const std::string& what) {
  const json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad(what, "not a JSON object");
  if (const json* type = json_util::Field(j, "model_type"); type && *type != "llama") {
    return absl::UnimplementedError(
        absl::StrCat("config ", what, ": model_type ", type->dump(), " (only llama)"));
  }
  const std::string act = json_util::StringOr(j, "hidden_act", "silu");
  if (act != "silu") {
    return absl::UnimplementedError(absl::StrCat("config ", what, ": hidden_act ", act));
  }
  LlamaConfig c;
  VQKV_RETURN_IF_ERROR(GetPositiveInt(j, "hidden_size", 0, what, &c.hidden_size));
  VQKV_RETURN_IF_ERROR(GetPositiveInt(j, "intermediate_size", 0, what, &c.intermediate_size));
  VQKV_RETURN_IF_ERROR(GetPositiveInt(j, "num_hidden_layers", 0, what, &c.num_hidden_layers));
  VQKV_RETURN_IF_ERROR(GetPositiveInt(j, "num_attention_heads", 0, what, &c.num_attention_heads));
  VQKV_RETURN_IF_ERROR(GetPositiveInt(j, "num_key_value_heads", c.num_attention_heads, what,
                                      &c.num_key_value_heads));
  VQKV_RETURN_IF_ERROR(GetPositiveInt(j, "vocab_size", 0, what, &c.vocab_size));
  VQKV_RETURN_IF_ERROR(
      GetPositiveInt(j, "max_position_embeddings", 2048, what, &c.max_position_embeddings));
  if (c.hidden_size % c.num_attention_heads != 0 && !json_util::Field(j, "head_dim")) {
    return Bad(what, "hidden_size is not a multiple of num_attention_heads");
  }
  VQKV_RETURN_IF_ERROR(
      GetPositiveInt(j, "head_dim", c.hidden_size / c.num_attention_heads, what, &c.head_dim));
  if (c.head_dim % 2 != 0) return Bad(what, absl::StrCat("head_dim ", c.head_dim, " is odd"));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Bad(what,
               absl::StrCat("num_attention_heads ", c.num_attention_heads,
                            " is not a multiple of num_key_value_heads ", c.num_key_value_heads));
  }
  double eps = c.rms_norm_eps;
  VQKV_RETURN_IF_ERROR(GetNumber(j, "rms_norm_eps", what, &eps));
  c.rms_norm_eps = static_cast<float>(eps);
  VQKV_RETURN_IF_ERROR(GetNumber(j, "rope_theta", what, &c.rope_theta));
  if (!(c.rope_theta > 0)) return Bad(what, "rope_theta must be positive");
  c.tie_word_embeddings = json_util::BoolOr(j, "tie_word_embeddings", false);
  c.attention_bias = json_util::BoolOr(j, "attention_bias", false);
  c.mlp_bias = json_util::BoolOr(j, "mlp_bias", false);
  c.bos_token_id = json_util::IntOr(j, "bos_token_id", -1);
  if (const json* e = json_util::Field(j, "eos_token_id")) {
    if (e->is_number_integer()) {
      c.eos_token_ids.push_back(json_util::IntOr(j, "eos_token_id", -1));
    } else if (e->is_array()) {
      for (const json& x : *e) {
        if (x.is_number_integer()) c.eos_token_ids.push_back(x.get<int>());
      }
    }
  }
  if (const json* rsp = json_util::Field(j, "rope_scaling"); rsp && rsp->is_object()) {
    const json& rs = *rsp;
    const std::string type =
        json_util::StringOr(rs, "rope_type", json_util::StringOr(rs, "type", "default"));
    VQKV_RETURN_IF_ERROR(GetNumber(rs, "factor", what, &c.rope_factor));
    if (type == "default") {
      c.rope_scaling = RopeScaling::kNone;
    } else if (type == "linear") {
      c.rope_scaling = RopeScaling::kLinear;
    } else if (type == "llama3") {
      c.rope_scaling = RopeScaling::kLlama3;
      VQKV_RETURN_IF_ERROR(GetNumber(rs, "low_freq_factor", what, &c.rope_low_freq_factor));
      VQKV_RETURN_IF_ERROR(GetNumber(rs, "high_freq_factor", what, &c.rope_high_freq_factor));
      VQKV_RETURN_IF_ERROR(GetPositiveInt(rs, "original_max_position_embeddings", 8192, what,
                                          &c.rope_original_max_position));
      if (!(c.rope_high_freq_factor > c.rope_low_freq_factor)) {
        return Bad(what, "rope_scaling high_freq_factor must exceed low_freq_factor");
      }
    } else {
      return absl::UnimplementedError(absl::StrCat("config ", what, ": rope_scaling type ", type));
    }
    if (!(c.rope_factor > 0)) return Bad(what, "rope_scaling factor must be positive");
  }
  return c;
}

absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path) {
  if (!std::filesystem::exists(path)) {
    return absl::NotFoundError(absl::StrCat("model config not found: ", path));
  }
  VQKV_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseLlamaConfig(text, path);
}

std::vector<double> RopeInverseFrequencies(const LlamaConfig& config) {
  const int half = config.head_dim / 2;
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) {
    inv[i] = std::pow(config.rope_theta, -2.0 * i / config.head_dim);
  }
  if (config.rope_scaling == RopeScaling::kLinear) {
    for (double& f : inv) f /= config.rope_factor;
  } else if (config.rope_scaling == RopeScaling::kLlama3) {
    // Same piecewise rule as HF's _compute_llama3_parameters.
    const double old_len = config.rope_original_max_position;
    const double low_wavelen = old_len / config.rope_low_freq_factor;
    const double high_wavelen = old_len / config.rope_high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= config.rope_factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_len / wavelen - config.rope_low_freq_factor) /
                              (config.rope_high_freq_factor - config.rope_low_freq_factor);
        f = (1 - smooth) * f / config.rope_factor + smooth * f;
      }
    }
  }
  return inv;
}

}  // namespace vqkv::model
