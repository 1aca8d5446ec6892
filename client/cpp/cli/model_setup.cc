#include "client/cpp/cli/model_setup.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "model/gguf_model.h"
#include "model/gguf_tokenizer.h"
#include "model/text_data.h"

namespace vqkv::cli {

absl::StatusOr<ModelSetup> LoadModelSetup(const std::string& model_dir,
                                          const std::string& text_path) {
  if (model_dir.empty()) {
    return absl::NotFoundError(
        "no model: ../shared/models/tinystories-656k was not found; pass --model DIR (a "
        "LLaMA-architecture "
        "folder with config.json, model.safetensors and tokenizer.json)");
  }
  if (text_path.empty()) {
    return absl::NotFoundError(
        "no text: ../shared/data/tinystories/valid-dev.txt was not found; pass --text FILE");
  }
  // A .gguf file carries config, weights and tokenizer; a folder holds HF files.
  const bool gguf = absl::EndsWith(model_dir, ".gguf");
  absl::StatusOr<model::LlamaModel> m = absl::UnknownError("unset");
  absl::StatusOr<model::Tokenizer> tok = absl::UnknownError("unset");
  if (gguf) {
    auto file = model::GgufFile::Open(model_dir);
    if (!file.ok()) return file.status();
    auto config = model::LlamaConfigFromGguf(*file);
    if (!config.ok()) return config.status();
    auto weights = model::LlamaWeightsFromGguf(*file, *config);
    if (!weights.ok()) return weights.status();
    m = model::LlamaModel::Create(std::move(*config), std::move(*weights));
    tok = model::LoadGgufTokenizer(*file);
  } else {
    m = model::LlamaModel::Load(model_dir);
    tok = model::Tokenizer::Load(model_dir + "/tokenizer.json");
  }
  if (!m.ok()) return m.status();
  if (!tok.ok()) return tok.status();
  auto stories = model::LoadStories(text_path);
  if (!stories.ok()) return stories.status();
  if (stories->empty())
    return absl::InvalidArgumentError(absl::StrCat("text '", text_path, "' holds no stories"));
  return ModelSetup{model_dir, std::move(*m), std::move(*tok), std::move(*stories)};
}

absl::StatusOr<std::vector<std::string>> SelectPart(const std::vector<std::string>& stories,
                                                    const std::string& part) {
  const size_t half = stories.size() / 2;
  if (part == "all") return stories;
  if (part == "first-half")
    return std::vector<std::string>(stories.begin(), stories.begin() + half);
  if (part == "second-half") return std::vector<std::string>(stories.begin() + half, stories.end());
  return absl::InvalidArgumentError(
      absl::StrCat("--part must be first-half, second-half or all, got '", part, "'"));
}

kernels::CodeSpaceOptions CodeSpaceForModel(const model::LlamaModel& model, bool key_rope,
                                            bool key_scale, bool value_scale, double exponent) {
  const model::LlamaConfig& c = model.config();
  kernels::CodeSpaceOptions o;
  o.exponent = exponent;
  if (key_rope) {
    for (double f : model::RopeInverseFrequencies(c)) o.key_rope_inv_freq.push_back(float(f));
  }
  o.key_query_scale = key_scale;
  if (value_scale) {
    const int heads = c.num_attention_heads, kvh = c.num_key_value_heads, dim = c.head_dim;
    const int group = heads / kvh;
    for (const model::LlamaLayerWeights& lw : model.weights().layers) {
      const model::LinearWeights& wo = lw.o_proj;  // [hidden, heads * head_dim]
      std::vector<float> e(size_t(kvh) * dim, 0.f);
      std::vector<double> col(size_t(heads) * dim, 0.0);
      for (int i = 0; i < wo.out; ++i) {
        const float* row = wo.w.data() + int64_t{i} * wo.in;
        for (int j = 0; j < wo.in; ++j) col[j] += double(row[j]) * row[j];
      }
      for (int qh = 0; qh < heads; ++qh) {
        for (int d = 0; d < dim; ++d)
          e[size_t(qh / group) * dim + d] += float(col[size_t(qh) * dim + d]);
      }
      o.value_energy.push_back(std::move(e));
    }
  }
  return o;
}

std::vector<FlagSpec> GenerateFlags(const std::string& owner) {
  return {{"generate-temperature", "0.8", owner + ": sampling temperature (0: greedy)"},
          {"generate-top-p", "0.9", owner + ": nucleus sampling mass"},
          {"generate-seed", "1", owner + ": random seed"},
          {"generate-prompt", "24", owner + ": prompt tokens taken from each story (BOS included)"},
          {"generate-story", "320", owner + ": tokens per model-written story at most"}};
}

absl::StatusOr<eval::GenerateOptions> GenerateOptionsFromFlags(const Flags& f, int64_t tokens) {
  eval::GenerateOptions go;
  go.tokens = tokens;
  VQKV_ASSIGN_OR_RETURN(int64_t prompt, f.Int("generate-prompt"));
  VQKV_ASSIGN_OR_RETURN(int64_t story, f.Int("generate-story"));
  VQKV_ASSIGN_OR_RETURN(int64_t seed, f.Int("generate-seed"));
  double temperature = 0, top_p = 0;
  if (!absl::SimpleAtod(f.Str("generate-temperature"), &temperature) || !(temperature >= 0) ||
      temperature > 10) {
    return absl::InvalidArgumentError("--generate-temperature must be a number in [0, 10]");
  }
  if (!absl::SimpleAtod(f.Str("generate-top-p"), &top_p) || !(top_p > 0) || top_p > 1) {
    return absl::InvalidArgumentError("--generate-top-p must be a number in (0, 1]");
  }
  if (tokens < 0 || prompt < 1 || story <= prompt || story > (1 << 20)) {
    return absl::InvalidArgumentError(
        "the token count must be >= 0, --generate-prompt >= 1 and --generate-story > "
        "--generate-prompt");
  }
  go.prompt_tokens = int(prompt);
  go.max_story_tokens = int(story);
  go.sample.temperature = float(temperature);
  go.sample.top_p = float(top_p);
  go.sample.seed = uint64_t(seed);
  return go;
}

std::string JoinStories(const std::vector<std::string>& stories) {
  return absl::StrJoin(stories, absl::StrCat("\n", std::string(model::kStorySeparator), "\n"));
}

}  // namespace vqkv::cli
