#include "common/progress.h"

#include <unistd.h>

#include <cstdio>

namespace vqkv {

ProgressBar::ProgressBar(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total > 0 ? total : 1),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

ProgressBar::~ProgressBar() {
  if (!finished_) Finish();
}

void ProgressBar::Update(int64_t done, const std::string& detail) {
  done_ = done;
  detail_ = detail;
  Draw(false);
}

void ProgressBar::Finish(const std::string& detail) {
  if (finished_) return;
  done_ = total_;
  if (!detail.empty()) detail_ = detail;
  Draw(true);
  if (enabled_ && tty_) std::fputc('\n', stderr);
  finished_ = true;
}

void ProgressBar::Draw(bool force) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  const int pct = static_cast<int>(100 * done_ / total_);
  const double secs = std::chrono::duration<double>(now - start_).count();
  if (tty_) {
    if (!force && now - last_ < std::chrono::milliseconds(100)) return;
    constexpr int kWidth = 30;
    const int fill = static_cast<int>(kWidth * done_ / total_);
    std::string bar(fill, '#');
    bar.resize(kWidth, '.');
    std::fprintf(stderr, "\r%s [%s] %3d%% %.1fs %s\x1b[K", label_.c_str(), bar.c_str(), pct, secs,
                 detail_.c_str());
  } else {
    // Without a terminal, a line every 10% keeps logs readable.
    if (!force && pct / 10 == last_pct_ / 10) return;
    std::fprintf(stderr, "%s %3d%% %.1fs %s\n", label_.c_str(), pct, secs, detail_.c_str());
  }
  std::fflush(stderr);
  last_pct_ = pct;
  last_ = now;
}

}  // namespace vqkv
