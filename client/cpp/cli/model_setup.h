// Loading the model, tokenizer and story text for the CLI's model-based commands, with the
// defaults and error messages users see.
// Thread-safety: plain functions.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/cpp/cli/flags.h"
#include "client/cpp/eval/fidelity_eval.h"
#include "kernels/rvq_fit.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace vqkv::cli {

struct ModelSetup {
  std::string model_dir;
  model::LlamaModel model;
  model::Tokenizer tokenizer;
  std::vector<std::string> stories;
};

// Loads `model_dir` (config.json, model.safetensors, tokenizer.json; or a LLaMA-architecture
// .gguf file, see model/gguf_model.h) and the stories of
// `text_path`. NotFound with a hint naming --model/--text when either is missing.
absl::StatusOr<ModelSetup> LoadModelSetup(const std::string& model_dir,
                                          const std::string& text_path);

// "first-half", "second-half" or "all" of the stories.
absl::StatusOr<std::vector<std::string>> SelectPart(const std::vector<std::string>& stories,
                                                    const std::string& part);

// Code-space options for codebooks of `model` (kernels/codebook.h CodeSpace): keys before RoPE
// with the model's inverse frequencies, key channels weighted by the calibration queries, value
// channels weighted by the output projection's squared column norms (summed over the query heads
// that read each KV head).
kernels::CodeSpaceOptions CodeSpaceForModel(const model::LlamaModel& model, bool key_rope,
                                            bool key_scale, bool value_scale, double exponent);

// The --generate-* flags of model-written stories (eval::GenerateStories), shared by `capture
// --generate` and `fidelity --calib-generate`; `owner` names the flag they qualify.
std::vector<FlagSpec> GenerateFlags(const std::string& owner);
// Options from those flags for `tokens` tokens; InvalidArgument naming the flag that is out of
// range.
absl::StatusOr<eval::GenerateOptions> GenerateOptionsFromFlags(const Flags& f, int64_t tokens);
// Stories joined in the story file format (model/text_data.h): a file written from it loads back
// as the same stories after SplitStories().
std::string JoinStories(const std::vector<std::string>& stories);

}  // namespace vqkv::cli
