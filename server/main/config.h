// vqkvd configuration: built-in defaults, overridden by a YAML file (--config), overridden by
// command-line flags. The defaults are the zero-configuration CPU setup: host tier only,
// 127.0.0.1:50051, no metrics port.
// Thread-safety: plain data and pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::vqkvd {

// A model registered at start (YAML only).
struct PreloadModel {
  std::string model_id;
  int32_t layers = 0, kv_heads = 0, head_dim = 0, block_tokens = 0;
  std::string dtype = "f16";
  std::string codec = "raw";
  std::string codebook;  // optional codebook file (rvq)
};

struct Config {
  std::string listen = "127.0.0.1:50051";
  std::string config_file;
  int64_t host_tier_bytes = int64_t{2} << 30;
  std::string disk_dir;  // empty: no disk tier
  int64_t disk_tier_bytes = int64_t{16} << 30;
  double high_watermark = 0.95;
  double low_watermark = 0.85;
  int64_t max_inflight_bytes = int64_t{1} << 30;
  int64_t max_block_bytes = int64_t{512} << 20;
  int32_t worker_threads = 0;  // 0: 2 x cores, at least 4
  int32_t metrics_port = 0;    // 0: off
  std::string log_level = "info";
  double shutdown_grace_seconds = 30;
  double shutdown_linger_seconds = 2;
  // GPU: "auto" (use device gpu_device when the build has CUDA and a device is visible), "on"
  // (fail at start without one) or "off" (CPU codecs, host tier on top).
  std::string gpu = "auto";
  int32_t gpu_device = 0;
  // Several GPUs: "" (only gpu_device), "all" (every visible device) or a list "0,1,3". One GPU
  // tier per device; gpu_tier_bytes applies to each.
  std::string gpu_devices;
  int64_t gpu_tier_bytes = 0;  // HBM arena per device; 0: auto = min(free HBM / 2, 8 GiB)
  // How codes move between GPUs: "auto" (peer copies where peer access works, else NCCL when
  // built with it, else copies staged through host memory), "peer", "nccl" or "host".
  std::string gpu_transfer = "auto";
  std::vector<PreloadModel> models;
};

// The gpu_tier_bytes used with "auto" (0): half the device's free memory, at most 8 GiB.
int64_t AutoGpuTierBytes(int64_t free_bytes);

// The devices vqkvd uses: [gpu_device] when gpu_devices is empty, every one of `visible` for
// "all", else the listed ones in order. InvalidArgument for a malformed list, a repeated device
// or one outside [0, visible).
absl::StatusOr<std::vector<int>> GpuDevices(const Config& config, int visible);

// Parses "1048576", "512MiB", "2GiB", "64KiB", "1.5G" (K/M/G/T are binary too).
absl::StatusOr<int64_t> ParseBytes(const std::string& text);

// Builds the configuration from argv. Sets *help when --help was given (the caller prints
// Usage() and exits 0). InvalidArgument for unknown flags or bad values, naming them; NotFound /
// InvalidArgument for an unreadable or malformed --config file.
absl::StatusOr<Config> ParseConfig(int argc, char** argv, bool* help);

// Applies a YAML document (same keys as the flags, plus `models:`) on top of `config`.
absl::Status ApplyYaml(const std::string& yaml_text, Config* config);

// The --help text: every flag with its default.
std::string Usage();

}  // namespace vqkv::vqkvd
