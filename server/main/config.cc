#include "server/main/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "yaml-cpp/yaml.h"

namespace vqkv::vqkvd {
namespace {

struct Flag {
  const char* name;
  const char* help;
  std::function<absl::Status(const std::string&, Config*)> set;
  std::function<std::string(const Config&)> get;
};

absl::Status BadValue(const std::string& name, const std::string& value, const char* want) {
  return absl::InvalidArgumentError(absl::StrCat("--", name, "=", value, ": expected ", want));
}

template <typename T>
Flag Int(const char* name, T Config::*field, const char* help) {
  return {name, help,
          [name, field](const std::string& v, Config* c) {
            int64_t x = 0;
            if (!absl::SimpleAtoi(v, &x)) return BadValue(name, v, "an integer");
            c->*field = static_cast<T>(x);
            return absl::OkStatus();
          },
          [field](const Config& c) { return absl::StrCat(c.*field); }};
}

Flag Bytes(const char* name, int64_t Config::*field, const char* help) {
  return {name, help,
          [name, field](const std::string& v, Config* c) {
            absl::StatusOr<int64_t> x = ParseBytes(v);
            if (!x.ok() || *x <= 0) return BadValue(name, v, "a positive size like 512MiB");
            c->*field = *x;
            return absl::OkStatus();
          },
          [field](const Config& c) { return absl::StrCat(c.*field); }};
}

Flag Double(const char* name, double Config::*field, const char* help) {
  return {name, help,
          [name, field](const std::string& v, Config* c) {
            double x = 0;
            if (!absl::SimpleAtod(v, &x)) return BadValue(name, v, "a number");
            c->*field = x;
            return absl::OkStatus();
          },
          [field](const Config& c) { return absl::StrCat(c.*field); }};
}

Flag String(const char* name, std::string Config::*field, const char* help) {
  return {name, help,
          [field](const std::string& v, Config* c) {
            c->*field = v;
            return absl::OkStatus();
          },
          [field](const Config& c) { return c.*field; }};
}

Flag GpuMode() {
  return {"gpu", "use a GPU: auto (when one is visible), on (fail without one), off",
          [](const std::string& v, Config* c) {
            if (v != "auto" && v != "on" && v != "off") return BadValue("gpu", v, "auto|on|off");
            c->gpu = v;
            return absl::OkStatus();
          },
          [](const Config& c) { return c.gpu; }};
}

Flag Choice(const char* name, std::string Config::*field, std::vector<std::string> choices,
            const char* help) {
  return {name, help,
          [name, field, choices](const std::string& v, Config* c) {
            if (std::find(choices.begin(), choices.end(), v) == choices.end()) {
              return BadValue(name, v, absl::StrJoin(choices, "|").c_str());
            }
            c->*field = v;
            return absl::OkStatus();
          },
          [field](const Config& c) { return c.*field; }};
}

Flag AutoOrBytes(const char* name, int64_t Config::*field, const char* help) {
  return {name, help,
          [name, field](const std::string& v, Config* c) {
            if (v == "auto" || v == "0") {
              c->*field = 0;
              return absl::OkStatus();
            }
            absl::StatusOr<int64_t> x = ParseBytes(v);
            if (!x.ok() || *x <= 0) return BadValue(name, v, "auto or a positive size like 4GiB");
            c->*field = *x;
            return absl::OkStatus();
          },
          [field](const Config& c) {
            return c.*field == 0 ? std::string("auto") : absl::StrCat(c.*field);
          }};
}

const std::vector<Flag>& Flags() {
  static const std::vector<Flag>* flags = new std::vector<Flag>{
      String("listen", &Config::listen,
             "gRPC address HOST:PORT; port 0 picks a free port (printed on stdout)"),
      String("config", &Config::config_file, "YAML file with any of these keys and `models:`"),
      Bytes("host-tier-bytes", &Config::host_tier_bytes, "byte budget of the host-memory tier"),
      String("disk-dir", &Config::disk_dir, "directory of the disk tier (empty: no disk tier)"),
      Bytes("disk-tier-bytes", &Config::disk_tier_bytes, "byte budget of the disk tier"),
      Double("high-watermark", &Config::high_watermark,
             "fraction of a tier above which LRU blocks move down"),
      Double("low-watermark", &Config::low_watermark, "fraction a tier is brought back to"),
      Bytes("max-inflight-bytes", &Config::max_inflight_bytes,
            "bytes held by unfinished calls before new work is refused (RESOURCE_EXHAUSTED)"),
      Bytes("max-block-bytes", &Config::max_block_bytes, "largest logical block"),
      Int("worker-threads", &Config::worker_threads, "codec worker threads (0: 2 x cores, >= 4)"),
      Int("metrics-port", &Config::metrics_port,
          "Prometheus /metrics HTTP port on the listen host (0: off)"),
      String("log-level", &Config::log_level, "trace, debug, info, warn, error or off"),
      Double("shutdown-grace-seconds", &Config::shutdown_grace_seconds,
             "on SIGTERM, how long in-flight calls may run before they are cancelled"),
      Double("shutdown-linger-seconds", &Config::shutdown_linger_seconds,
             "after the drain, how long finished replies may still flow to slow readers"),
      GpuMode(),
      Int("gpu-device", &Config::gpu_device, "CUDA device number used with --gpu"),
      String("gpu-devices", &Config::gpu_devices,
             "several GPUs: all, or a list like 0,1 (one GPU tier each; empty: --gpu-device)"),
      AutoOrBytes("gpu-tier-bytes", &Config::gpu_tier_bytes,
                  "byte budget of each GPU tier (HBM arena); auto: min(free HBM / 2, 8GiB)"),
      Choice("gpu-transfer", &Config::gpu_transfer, {"auto", "peer", "nccl", "host"},
             "how codes move between GPUs: auto (peer copy, else NCCL, else via host), peer, "
             "nccl, host"),
  };
  return *flags;
}

// Flags are spelled with dashes; underscores are accepted too (YAML keys use them).
const Flag* FindFlag(std::string name) {
  for (char& ch : name) {
    if (ch == '_') ch = '-';
  }
  for (const Flag& f : Flags()) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

absl::StatusOr<PreloadModel> ParseModel(const YAML::Node& n) {
  PreloadModel m;
  try {
    m.model_id = n["id"].as<std::string>();
    m.layers = n["layers"].as<int32_t>();
    m.kv_heads = n["kv_heads"].as<int32_t>();
    m.head_dim = n["head_dim"].as<int32_t>();
    m.block_tokens = n["block_tokens"].as<int32_t>();
    if (n["dtype"]) m.dtype = n["dtype"].as<std::string>();
    if (n["codec"]) m.codec = n["codec"].as<std::string>();
    if (n["codebook"]) m.codebook = n["codebook"].as<std::string>();
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config: models entry needs id, layers, kv_heads, head_dim, block_tokens: ", e.what()));
  }
  return m;
}

}  // namespace

int64_t AutoGpuTierBytes(int64_t free_bytes) { return std::min(free_bytes / 2, int64_t{8} << 30); }

absl::StatusOr<std::vector<int>> GpuDevices(const Config& config, int visible) {
  std::vector<int> out;
  auto check = [&](int d) -> absl::Status {
    if (d < 0 || d >= visible) {
      return absl::InvalidArgumentError(
          absl::StrCat("GPU device ", d, " does not exist (", visible, " visible)"));
    }
    if (std::find(out.begin(), out.end(), d) != out.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--gpu-devices=", config.gpu_devices, ": device ", d, " given twice"));
    }
    out.push_back(d);
    return absl::OkStatus();
  };
  if (config.gpu_devices.empty()) {
    if (absl::Status s = check(config.gpu_device); !s.ok()) return s;
    return out;
  }
  if (config.gpu_devices == "all") {
    if (visible == 0) return absl::InvalidArgumentError("--gpu-devices=all: no device visible");
    for (int d = 0; d < visible; ++d) out.push_back(d);
    return out;
  }
  for (absl::string_view part : absl::StrSplit(config.gpu_devices, ',')) {
    int d = 0;
    if (!absl::SimpleAtoi(part, &d)) {
      return BadValue("gpu-devices", config.gpu_devices, "all or a list of device numbers");
    }
    if (absl::Status s = check(d); !s.ok()) return s;
  }
  return out;
}

absl::StatusOr<int64_t> ParseBytes(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    ++i;
  }
  double v = 0;
  if (i == 0 || !absl::SimpleAtod(text.substr(0, i), &v)) {
    return absl::InvalidArgumentError(absl::StrCat("not a size: '", text, "'"));
  }
  std::string unit = text.substr(i);
  for (char& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  static const std::pair<const char*, int> kUnits[] = {
      {"", 0},     {"B", 0},  {"K", 10},  {"KB", 10},  {"KIB", 10}, {"M", 20},  {"MB", 20},
      {"MIB", 20}, {"G", 30}, {"GB", 30}, {"GIB", 30}, {"T", 40},   {"TB", 40}, {"TIB", 40}};
  for (const auto& [name, shift] : kUnits) {
    if (unit == name) return static_cast<int64_t>(std::llround(v * std::ldexp(1.0, shift)));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown size unit in '", text, "'"));
}

absl::Status ApplyYaml(const std::string& yaml_text, Config* config) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: not valid YAML: ", e.what()));
  }
  if (root.IsNull()) return absl::OkStatus();
  if (!root.IsMap()) return absl::InvalidArgumentError("config: top level must be a mapping");
  for (const auto& kv : root) {
    const std::string key = kv.first.as<std::string>();
    if (key == "models") {
      if (!kv.second.IsSequence()) return absl::InvalidArgumentError("config: models: a list");
      for (const auto& m : kv.second) {
        absl::StatusOr<PreloadModel> pm = ParseModel(m);
        if (!pm.ok()) return pm.status();
        config->models.push_back(*std::move(pm));
      }
      continue;
    }
    const Flag* f = FindFlag(key);
    if (f == nullptr || key == "config") {
      return absl::InvalidArgumentError(absl::StrCat("config: unknown key '", key, "'"));
    }
    if (!kv.second.IsScalar()) {
      return absl::InvalidArgumentError(absl::StrCat("config: '", key, "' must be a scalar"));
    }
    if (absl::Status s = f->set(kv.second.as<std::string>(), config); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("config: ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Config> ParseConfig(int argc, char** argv, bool* help) {
  *help = false;
  std::vector<std::pair<const Flag*, std::string>> sets;
  std::string config_file;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      *help = true;
      return Config{};
    }
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    arg = arg.substr(2);
    std::string value;
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--", arg, " needs a value"));
    }
    const Flag* f = FindFlag(arg);
    if (f == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", arg, " (see --help)"));
    }
    if (std::string(f->name) == "config") config_file = value;
    sets.emplace_back(f, value);
  }
  Config c;
  if (!config_file.empty()) {
    std::ifstream in(config_file);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read --config file ", config_file));
    std::stringstream ss;
    ss << in.rdbuf();
    if (absl::Status s = ApplyYaml(ss.str(), &c); !s.ok()) return s;
  }
  for (const auto& [f, v] : sets) {
    if (absl::Status s = f->set(v, &c); !s.ok()) return s;
  }
  if (c.gpu_device < 0) return BadValue("gpu-device", absl::StrCat(c.gpu_device), "a device >= 0");
  return c;
}

std::string Usage() {
  const Config defaults;
  std::string out =
      "vqkvd: the vqkv KV-cache compression daemon (gRPC service vqkv.v1.Vqkv).\n\n"
      "usage: vqkvd [--flag=value ...]\n"
      "Flags override the --config YAML file, which overrides the defaults. Sizes take\n"
      "KiB/MiB/GiB suffixes. SIGTERM or SIGINT drains in-flight calls and exits 0.\n\n";
  for (const Flag& f : Flags()) {
    std::string def = f.get(defaults);
    absl::StrAppend(&out, "  --", f.name, "  (default: \"", def, "\")\n      ", f.help, "\n");
  }
  absl::StrAppend(&out,
                  "\nYAML `models:` entries (id, layers, kv_heads, head_dim, block_tokens, dtype,\n"
                  "codec, codebook) are registered at start, before health reports SERVING.\n");
  return out;
}

}  // namespace vqkv::vqkvd
