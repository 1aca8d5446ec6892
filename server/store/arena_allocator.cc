#include "server/store/arena_allocator.h"

#include <algorithm>
#include <iterator>

namespace vqkv::store {

ArenaAllocator::ArenaAllocator(int64_t capacity, int64_t alignment)
    : capacity_(std::max<int64_t>(0, capacity) & ~(alignment - 1)), alignment_(alignment) {
  if (capacity_ > 0) free_.emplace(0, capacity_);
}

std::optional<int64_t> ArenaAllocator::Allocate(int64_t bytes) {
  if (bytes <= 0) return std::nullopt;
  const int64_t need = RoundUp(bytes);
  // First fit: low offsets fill first, which keeps the large free range at the top intact.
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < need) continue;
    const int64_t offset = it->first, rest = it->second - need;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + need, rest);
    used_ranges_.emplace(offset, need);
    used_ += need;
    return offset;
  }
  return std::nullopt;
}

bool ArenaAllocator::Free(int64_t offset) {
  auto u = used_ranges_.find(offset);
  if (u == used_ranges_.end()) return false;
  int64_t start = offset, len = u->second;
  used_ -= len;
  used_ranges_.erase(u);
  // Merge with the free neighbours on both sides so that free ranges never touch.
  auto next = free_.lower_bound(start);
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      len += prev->second;
      free_.erase(prev);
    }
  }
  if (next != free_.end() && start + len == next->first) {
    len += next->second;
    free_.erase(next);
  }
  free_.emplace(start, len);
  return true;
}

int64_t ArenaAllocator::largest_free() const {
  int64_t best = 0;
  for (const auto& [offset, len] : free_) best = std::max(best, len);
  return best;
}

}  // namespace vqkv::store
