#include "client/cpp/cli/flags.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace vqkv::cli {

Flags::Flags(std::string command, std::string summary, std::vector<FlagSpec> specs)
    : command_(std::move(command)), summary_(std::move(summary)), specs_(std::move(specs)) {
  for (const auto& s : specs_) values_[s.name] = s.default_value;
}

absl::Status Flags::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      help_ = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) {
      positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const FlagSpec* spec = nullptr;
    for (const auto& s : specs_) {
      if (s.name == name) spec = &s;
    }
    if (spec == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(command_, ": unknown flag --", name, " (see --help)"));
    }
    if (spec->is_bool) {
      if (!has_value) value = "true";
    } else if (!has_value) {
      if (i + 1 >= argc)
        return absl::InvalidArgumentError(absl::StrCat(command_, ": --", name, " needs a value"));
      value = argv[++i];
    }
    values_[name] = value;
    set_[name] = true;
  }
  return absl::OkStatus();
}

std::string Flags::Usage() const {
  std::string s = absl::StrCat("usage: vqkv ", command_, " [flags]\n  ", summary_, "\n\nflags:\n");
  for (const auto& f : specs_) {
    absl::StrAppend(
        &s, "  --", f.name, f.is_bool ? "" : "=VALUE", "\n      ", f.help,
        f.default_value.empty() ? "" : absl::StrCat(" (default: ", f.default_value, ")"), "\n");
  }
  return s;
}

const std::string& Flags::Str(const std::string& name) const { return values_.at(name); }

absl::StatusOr<int64_t> Flags::Int(const std::string& name) const {
  int64_t v;
  if (!absl::SimpleAtoi(values_.at(name), &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(command_, ": --", name, "=", values_.at(name), " is not an integer"));
  }
  return v;
}

absl::StatusOr<double> Flags::Double(const std::string& name) const {
  double v;
  if (!absl::SimpleAtod(values_.at(name), &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(command_, ": --", name, "=", values_.at(name), " is not a number"));
  }
  return v;
}

bool Flags::Bool(const std::string& name) const {
  const std::string& v = values_.at(name);
  return v == "true" || v == "1" || v == "yes";
}

int ParseOrExit(Flags& f, int argc, char** argv) {
  if (auto st = f.Parse(argc, argv, 2); !st.ok()) {
    std::fprintf(stderr, "%s\n\n%s", std::string(st.message()).c_str(), f.Usage().c_str());
    return 2;
  }
  if (f.help_requested()) {
    std::printf("%s", f.Usage().c_str());
    return 0;
  }
  return -1;
}

int Fail(const absl::Status& st) {
  std::fprintf(stderr, "error: %s\n", std::string(st.ToString()).c_str());
  return st.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

namespace {
std::string FindShared(const std::string& rel) {
  for (const char* base : {"../shared/", "../../shared/", "../../../shared/"}) {
    std::error_code ec;
    const std::string p = std::string(base) + rel;
    if (std::filesystem::exists(p, ec)) return std::filesystem::weakly_canonical(p, ec).string();
  }
  return "";
}
}  // namespace

std::string DefaultModelDir() { return FindShared("models/tinystories-656k"); }
std::string DefaultTextPath() { return FindShared("data/tinystories/valid-dev.txt"); }

}  // namespace vqkv::cli
