// vqkv::Client: the C++ client of vqkvd (gRPC service vqkv.v1.Vqkv).
//
// Every call has a deadline (ClientOptions::timeout) and is retried with jittered exponential
// backoff when the daemon answers UNAVAILABLE or CANCELLED (the client never cancels its own
// calls; a daemon that is shutting down cancels calls arriving as it closes), or
// RESOURCE_EXHAUSTED with the vqkv-retry-after-ms trailer (busy). Retrying is safe for every call:
// puts are atomic and idempotent (a block hash names content), gets and lookups read only. Large
// payloads are split into chunks of ClientOptions::chunk_bytes and streamed; the channel accepts
// messages up to 64 MiB each way.
//
// Thread-safety: a Client is thread-safe; share one per process and target. Async calls run on
// their own threads and return futures; the data they point to must stay alive until the
// future is ready.
#pragma once

#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "vqkv/v1/vqkv.pb.h"

namespace vqkv::client {

struct ClientOptions {
  std::string target = "127.0.0.1:50051";  // HOST:PORT of vqkvd
  std::string tenant;                      // "" = "default"
  absl::Duration timeout = absl::Seconds(120);
  int max_attempts = 5;  // 1 = no retries
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(2);
  int64_t chunk_bytes = 4 << 20;  // <= 32 MiB
  // Put splits a batch into PutBlocks calls of at most this many data bytes (each call is atomic;
  // keep it under the daemon's max_inflight_bytes).
  int64_t max_call_bytes = int64_t{256} << 20;
  // Use a TCP connection of its own instead of sharing one with other Clients of the same
  // target in this process (benchmarks of many clients).
  bool separate_connection = false;
};

// A model's KV geometry (see vqkv.proto ModelSpec).
struct ModelInfo {
  std::string model_id;
  int32_t layers = 0, kv_heads = 0, head_dim = 0;
  DType dtype = DType::kF16;
  int32_t block_tokens = 0;
  std::string codec = "raw";
  // Logical bytes of a block of `tokens` tokens (0 = block_tokens).
  int64_t BlockBytes(int32_t tokens = 0) const;
};

// One block to put: the whole tensor [layers, 2, tokens, kv_heads, head_dim] in the model's
// dtype, a layer range of it, or (PutOptions::codes) a codec payload. Not owned.
struct BlockPut {
  std::string hash;
  int64_t first_token = 0;
  int32_t tokens = 0;  // 0: the model's block_tokens
  const void* data = nullptr;
  size_t bytes = 0;
  int32_t layer_begin = 0, layer_end = 0;  // tensor: the range `data` covers (0,0 = all)
};

struct PutOptions {
  std::string codebook_id;  // "" = the model's active codebook (rvq)
  bool codes = false;       // data are codec payloads, not tensors
  int32_t device = -1;      // GPU whose tier takes the blocks (-1: the daemon's choice)
};

struct PutResult {
  int64_t stored = 0, existing = 0, stored_bytes = 0, logical_bytes = 0;
  std::string codebook_id;
};

struct GetOptions {
  std::string codebook_id;
  bool codes = false;                      // return payloads, not tensors
  DType dtype = DType::kF16;               // tensor dtype
  bool model_dtype = true;                 // ignore `dtype`, use the model's
  int32_t layer_begin = 0, layer_end = 0;  // (0,0 = all)
  bool allow_missing = false;              // missing blocks come back with found = false
  int32_t max_chunk_bytes = 0;             // 0: the server default
  int32_t device = -1;  // GPU to move the codes to and decode on (-1: where each block is)
};

struct BlockGot {
  bool found = false;
  std::string data;
  int32_t tokens = 0;
  int64_t first_token = 0;
  v1::Tier tier = v1::TIER_UNSPECIFIED;
  int32_t device = -1;  // GPU the block was read from (-1: not a GPU tier)
  std::string codec, codebook_id;
};

struct LookupResult {
  int32_t prefix_blocks = 0;
  std::vector<v1::Tier> tiers;
  std::vector<int32_t> devices;  // GPU of each block (-1: not in a GPU tier)
};

struct FitParams {
  std::string model_id;
  std::string k_stages = "4x256", v_stages = "2x256";
  int iterations = 0;
  uint64_t seed = 0;
  bool per_head = false;
  bool activate = true;
  int32_t use_stored_blocks = 0;
  // > 0: code keys before RoPE with this rope_theta (see FitParams.key_rope_theta in the proto).
  double key_rope_theta = 0;
};

// A calibration tensor [layers, 2, tokens, kv_heads, head_dim] in `dtype`. Not owned.
struct SampleView {
  int32_t tokens = 0;
  DType dtype = DType::kF16;
  const void* data = nullptr;
  size_t bytes = 0;
  int64_t first_token = 0;  // sequence position of token 0
};

class Client {
 public:
  // Creates a channel to options.target (no I/O yet). InvalidArgument for bad options.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  virtual ~Client() = default;

  // Waits until the channel is connected (or `timeout` passes: DeadlineExceeded).
  virtual absl::Status WaitReady(absl::Duration timeout) = 0;

  // Registers the model; returns the canonical codec string. AlreadyExists on a conflicting spec.
  virtual absl::StatusOr<v1::RegisterModelResponse> RegisterModel(const ModelInfo& model) = 0;
  // Uploads a codebook file's bytes; returns its id.
  virtual absl::StatusOr<v1::UploadCodebookResponse> UploadCodebook(const std::string& model_id,
                                                                    const std::string& bytes,
                                                                    bool activate) = 0;
  // Fits a codebook on the daemon from `samples` (and/or stored blocks). `progress` (optional)
  // gets each progress message.
  virtual absl::StatusOr<v1::FitCodebookResponse> FitCodebook(
      const FitParams& params, absl::Span<const SampleView> samples,
      const std::function<void(const v1::FitCodebookResponse&)>& progress) = 0;

  // Stores blocks. Atomic when the batch fits in one call (max_call_bytes); a larger batch is
  // split at block boundaries into several atomic calls, and an error leaves the calls before it
  // stored. Parts of one block (layer ranges) must be adjacent in `blocks`.
  virtual absl::StatusOr<PutResult> Put(const ModelInfo& model, absl::Span<const BlockPut> blocks,
                                        const PutOptions& options = {}) = 0;
  // Reads blocks in order. NotFound if one is missing (unless allow_missing).
  virtual absl::StatusOr<std::vector<BlockGot>> Get(const std::string& model_id,
                                                    absl::Span<const std::string> hashes,
                                                    const GetOptions& options = {}) = 0;
  virtual absl::StatusOr<LookupResult> Lookup(const std::string& model_id,
                                              absl::Span<const std::string> hashes,
                                              const std::string& codebook_id = "") = 0;
  // Deletes the given blocks (or every block of the model when `hashes` is empty and `all`).
  virtual absl::StatusOr<int64_t> Delete(const std::string& model_id,
                                         absl::Span<const std::string> hashes,
                                         bool all = false) = 0;
  virtual absl::StatusOr<v1::GetStatsResponse> Stats() = 0;

  // Async variants (std::async); inputs must outlive the future.
  std::future<absl::StatusOr<PutResult>> PutAsync(const ModelInfo& model,
                                                  absl::Span<const BlockPut> blocks,
                                                  const PutOptions& options = {});
  std::future<absl::StatusOr<std::vector<BlockGot>>> GetAsync(const std::string& model_id,
                                                              absl::Span<const std::string> hashes,
                                                              const GetOptions& options = {});
};

// Chained block hashes of a token sequence (vLLM-style: each block's hash covers its parent's
// hash, its token ids and `extra`): 16 bytes each, one per full block of `block_tokens`.
std::vector<std::string> BlockHashChain(absl::Span<const int32_t> tokens, int block_tokens,
                                        const std::string& extra = "");

}  // namespace vqkv::client
