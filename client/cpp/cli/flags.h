// A small command-line flag parser for the `vqkv` subcommands: `--name=value`, `--name value`
// and boolean `--name`. Unknown flags are errors, so typos never pass silently.
// Thread-safety: single-threaded use.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::cli {

struct FlagSpec {
  std::string name, default_value, help;
  bool is_bool = false;
};

class Flags {
 public:
  Flags(std::string command, std::string summary, std::vector<FlagSpec> specs);
  // Parses argv[first..argc). InvalidArgument naming the flag on unknown flags or a missing
  // value. Sets help_requested() for --help/-h.
  absl::Status Parse(int argc, char** argv, int first);
  bool help_requested() const { return help_; }
  std::string Usage() const;

  const std::string& Str(const std::string& name) const;
  absl::StatusOr<int64_t> Int(const std::string& name) const;
  absl::StatusOr<double> Double(const std::string& name) const;
  bool Bool(const std::string& name) const;
  bool IsSet(const std::string& name) const { return set_.count(name) != 0; }
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::string command_, summary_;
  std::vector<FlagSpec> specs_;
  std::map<std::string, std::string> values_;
  std::map<std::string, bool> set_;
  std::vector<std::string> positional_;
  bool help_ = false;
};

// Parses argv[2..] into `f`: prints usage and returns 2 on a bad flag, prints usage and returns 0
// for --help, returns -1 when the command should run.
int ParseOrExit(Flags& f, int argc, char** argv);
// Prints "error: ..." and returns the exit code for `st` (2 for InvalidArgument, else 1).
int Fail(const absl::Status& st);

// "../shared/models/tinystories-656k" relative to the working directory or the executable's
// source checkout, when it exists; "" otherwise.
std::string DefaultModelDir();
std::string DefaultTextPath();

}  // namespace vqkv::cli
