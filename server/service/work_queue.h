// A fixed pool of threads running tasks in submission order. The gRPC reactors hand session work
// (decoding chunks, encoding, committing) to it so that gRPC's own threads never run codecs.
// Thread-safety: Submit is thread-safe. The destructor runs every task already submitted, then
// joins; submitting after destruction has begun is a bug.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace vqkv::service {

class WorkQueue {
 public:
  explicit WorkQueue(int threads);
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  void Submit(std::function<void()> task);

 private:
  void Loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace vqkv::service
