// ParallelFor: splits an index range over the machine's cores with plain std::threads.
// Thread-safety: `fn` is called concurrently on disjoint sub-ranges; it must not race on
// shared state it writes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace vqkv {

// Number of worker threads used by ParallelFor (hardware concurrency, at least 1, capped by the
// VQKV_THREADS environment variable when set).
int NumThreads();

// Calls fn(begin, end) over [0, n) in at most NumThreads() contiguous chunks, each at least
// `min_chunk` long. Runs inline when one chunk suffices.
void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace vqkv
