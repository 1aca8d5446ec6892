#include "common/parallel.h"

#include <cstdlib>

namespace vqkv {

int NumThreads() {
  static const int n = [] {
    int t = static_cast<int>(std::thread::hardware_concurrency());
    if (t < 1) t = 1;
    if (const char* e = std::getenv("VQKV_THREADS")) {
      const int v = std::atoi(e);
      if (v >= 1) t = v;
    }
    return t;
  }();
  return n;
}

void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  const int64_t chunks = std::min<int64_t>(NumThreads(), (n + min_chunk - 1) / min_chunk);
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(chunks - 1);
  const int64_t step = (n + chunks - 1) / chunks;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = c * step, e = std::min(n, b + step);
    if (b < e) threads.emplace_back(fn, b, e);
  }
  fn(0, std::min(n, step));
  for (auto& t : threads) t.join();
}

}  // namespace vqkv
