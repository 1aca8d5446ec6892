#include "common/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "nlohmann/json.hpp"

namespace vqkv {
namespace {

int64_t DtypeBytes(const std::string& dt) {
  if (dt == "F64" || dt == "I64" || dt == "U64") return 8;
  if (dt == "F32" || dt == "I32" || dt == "U32") return 4;
  if (dt == "F16" || dt == "BF16" || dt == "I16" || dt == "U16") return 2;
  if (dt == "I8" || dt == "U8" || dt == "BOOL") return 1;
  return -1;
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat("read error on '", path, "'"));
  return std::move(ss).str();
}

absl::Status WriteStringToFile(const std::string& path, std::string_view data) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write '", tmp, "'"));
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out) return absl::InternalError(absl::StrCat("write error on '", tmp, "'"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename '", tmp, "' to '", path, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  auto bytes = ReadFileToString(path);
  if (!bytes.ok()) return bytes.status();
  return Parse(std::move(*bytes), path);
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes, const std::string& what) {
  auto bad = [&](absl::string_view msg) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors '", what, "': ", msg));
  };
  if (bytes.size() < 8) return bad("file shorter than the 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > bytes.size() - 8) return bad("header length runs past the end of the file");
  SafetensorsFile f;
  f.data_offset_ = 8 + n;
  const uint64_t data_size = bytes.size() - f.data_offset_;
  nlohmann::json header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + n, nullptr,
                                                /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return bad("header is not a JSON object");
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) return bad("__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) return bad(absl::StrCat("metadata '", m.key(), "' is not a string"));
        f.metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const auto& t = it.value();
    const std::string field = absl::StrCat("tensor '", it.key(), "'");
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") ||
        !t.contains("data_offsets") || !t["dtype"].is_string() || !t["shape"].is_array() ||
        !t["data_offsets"].is_array() || t["data_offsets"].size() != 2) {
      return bad(absl::StrCat(field, ": needs dtype, shape and data_offsets[2]"));
    }
    TensorInfo info;
    info.dtype = t["dtype"].get<std::string>();
    const int64_t esize = DtypeBytes(info.dtype);
    if (esize < 0) return bad(absl::StrCat(field, ": unknown dtype ", info.dtype));
    uint64_t count = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) {
        return bad(absl::StrCat(field, ": shape entries must be non-negative integers"));
      }
      const uint64_t v = d.get<uint64_t>();
      if (v != 0 && count > (uint64_t{1} << 50) / v)
        return bad(absl::StrCat(field, ": shape too large"));
      count *= v;
      info.shape.push_back(static_cast<int64_t>(v));
    }
    for (const auto& o : t["data_offsets"]) {
      if (!o.is_number_unsigned() && !(o.is_number_integer() && o.get<int64_t>() >= 0)) {
        return bad(absl::StrCat(field, ": data_offsets must be non-negative integers"));
      }
    }
    info.begin = t["data_offsets"][0].get<uint64_t>();
    info.end = t["data_offsets"][1].get<uint64_t>();
    if (info.begin > info.end || info.end > data_size) {
      return bad(absl::StrCat(field, ": byte range [", info.begin, ",", info.end,
                              ") outside the data section of ", data_size, " bytes"));
    }
    if (info.end - info.begin != count * static_cast<uint64_t>(esize)) {
      return bad(absl::StrCat(field, ": byte range holds ", info.end - info.begin,
                              " bytes but shape x dtype needs ", count * esize));
    }
    ranges.emplace_back(info.begin, info.end);
    f.tensors_[it.key()] = std::move(info);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return bad("tensor byte ranges overlap");
  }
  f.bytes_ = std::move(bytes);
  return f;
}

absl::StatusOr<TensorInfo> SafetensorsFile::Info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat("no tensor '", name, "'"));
  return it->second;
}

absl::StatusOr<std::string_view> SafetensorsFile::Raw(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat("no tensor '", name, "'"));
  return std::string_view(bytes_).substr(data_offset_ + it->second.begin,
                                         it->second.end - it->second.begin);
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat("no tensor '", name, "'"));
  const TensorInfo& t = it->second;
  const char* p = bytes_.data() + data_offset_ + t.begin;
  DType dt;
  if (t.dtype == "F32") {
    dt = DType::kF32;
  } else if (t.dtype == "F16") {
    dt = DType::kF16;
  } else if (t.dtype == "BF16") {
    dt = DType::kBF16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': dtype ", t.dtype, " is not a float type"));
  }
  std::vector<float> out((t.end - t.begin) / DTypeSize(dt));
  ToFloat(dt, p, out.size(), out.data());
  return out;
}

void SafetensorsWriter::AddF32(const std::string& name, std::vector<int64_t> shape,
                               const float* data) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  AddRaw(name, "F32", std::move(shape),
         std::string(reinterpret_cast<const char*>(data), n * sizeof(float)));
}

void SafetensorsWriter::AddRaw(const std::string& name, const std::string& dtype,
                               std::vector<int64_t> shape, std::string bytes) {
  entries_.push_back({name, dtype, std::move(shape), std::move(bytes)});
}

std::string SafetensorsWriter::Serialize() const {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata_) m[k] = v;
    header["__metadata__"] = m;
  }
  uint64_t off = 0;
  for (const auto& e : entries_) {
    header[e.name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {off, off + e.bytes.size()}}};
    off += e.bytes.size();
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');
  std::string out(8, '\0');
  const uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  out += h;
  for (const auto& e : entries_) out += e.bytes;
  return out;
}

absl::Status SafetensorsWriter::WriteFile(const std::string& path) const {
  return WriteStringToFile(path, Serialize());
}

}  // namespace vqkv
