// Registered models: geometry, codec choice, loaded codebooks and the codec instances built on
// them. Models and codebooks live in memory for the life of the daemon (a restart starts empty;
// vqkvd can preload them from its YAML config).
// Thread-safety: thread-safe; Model objects are shared and internally locked.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/dtype.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/kv.h"

namespace vqkv::service {

// A model's KV geometry and codec (validated).
struct ModelConfig {
  std::string model_id;
  int32_t layers = 0, kv_heads = 0, head_dim = 0;
  DType dtype = DType::kF16;
  int32_t block_tokens = 0;
  kernels::CodecSpec codec;  // codebook left empty
  std::string codec_string;  // canonical, e.g. "scalar-2:group=32,sinks=4"

  bool rvq() const { return codec.name == "rvq"; }
  kernels::KvShape Shape(int32_t tokens) const { return {layers, tokens, kv_heads, head_dim}; }
  // Bytes of one layer (K and V) of a block of `tokens` tokens in `dt`.
  int64_t LayerBytes(int32_t tokens, DType dt) const {
    return int64_t{2} * tokens * kv_heads * head_dim * static_cast<int64_t>(DTypeSize(dt));
  }
  bool SameAs(const ModelConfig& o) const;
  std::string DebugString() const;
};

// Creates a codec from a spec (kernels::CreateCodec, or ServiceOptions::codec_factory).
using CodecFactory =
    std::function<absl::StatusOr<std::unique_ptr<kernels::Codec>>(const kernels::CodecSpec&)>;

// A codec ready to use, and the codebook id it is keyed under ("" for non-rvq).
struct ResolvedCodec {
  std::shared_ptr<const kernels::Codec> codec;
  std::string codebook_id;
};

class Model {
 public:
  Model(ModelConfig config, std::shared_ptr<const kernels::Codec> plain_codec, CodecFactory factory)
      : config_(std::move(config)),
        plain_codec_(std::move(plain_codec)),
        factory_(std::move(factory)) {}
  const ModelConfig& config() const { return config_; }

  // The codec for `codebook_id` ("" = the active codebook for rvq; must be "" otherwise).
  // FailedPrecondition when an rvq model has no (such) codebook; InvalidArgument when a
  // codebook id is given for a non-rvq model.
  absl::StatusOr<ResolvedCodec> Resolve(const std::string& codebook_id) const;

  // Adds a codebook (geometry must match: InvalidArgument; non-rvq model: FailedPrecondition).
  // Returns whether it is active afterwards: with `activate`, or when it is the first one.
  absl::StatusOr<bool> AddCodebook(std::shared_ptr<const kernels::Codebook> codebook,
                                   bool activate);

  std::string active_codebook_id() const;
  std::vector<std::string> codebook_ids() const;

 private:
  const ModelConfig config_;
  const std::shared_ptr<const kernels::Codec> plain_codec_;  // non-rvq codecs
  const CodecFactory factory_;                               // builds rvq codecs per codebook
  mutable absl::Mutex mu_;
  std::map<std::string, ResolvedCodec> codebooks_ ABSL_GUARDED_BY(mu_);
  std::string active_ ABSL_GUARDED_BY(mu_);
};

// Validates a model description: positive geometry within limits, known dtype and codec with
// valid parameters. InvalidArgument naming the field otherwise; ResourceExhausted when one
// block of `block_tokens` tokens would exceed `max_block_bytes`.
absl::StatusOr<ModelConfig> MakeModelConfig(const std::string& model_id, int32_t layers,
                                            int32_t kv_heads, int32_t head_dim, DType dtype,
                                            int32_t block_tokens, const std::string& codec,
                                            int64_t max_block_bytes);

class ModelRegistry {
 public:
  // `factory` builds every codec (empty: kernels::CreateCodec).
  explicit ModelRegistry(CodecFactory factory = {});
  // Registers `config`. Returns true if created, false if an identical model exists;
  // AlreadyExists if a different one does.
  absl::StatusOr<bool> Register(const ModelConfig& config);
  // The model, or nullptr.
  std::shared_ptr<Model> Find(const std::string& model_id) const;
  std::vector<std::shared_ptr<Model>> All() const;

 private:
  const CodecFactory factory_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Model>> models_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vqkv::service
