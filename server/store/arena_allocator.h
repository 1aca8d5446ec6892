// Offsets inside one fixed-size arena (the GPU tier's HBM block, or any buffer): first-fit over a
// free list kept sorted by offset, with neighbours coalesced on free. Every range starts at a
// multiple of `alignment` and its length is rounded up to one, so the arena itself never holds
// a misaligned block. Plain bookkeeping: it never touches the memory it describes, so it is
// tested on the CPU and reused by any tier that owns a flat buffer.
// Thread-safety: not thread-safe; the owner serialises calls.
#pragma once

#include <cstdint>
#include <map>
#include <optional>

namespace vqkv::store {

class ArenaAllocator {
 public:
  // `capacity` bytes (rounded down to a multiple of `alignment`, a power of two).
  ArenaAllocator(int64_t capacity, int64_t alignment);

  // Offset of a free range of `bytes` (> 0), or nullopt when no free range is large enough
  // (the arena is full or too fragmented: see largest_free()).
  std::optional<int64_t> Allocate(int64_t bytes);
  // Returns the range starting at `offset` (an offset Allocate returned and not freed since).
  // Returns false, changing nothing, for any other offset.
  bool Free(int64_t offset);

  int64_t capacity() const { return capacity_; }
  int64_t alignment() const { return alignment_; }
  // Bytes in allocated ranges (rounded sizes).
  int64_t used() const { return used_; }
  // Length of the largest free range: the largest Allocate that can succeed now.
  int64_t largest_free() const;
  // Number of free ranges (1 for an empty arena; fragmentation shows as more).
  int64_t free_ranges() const { return static_cast<int64_t>(free_.size()); }
  // Rounded size of an allocation of `bytes`.
  int64_t RoundUp(int64_t bytes) const { return (bytes + alignment_ - 1) & ~(alignment_ - 1); }

 private:
  int64_t capacity_, alignment_, used_ = 0;
  std::map<int64_t, int64_t> free_;         // offset -> length, disjoint, never adjacent
  std::map<int64_t, int64_t> used_ranges_;  // offset -> rounded length
};

}  // namespace vqkv::store
