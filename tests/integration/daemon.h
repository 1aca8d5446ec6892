// Test helper: runs the real `vqkvd` binary on 127.0.0.1:0 as a child process, reads the bound
// port from its stdout ("vqkvd listening on HOST:PORT") and stops it at teardown. Its stderr
// goes to a log file that tests print on failure.
// Thread-safety: one owner thread.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace vqkv::testing {

// Absolute path of a test helper binary, set by CMake; $VQKV_VQKVD overrides vqkvd's.
std::string VqkvdPath();
std::string PartialPutPath();

class Daemon {
 public:
  // Starts vqkvd with `--listen=127.0.0.1:0` and `args`, waiting up to 20 s for it to listen.
  // Adds --gpu=off unless `args` has a --gpu... flag.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const std::vector<std::string>& args = {});
  ~Daemon();

  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }

  // Sends SIGTERM and waits up to `timeout` for exit; returns the exit code, or -1 if it had to
  // be killed (or died by a signal).
  int Terminate(absl::Duration timeout = absl::Seconds(30));
  // SIGKILL, no waiting for a drain.
  void Kill();
  // Its stderr so far.
  std::string Log() const;

 private:
  Daemon() = default;
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string address_, log_path_;
};

// Spawns `argv` (argv[0] is the binary) with stdout on a pipe. Returns (pid, read fd).
absl::StatusOr<std::pair<pid_t, int>> SpawnWithStdout(const std::vector<std::string>& argv,
                                                      const std::string& stderr_path);
// Reads one line from `fd` within `timeout` (NotFound on EOF, DeadlineExceeded on timeout).
absl::StatusOr<std::string> ReadLine(int fd, absl::Duration timeout);
// Waits for `pid` up to `timeout`; returns its exit code, -1 on signal, or DeadlineExceeded.
absl::StatusOr<int> WaitExit(pid_t pid, absl::Duration timeout);

}  // namespace vqkv::testing
