// A reader for GGUF files (llama.cpp's model format, versions 2 and 3): header, metadata
// key/values of every type (arrays included), tensor infos, alignment and data offsets. Every
// length, count and offset is checked against the file size, so a truncated or hostile file
// yields InvalidArgument naming the file and the field, never a crash or a huge allocation.
// Thread-safety: a GgufFile is immutable after Open()/Parse() and may be read from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::model {

// GGUF metadata value types (gguf_type in ggml).
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// One metadata value. Scalars live in `i` (signed/unsigned integers and bool; uint64 values
// above INT64_MAX are kept in `u`), `f` (floats) or `s` (strings); arrays keep their element
// type and elements.
struct GgufValue {
  GgufType type = GgufType::kUint8;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string s;
  GgufType elem_type = GgufType::kUint8;  // kArray only
  std::vector<GgufValue> array;           // kArray only

  bool is_integer() const;  // any integer type (not bool)
  bool is_float() const { return type == GgufType::kFloat32 || type == GgufType::kFloat64; }
};

// ggml tensor types this project knows by name (ggml_type numbering).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kBF16 = 30,
};

// Name of a ggml type id ("Q4_1", or "type 14" for ones without a name here).
std::string GgmlTypeName(uint32_t type);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] varies fastest (row length)
  uint32_t type = 0;          // ggml_type id
  uint64_t offset = 0;        // relative to the data section
  uint64_t bytes = 0;         // 0 when the type's block size is unknown to this reader
  int64_t elements() const;
};

class GgufFile {
 public:
  // Reads `path` whole and parses it. NotFound when the file is missing; InvalidArgument
  // (naming the file) for anything malformed.
  static absl::StatusOr<GgufFile> Open(const std::string& path);
  // Parses bytes already in memory; `what` names the source in error messages.
  static absl::StatusOr<GgufFile> Parse(std::string bytes, const std::string& what);

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  // Metadata value `key`, or nullptr.
  const GgufValue* Find(const std::string& key) const;
  // Typed accessors: NotFound when the key is absent; InvalidArgument when its type differs
  // (any integer type is accepted by GetInt, integers and floats by GetFloat; GetInt also
  // rejects values outside int64).
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;
  absl::StatusOr<double> GetFloat(const std::string& key) const;
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  // Array of strings `key`.
  absl::StatusOr<std::vector<std::string>> GetStringArray(const std::string& key) const;

  // Tensor info by name, or nullptr.
  const GgufTensorInfo* FindTensor(const std::string& name) const;
  // Raw bytes of tensor `name` (type-specific layout). NotFound when absent; Unimplemented when
  // its type's size is unknown to this reader.
  absl::StatusOr<std::string_view> TensorData(const std::string& name) const;
  // Tensor `name` dequantized to fp32 (row-major, dims[0] fastest); see gguf_dequant.h for
  // the supported types. NotFound / Unimplemented.
  absl::StatusOr<std::vector<float>> ReadFloat(const std::string& name) const;

  const std::string& what() const { return what_; }

 private:
  GgufFile() = default;

  std::string what_;
  std::shared_ptr<const std::string> bytes_;  // shared so that copies stay cheap
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace vqkv::model
