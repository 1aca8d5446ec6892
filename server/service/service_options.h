// Limits and tuning of the service layer (set from flags / YAML by vqkvd), and the two hooks
// through which vqkvd plugs in a GPU without the service seeing CUDA.
// Thread-safety: plain data; the hooks must be thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/rvq_fit.h"
#include "server/store/host_buffer.h"

namespace vqkv::service {

struct ServiceOptions {
  // Bytes held by unfinished puts (assembling and encoded blocks), gets (decoded batches) and
  // codebook uploads/fits together. Above it calls are refused with RESOURCE_EXHAUSTED + retry.
  int64_t max_inflight_bytes = int64_t{1} << 30;
  // Largest logical (uncompressed) block, and largest put call in blocks.
  int64_t max_block_bytes = int64_t{512} << 20;
  int64_t max_blocks_per_call = 65536;
  // Encode/decode batches: one codec call covers complete blocks up to this many logical bytes.
  int64_t codec_batch_bytes = int64_t{64} << 20;
  // Default and largest GetBlocks chunk.
  int32_t default_chunk_bytes = 4 << 20;
  int32_t max_chunk_bytes = 32 << 20;
  // Largest codebook upload and fit sample set (bytes).
  int64_t max_codebook_bytes = int64_t{1} << 30;
  // Suggested client back-off when busy.
  int32_t retry_after_ms = 50;

  // Builds the codec of a model (spec.name is the model's "raw", "scalar" or "rvq"). Empty:
  // kernels::CreateCodec. vqkvd with a GPU maps rvq and scalar to rvq-cuda / scalar-cuda here,
  // on the chosen device; the model's codec string stays the same (payloads are compatible).
  std::function<absl::StatusOr<std::unique_ptr<kernels::Codec>>(const kernels::CodecSpec&)>
      codec_factory;
  // With several GPUs: the devices the store has GPU tiers on, and a factory building a
  // model's codec on one of them. Each codec is then built once per device; puts encode and gets
  // decode on the device of the blocks (the default instance is the first device's). Empty:
  // codec_factory alone.
  std::vector<int> gpu_devices;
  std::function<absl::StatusOr<std::unique_ptr<kernels::Codec>>(const kernels::CodecSpec&,
                                                                int device)>
      device_codec_factory;
  // Buffers GetBlocks decodes into (null: the heap). vqkvd with a GPU passes pinned memory.
  std::shared_ptr<store::HostBufferAllocator> decode_buffers;
  // Fits FitCodebook's codebooks (empty: kernels::FitCodebook on the CPU). vqkvd with a GPU
  // runs the residual k-means on the device here.
  std::function<absl::StatusOr<kernels::Codebook>(
      const kernels::RvqConfig&, const kernels::KvSamples&, const kernels::FitOptions&)>
      fit_codebook;
};

}  // namespace vqkv::service
