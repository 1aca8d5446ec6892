// The key of a stored block: (tenant, model id, codebook id, block hash).
// Thread-safety: plain value type.
#pragma once

#include <string>
#include <utility>

#include "absl/hash/hash.h"

namespace vqkv::store {

struct BlockKey {
  std::string tenant;
  std::string model_id;
  std::string codebook_id;  // "" for codecs without a codebook
  std::string hash;         // the client's chained block hash (opaque bytes)

  bool operator==(const BlockKey&) const = default;

  template <typename H>
  friend H AbslHashValue(H h, const BlockKey& k) {
    return H::combine(std::move(h), k.tenant, k.model_id, k.codebook_id, k.hash);
  }

  // "tenant/model/codebook/<hex of hash>" for logs and error messages.
  std::string DebugString() const;
};

}  // namespace vqkv::store
