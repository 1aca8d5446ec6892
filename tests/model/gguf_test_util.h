// Builds small GGUF files in memory for the tests (little-endian, version 3 by default).
// Thread-safety: plain value type.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace vqkv::model::testing {

class GgufBuilder {
 public:
  explicit GgufBuilder(uint32_t version = 3) : version_(version) {}

  void KvU32(const std::string& key, uint32_t v) { Kv(key, 4, Pod(v)); }
  void KvI32(const std::string& key, int32_t v) { Kv(key, 5, Pod(v)); }
  void KvF32(const std::string& key, float v) { Kv(key, 6, Pod(v)); }
  void KvBool(const std::string& key, bool v) { Kv(key, 7, std::string(1, v ? 1 : 0)); }
  void KvStr(const std::string& key, const std::string& v) { Kv(key, 8, Str(v)); }
  void KvU64(const std::string& key, uint64_t v) { Kv(key, 10, Pod(v)); }
  void KvStrArray(const std::string& key, const std::vector<std::string>& v) {
    std::string b = Pod(uint32_t{8}) + Pod(uint64_t{v.size()});
    for (const auto& s : v) b += Str(s);
    Kv(key, 9, b);
  }
  void KvI32Array(const std::string& key, const std::vector<int32_t>& v) {
    std::string b = Pod(uint32_t{5}) + Pod(uint64_t{v.size()});
    for (int32_t x : v) b += Pod(x);
    Kv(key, 9, b);
  }
  // A key with an arbitrary pre-encoded value.
  void Kv(const std::string& key, uint32_t type, const std::string& value) {
    kv_ += Str(key) + Pod(type) + value;
    ++n_kv_;
  }
  // A tensor with ggml dims (dims[0] fastest) and raw `data`, placed at the next aligned
  // offset.
  void Tensor(const std::string& name, std::vector<int64_t> dims, uint32_t type,
              const std::string& data) {
    while (data_.size() % alignment_ != 0) data_.push_back('\0');
    infos_ += Str(name) + Pod(uint32_t(dims.size()));
    for (int64_t d : dims) infos_ += Pod(d);
    infos_ += Pod(type) + Pod(uint64_t{data_.size()});
    data_ += data;
    ++n_tensors_;
  }
  void set_alignment(uint64_t a) { alignment_ = a; }

  std::string Build() const {
    std::string out = "GGUF" + Pod(version_) + Pod(n_tensors_) + Pod(n_kv_) + kv_ + infos_;
    while (out.size() % alignment_ != 0) out.push_back('\0');
    return out + data_;
  }

  template <typename T>
  static std::string Pod(T v) {
    std::string s(sizeof(T), '\0');
    std::memcpy(s.data(), &v, sizeof(T));
    return s;
  }
  static std::string Str(const std::string& s) { return Pod(uint64_t{s.size()}) + s; }
  static std::string F32s(const std::vector<float>& v) {
    std::string s(v.size() * 4, '\0');
    std::memcpy(s.data(), v.data(), s.size());
    return s;
  }

 private:
  uint32_t version_;
  uint64_t n_kv_ = 0, n_tensors_ = 0, alignment_ = 32;
  std::string kv_, infos_, data_;
};

}  // namespace vqkv::model::testing
