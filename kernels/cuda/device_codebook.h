// A Codebook resident on one GPU: the exact fp32 tables and norms (for the exact rescore and
// fp32 decode) plus the prepared fp16 tables, score offsets and scales of the tensor-core
// encode and the fp16 decode (see rvq_kernels.h). LLaMA-3.1-8B's 56x1024 + 16x512 codebooks take
// 1.07 GB fp32 + 0.55 GB fp16.
// Thread-safety: immutable after Create; share freely (its device memory is only read).
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/codebook.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {

class DeviceCodebook {
 public:
  // Uploads `cb` to the current device and prepares its tables (synchronizes before returning).
  // ResourceExhausted when the device lacks memory; Unavailable without a device.
  static absl::StatusOr<std::unique_ptr<DeviceCodebook>> Create(std::shared_ptr<const Codebook> cb);

  const Codebook& codebook() const { return *cb_; }
  const RvqConfig& config() const { return cb_->config(); }
  int device() const { return device_; }
  // Device array of tables in Codebook::TableIndex order.
  const RvqDeviceTable* tables() const { return tables_.as<RvqDeviceTable>(); }
  // The same descriptors on the host.
  const std::vector<RvqDeviceTable>& host_tables() const { return host_tables_; }
  int num_tables() const { return static_cast<int>(host_tables_.size()); }

 private:
  DeviceCodebook() = default;
  std::shared_ptr<const Codebook> cb_;
  int device_ = 0;
  DeviceBuffer storage_;  // every table's arrays, 256-byte aligned
  DeviceBuffer tables_;
  std::vector<RvqDeviceTable> host_tables_;
};

inline int RvqSizePad(int size) { return size < kRvqChunk ? kRvqChunk : size; }

}  // namespace vqkv::kernels::cuda
