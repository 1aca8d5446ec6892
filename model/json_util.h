// Non-throwing accessors over nlohmann::json for parsing Hugging Face config.json and
// tokenizer.json: a missing field or one of the wrong type yields the default (or nullptr)
// instead of an exception or an assertion.
// Thread-safety: pure functions.
#pragma once

#include <string>

#include "nlohmann/json.hpp"

namespace vqkv::model::json_util {

using json = nlohmann::json;

// Field `key` of `j`, or nullptr when `j` is not an object or lacks it (null counts as absent).
inline const json* Field(const json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  const auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

inline bool BoolOr(const json& j, const char* key, bool fallback) {
  const json* f = Field(j, key);
  return f != nullptr && f->is_boolean() ? f->get<bool>() : fallback;
}

inline std::string StringOr(const json& j, const char* key, const std::string& fallback) {
  const json* f = Field(j, key);
  return f != nullptr && f->is_string() ? f->get<std::string>() : fallback;
}

inline int IntOr(const json& j, const char* key, int fallback) {
  const json* f = Field(j, key);
  if (f == nullptr || !f->is_number_integer()) return fallback;
  const int64_t v = f->get<int64_t>();
  return v >= -(int64_t{1} << 30) && v <= (int64_t{1} << 30) ? static_cast<int>(v) : fallback;
}

}  // namespace vqkv::model::json_util
