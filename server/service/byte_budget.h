// A counter of bytes in flight with a hard limit (backpressure for puts and gets).
// Thread-safety: thread-safe.
#pragma once

#include <atomic>
#include <cstdint>

namespace vqkv::service {

class ByteBudget {
 public:
  explicit ByteBudget(int64_t limit) : limit_(limit) {}
  // Takes `n` bytes if that keeps the total within the limit. A single request larger than the
  // whole limit is admitted only when nothing else is in flight, so it cannot starve forever.
  bool TryAcquire(int64_t n) {
    int64_t cur = used_.load(std::memory_order_relaxed);
    while (true) {
      if (cur + n > limit_ && cur != 0) {
        rejections_.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
      if (used_.compare_exchange_weak(cur, cur + n, std::memory_order_relaxed)) return true;
    }
  }
  void ForceAcquire(int64_t n) { used_.fetch_add(n, std::memory_order_relaxed); }
  void Release(int64_t n) { used_.fetch_sub(n, std::memory_order_relaxed); }
  int64_t used() const { return used_.load(std::memory_order_relaxed); }
  int64_t limit() const { return limit_; }
  int64_t rejections() const { return rejections_.load(std::memory_order_relaxed); }

 private:
  const int64_t limit_;
  std::atomic<int64_t> used_{0};
  std::atomic<int64_t> rejections_{0};
};

// Bytes held by one session; returns them on destruction.
class BudgetHold {
 public:
  explicit BudgetHold(ByteBudget* budget) : budget_(budget) {}
  ~BudgetHold() { budget_->Release(held_); }
  BudgetHold(const BudgetHold&) = delete;
  BudgetHold& operator=(const BudgetHold&) = delete;
  bool TryAdd(int64_t n) {
    if (n <= 0) return true;
    if (!budget_->TryAcquire(n)) return false;
    held_ += n;
    return true;
  }
  // Takes `n` bytes even past the limit (for small, unavoidable overshoots).
  void ForceAdd(int64_t n) {
    budget_->ForceAcquire(n);
    held_ += n;
  }
  void Remove(int64_t n) {
    n = n < held_ ? n : held_;
    budget_->Release(n);
    held_ -= n;
  }
  int64_t held() const { return held_; }

 private:
  ByteBudget* budget_;
  int64_t held_ = 0;
};

}  // namespace vqkv::service
