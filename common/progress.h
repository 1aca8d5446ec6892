// A one-line progress bar on stderr for long CLI work (fitting, evaluation, benchmarks).
// Redraws at most every 100 ms; prints plain lines when stderr is not a terminal.
// Thread-safety: not thread-safe; drive it from one thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace vqkv {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, bool enabled = true);
  ~ProgressBar();
  void Update(int64_t done, const std::string& detail = "");
  void Finish(const std::string& detail = "");

 private:
  void Draw(bool force);
  std::string label_, detail_;
  int64_t total_, done_ = 0;
  bool enabled_, tty_, finished_ = false;
  int last_pct_ = -1;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace vqkv
