#include "tests/integration/daemon.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

extern char** environ;

namespace vqkv::testing {

std::string VqkvdPath() {
  // A packed copy on another machine (a GPU box) is named by the environment.
  const char* env = std::getenv("VQKV_VQKVD");
  return env != nullptr && *env != '\0' ? env : VQKV_VQKVD_PATH;
}
std::string PartialPutPath() { return VQKV_PARTIAL_PUT_PATH; }

absl::StatusOr<std::pair<pid_t, int>> SpawnWithStdout(const std::vector<std::string>& argv,
                                                      const std::string& stderr_path) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, stderr_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    return absl::InternalError(absl::StrCat("posix_spawn ", argv[0], " failed: ", rc));
  }
  return std::make_pair(pid, fds[0]);
}

absl::StatusOr<std::string> ReadLine(int fd, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::string line;
  while (true) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return absl::DeadlineExceededError(absl::StrCat("no line; got '", line, "'"));
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(ms)) <= 0) continue;
    char c;
    const ssize_t n = read(fd, &c, 1);
    if (n <= 0) return absl::NotFoundError(absl::StrCat("EOF; got '", line, "'"));
    if (c == '\n') return line;
    line.push_back(c);
  }
}

absl::StatusOr<int> WaitExit(pid_t pid, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (r < 0) return absl::InternalError("waitpid failed");
    if (absl::Now() > deadline) return absl::DeadlineExceededError("still running");
    absl::SleepFor(absl::Milliseconds(10));
  }
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const std::vector<std::string>& args) {
  static std::atomic<int> counter{0};
  std::unique_ptr<Daemon> d(new Daemon);
  d->log_path_ = absl::StrCat(::testing::TempDir(), "vqkvd_", getpid(), "_", counter++, ".log");
  std::vector<std::string> argv = {VqkvdPath(), "--listen=127.0.0.1:0", "--log-level=debug"};
  // The CPU path unless the test asks for a GPU, so results do not depend on the machine.
  bool gpu_flag = false;
  for (const std::string& a : args) gpu_flag = gpu_flag || a.rfind("--gpu", 0) == 0;
  if (!gpu_flag) argv.push_back("--gpu=off");
  argv.insert(argv.end(), args.begin(), args.end());
  auto spawned = SpawnWithStdout(argv, d->log_path_);
  if (!spawned.ok()) return spawned.status();
  d->pid_ = spawned->first;
  d->stdout_fd_ = spawned->second;
  absl::StatusOr<std::string> line = ReadLine(d->stdout_fd_, absl::Seconds(20));
  const std::string prefix = "vqkvd listening on ";
  if (!line.ok() || line->rfind(prefix, 0) != 0) {
    const std::string log = d->Log();
    return absl::InternalError(
        absl::StrCat("vqkvd did not start: ", line.ok() ? *line : line.status().ToString(),
                     "\n--- log ---\n", log));
  }
  d->address_ = line->substr(prefix.size());
  return d;
}

Daemon::~Daemon() {
  Kill();
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

int Daemon::Terminate(absl::Duration timeout) {
  if (pid_ <= 0) return -1;
  kill(pid_, SIGTERM);
  absl::StatusOr<int> rc = WaitExit(pid_, timeout);
  if (!rc.ok()) {
    Kill();
    return -1;
  }
  pid_ = -1;
  return *rc;
}

void Daemon::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  WaitExit(pid_, absl::Seconds(10)).IgnoreError();
  pid_ = -1;
}

std::string Daemon::Log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace vqkv::testing
