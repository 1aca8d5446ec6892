// Reading and writing safetensors files: an 8-byte little-endian header length, a JSON header
// naming each tensor's dtype, shape and byte range, then the raw tensor bytes. Used for
// codebook files, K/V sample files and model weights.
// Thread-safety: a SafetensorsFile is immutable after Open() and may be read from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv {

struct TensorInfo {
  std::string dtype;  // "F32", "F16", "BF16", "I32", "U8", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offset inside the data section
  uint64_t end = 0;
};

class SafetensorsFile {
 public:
  // Reads and validates the whole file: header length within the file, JSON well formed, every
  // tensor's byte range inside the data section and equal to prod(shape) * dtype size, ranges
  // not overlapping. InvalidArgument (naming the file and the field) on any violation;
  // NotFound if the file is missing.
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);
  // Same, over bytes already in memory (`what` names the source in error messages).
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes, const std::string& what);

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool Has(const std::string& name) const { return tensors_.count(name) != 0; }

  // Tensor `name` converted to fp32 (F32, F16, BF16 accepted). NotFound / InvalidArgument.
  absl::StatusOr<std::vector<float>> ReadFloat(const std::string& name) const;
  // Raw bytes of tensor `name`.
  absl::StatusOr<std::string_view> Raw(const std::string& name) const;
  absl::StatusOr<TensorInfo> Info(const std::string& name) const;

 private:
  std::string bytes_;
  uint64_t data_offset_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Builds a safetensors file in memory.
class SafetensorsWriter {
 public:
  void AddF32(const std::string& name, std::vector<int64_t> shape, const float* data);
  void AddRaw(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
              std::string bytes);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // Serialized file (tensors in insertion order, header padded to 8 bytes).
  std::string Serialize() const;
  absl::Status WriteFile(const std::string& path) const;

 private:
  struct Entry {
    std::string name, dtype;
    std::vector<int64_t> shape;
    std::string bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Reads a whole file into a string. NotFound / Internal on failure.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes atomically (temp file + rename).
absl::Status WriteStringToFile(const std::string& path, std::string_view data);

}  // namespace vqkv
