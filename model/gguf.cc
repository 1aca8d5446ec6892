#include "model/gguf.h"

#include <cstring>
#include <filesystem>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "model/gguf_dequant.h"

namespace vqkv::model {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr int kMaxDims = 4;              // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 4;        // nested arrays deeper than this are refused

// A bounds-checked little-endian cursor over the file; every read fails cleanly at the end.
class Cursor {
 public:
  Cursor(const std::string& bytes, const std::string& what) : b_(bytes), what_(what) {}

  uint64_t pos() const { return pos_; }
  uint64_t left() const { return b_.size() - pos_; }

  absl::Status Error(const std::string& msg) const {
    return absl::InvalidArgumentError(
        absl::StrCat("gguf ", what_, ": ", msg, " (at byte ", pos_, " of ", b_.size(), ")"));
  }

  template <typename T>
  absl::Status Read(const char* field, T* out) {
    if (left() < sizeof(T)) return Error(absl::StrCat("truncated reading ", field));
    std::memcpy(out, b_.data() + pos_, sizeof(T));  // the format and the host are little-endian
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(const char* field, std::string* out) {
    uint64_t n = 0;
    VQKV_RETURN_IF_ERROR(Read(field, &n));
    if (n > left()) {
      return Error(absl::StrCat(field, " length ", n, " exceeds the ", left(), " bytes left"));
    }
    out->assign(b_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }

 private:
  const std::string& b_;
  const std::string& what_;
  uint64_t pos_ = 0;
};

// Smallest encoded size of one value of `type`, so that an array count can be checked against
// the bytes left before anything is allocated. 0 for an unknown type.
uint64_t MinEncodedSize(GgufType type) {
  switch (type) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
    case GgufType::kString:  // its uint64 length
      return 8;
    case GgufType::kArray:  // element type + count
      return 12;
  }
  return 0;
}

absl::Status ReadValue(Cursor& c, GgufType type, int depth, const std::string& key, GgufValue* v) {
  v->type = type;
  switch (type) {
    case GgufType::kUint8: {
      uint8_t x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("uint8 value", &x));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufType::kInt8: {
      int8_t x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("int8 value", &x));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufType::kUint16: {
      uint16_t x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("uint16 value", &x));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufType::kInt16: {
      int16_t x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("int16 value", &x));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufType::kUint32: {
      uint32_t x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("uint32 value", &x));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufType::kInt32: {
      int32_t x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("int32 value", &x));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufType::kUint64: {
      VQKV_RETURN_IF_ERROR(c.Read("uint64 value", &v->u));
      v->i = static_cast<int64_t>(
          std::min<uint64_t>(v->u, static_cast<uint64_t>(std::numeric_limits<int64_t>::max())));
      return absl::OkStatus();
    }
    case GgufType::kInt64:
      return c.Read("int64 value", &v->i);
    case GgufType::kFloat32: {
      float x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("float32 value", &x));
      v->f = x;
      return absl::OkStatus();
    }
    case GgufType::kFloat64:
      return c.Read("float64 value", &v->f);
    case GgufType::kBool: {
      uint8_t x = 0;
      VQKV_RETURN_IF_ERROR(c.Read("bool value", &x));
      if (x > 1) return c.Error(absl::StrCat("key ", key, ": bool value ", int{x}));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufType::kString:
      return c.ReadString("string value", &v->s);
    case GgufType::kArray: {
      if (depth >= kMaxArrayDepth)
        return c.Error(absl::StrCat("key ", key, ": arrays nested too deep"));
      uint32_t et = 0;
      uint64_t n = 0;
      VQKV_RETURN_IF_ERROR(c.Read("array element type", &et));
      VQKV_RETURN_IF_ERROR(c.Read("array length", &n));
      const uint64_t min = MinEncodedSize(static_cast<GgufType>(et));
      if (min == 0) return c.Error(absl::StrCat("key ", key, ": unknown array element type ", et));
      if (n > c.left() / min) {
        return c.Error(absl::StrCat("key ", key, ": array of ", n, " elements cannot fit in the ",
                                    c.left(), " bytes left"));
      }
      v->elem_type = static_cast<GgufType>(et);
      v->array.resize(n);
      for (uint64_t i = 0; i < n; ++i) {
        VQKV_RETURN_IF_ERROR(ReadValue(c, v->elem_type, depth + 1, key, &v->array[i]));
      }
      return absl::OkStatus();
    }
  }
  return c.Error(absl::StrCat("key ", key, ": unknown value type ", static_cast<uint32_t>(type)));
}

}  // namespace

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kUint16:
    case GgufType::kInt16:
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kUint64:
    case GgufType::kInt64:
      return true;
    default:
      return false;
  }
}

std::string GgmlTypeName(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      return "F32";
    case GgmlType::kF16:
      return "F16";
    case GgmlType::kBF16:
      return "BF16";
    case GgmlType::kQ4_0:
      return "Q4_0";
    case GgmlType::kQ4_1:
      return "Q4_1";
    case GgmlType::kQ8_0:
      return "Q8_0";
  }
  return absl::StrCat("type ", type);
}

int64_t GgufTensorInfo::elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;  // bounded at parse time
  return n;
}

absl::StatusOr<GgufFile> GgufFile::Open(const std::string& path) {
  if (!std::filesystem::exists(path)) {
    return absl::NotFoundError(absl::StrCat("gguf file not found: ", path));
  }
  VQKV_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  return Parse(std::move(bytes), path);
}

absl::StatusOr<GgufFile> GgufFile::Parse(std::string bytes, const std::string& what) {
  GgufFile g;
  g.what_ = what;
  g.bytes_ = std::make_shared<const std::string>(std::move(bytes));
  Cursor c(*g.bytes_, g.what_);
  uint32_t magic = 0;
  VQKV_RETURN_IF_ERROR(c.Read("magic", &magic));
  if (magic != kMagic) return c.Error("not a GGUF file (bad magic)");
  VQKV_RETURN_IF_ERROR(c.Read("version", &g.version_));
  if (g.version_ != 2 && g.version_ != 3) {
    return c.Error(absl::StrCat("unsupported GGUF version ", g.version_, " (2 or 3)"));
  }
  uint64_t n_tensors = 0, n_kv = 0;
  VQKV_RETURN_IF_ERROR(c.Read("tensor count", &n_tensors));
  VQKV_RETURN_IF_ERROR(c.Read("metadata count", &n_kv));
  // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least
  // 8 + 4 + 4 + 8 bytes plus 8 per dimension.
  if (n_kv > c.left() / 13) return c.Error(absl::StrCat("metadata count ", n_kv, " is absurd"));
  if (n_tensors > c.left() / 32) {
    return c.Error(absl::StrCat("tensor count ", n_tensors, " is absurd"));
  }
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    uint32_t type = 0;
    VQKV_RETURN_IF_ERROR(c.ReadString("metadata key", &key));
    VQKV_RETURN_IF_ERROR(c.Read("metadata type", &type));
    GgufValue v;
    VQKV_RETURN_IF_ERROR(ReadValue(c, static_cast<GgufType>(type), 0, key, &v));
    if (!g.metadata_.emplace(key, std::move(v)).second) {
      return c.Error(absl::StrCat("duplicate metadata key ", key));
    }
  }
  if (const GgufValue* a = g.Find("general.alignment")) {
    if (!a->is_integer() || a->i <= 0 || a->i > (1 << 20) || (a->i & (a->i - 1)) != 0) {
      return c.Error("general.alignment must be a power of two up to 1 MiB");
    }
    g.alignment_ = static_cast<uint64_t>(a->i);
  }
  const uint64_t file_size = g.bytes_->size();
  g.tensors_.resize(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo& t = g.tensors_[i];
    VQKV_RETURN_IF_ERROR(c.ReadString("tensor name", &t.name));
    uint32_t n_dims = 0;
    VQKV_RETURN_IF_ERROR(c.Read("tensor dimension count", &n_dims));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return c.Error(absl::StrCat("tensor ", t.name, ": ", n_dims, " dimensions (1..4)"));
    }
    int64_t elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      int64_t dim = 0;
      VQKV_RETURN_IF_ERROR(c.Read("tensor dimension", &dim));
      // A tensor cannot hold more values than the file has bytes times 2 (4-bit types), so
      // any larger dimension or product is hostile.
      if (dim <= 0 || dim > static_cast<int64_t>(2 * file_size) ||
          elements > static_cast<int64_t>(2 * file_size) / dim) {
        return c.Error(absl::StrCat("tensor ", t.name, ": dimension ", dim, " is absurd"));
      }
      elements *= dim;
      t.dims.push_back(dim);
    }
    VQKV_RETURN_IF_ERROR(c.Read("tensor type", &t.type));
    VQKV_RETURN_IF_ERROR(c.Read("tensor offset", &t.offset));
    if (t.offset % g.alignment_ != 0) {
      return c.Error(absl::StrCat("tensor ", t.name, ": offset ", t.offset,
                                  " is not a multiple of the alignment ", g.alignment_));
    }
    absl::StatusOr<uint64_t> bytes = GgmlTensorBytes(t.type, elements);
    if (bytes.ok()) {
      t.bytes = *bytes;
    } else if (bytes.status().code() != absl::StatusCode::kUnimplemented) {
      return c.Error(absl::StrCat("tensor ", t.name, ": ", bytes.status().message()));
    }
    if (!g.tensor_index_.emplace(t.name, i).second) {
      return c.Error(absl::StrCat("duplicate tensor name ", t.name));
    }
  }
  const uint64_t end = c.pos();
  g.data_offset_ = (end + g.alignment_ - 1) / g.alignment_ * g.alignment_;
  if (g.data_offset_ > file_size) {
    if (n_tensors > 0) return c.Error("file ends before the tensor data section");
    g.data_offset_ = file_size;
  }
  const uint64_t data_size = file_size - g.data_offset_;
  for (const GgufTensorInfo& t : g.tensors_) {
    if (t.offset > data_size || t.bytes > data_size - t.offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gguf ", what, ": tensor ", t.name, " (", GgmlTypeName(t.type), ", ", t.bytes,
          " bytes at data offset ", t.offset, ") extends past the end of the file (", data_size,
          " data bytes) -- truncated file?"));
    }
  }
  return g;
}

const GgufValue* GgufFile::Find(const std::string& key) const {
  const auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("gguf ", what_, ": no key ", key));
  if (!v->is_integer() || (v->type == GgufType::kUint64 && v->u > uint64_t(v->i))) {
    return absl::InvalidArgumentError(
        absl::StrCat("gguf ", what_, ": key ", key, " is not an int64-range integer"));
  }
  return v->i;
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("gguf ", what_, ": no key ", key));
  if (v->is_float()) return v->f;
  if (v->is_integer()) return static_cast<double>(v->i);
  return absl::InvalidArgumentError(
      absl::StrCat("gguf ", what_, ": key ", key, " is not a number"));
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("gguf ", what_, ": no key ", key));
  if (v->type != GgufType::kString) {
    return absl::InvalidArgumentError(
        absl::StrCat("gguf ", what_, ": key ", key, " is not a string"));
  }
  return v->s;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("gguf ", what_, ": no key ", key));
  if (v->type != GgufType::kArray || v->elem_type != GgufType::kString) {
    return absl::InvalidArgumentError(
        absl::StrCat("gguf ", what_, ": key ", key, " is not an array of strings"));
  }
  std::vector<std::string> out;
  out.reserve(v->array.size());
  for (const GgufValue& e : v->array) out.push_back(e.s);
  return out;
}

const GgufTensorInfo* GgufFile::FindTensor(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::string_view> GgufFile::TensorData(const std::string& name) const {
  const GgufTensorInfo* t = FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("gguf ", what_, ": no tensor ", name));
  if (t->bytes == 0) {
    return absl::UnimplementedError(absl::StrCat("gguf ", what_, ": tensor ", name, " has type ",
                                                 GgmlTypeName(t->type), ", not supported"));
  }
  return std::string_view(*bytes_).substr(data_offset_ + t->offset, t->bytes);
}

absl::StatusOr<std::vector<float>> GgufFile::ReadFloat(const std::string& name) const {
  VQKV_ASSIGN_OR_RETURN(std::string_view data, TensorData(name));
  const GgufTensorInfo* t = FindTensor(name);
  std::vector<float> out(static_cast<size_t>(t->elements()));
  VQKV_RETURN_IF_ERROR(Dequantize(t->type, data, t->elements(), out.data()));
  return out;
}

}  // namespace vqkv::model
