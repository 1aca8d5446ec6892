// Host-memory tier: blocks are shared buffers in a map. On a GPU node this is where pinned
// staging would live; on a CPU box it is the top tier.
#include <mutex>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "server/store/tier.h"

namespace vqkv::store {
namespace {

class HostTier final : public Tier {
 public:
  explicit HostTier(int64_t capacity) : capacity_(capacity) {}
  TierKind kind() const override { return TierKind::kHost; }
  int64_t capacity_bytes() const override { return capacity_; }

  absl::Status Write(uint64_t id, const BlockBytes& bytes) override {
    std::lock_guard<std::mutex> l(mu_);
    blocks_[id] = bytes;
    return absl::OkStatus();
  }
  absl::StatusOr<BlockBytes> Read(uint64_t id) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return absl::NotFoundError(absl::StrCat("host tier: no block ", id));
    return it->second;
  }
  void Erase(uint64_t id) override {
    std::lock_guard<std::mutex> l(mu_);
    blocks_.erase(id);
  }

 private:
  const int64_t capacity_;
  std::mutex mu_;
  absl::flat_hash_map<uint64_t, BlockBytes> blocks_;
};

}  // namespace

std::unique_ptr<Tier> NewHostTier(int64_t capacity_bytes) {
  return std::make_unique<HostTier>(capacity_bytes);
}

}  // namespace vqkv::store
