#include "server/main/config.h"

#include <cstdio>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace vqkv::vqkvd {
namespace {

absl::StatusOr<Config> Parse(std::vector<std::string> args, bool* help = nullptr) {
  std::vector<char*> argv = {const_cast<char*>("vqkvd")};
  for (auto& a : args) argv.push_back(a.data());
  bool h = false;
  return ParseConfig(static_cast<int>(argv.size()), argv.data(), help ? help : &h);
}

TEST(ConfigTest, ParsesSizes) {
  EXPECT_EQ(*ParseBytes("1048576"), 1 << 20);
  EXPECT_EQ(*ParseBytes("512MiB"), int64_t{512} << 20);
  EXPECT_EQ(*ParseBytes("2GiB"), int64_t{2} << 30);
  EXPECT_EQ(*ParseBytes("1.5g"), int64_t{3} << 29);
  EXPECT_EQ(*ParseBytes("64k"), 64 << 10);
  EXPECT_FALSE(ParseBytes("lots").ok());
  EXPECT_FALSE(ParseBytes("12parsecs").ok());
}

TEST(ConfigTest, DefaultsAreTheZeroConfigCpuSetup) {
  auto c = Parse({});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->listen, "127.0.0.1:50051");
  EXPECT_TRUE(c->disk_dir.empty());
  EXPECT_EQ(c->metrics_port, 0);
}

TEST(ConfigTest, FlagsOverrideYamlWhichOverridesDefaults) {
  const std::string path = ::testing::TempDir() + "vqkvd_config_test.yaml";
  std::ofstream(path) << "listen: 0.0.0.0:6000\nhost_tier_bytes: 1GiB\nlog-level: warn\n"
                         "models:\n  - {id: llama, layers: 32, kv_heads: 8, head_dim: 128,\n"
                         "     block_tokens: 256, codec: scalar-2}\n";
  auto c = Parse({"--config=" + path, "--listen", "127.0.0.1:0", "--metrics_port=9100"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->listen, "127.0.0.1:0");
  EXPECT_EQ(c->host_tier_bytes, int64_t{1} << 30);
  EXPECT_EQ(c->log_level, "warn");
  EXPECT_EQ(c->metrics_port, 9100);
  ASSERT_EQ(c->models.size(), 1u);
  EXPECT_EQ(c->models[0].model_id, "llama");
  EXPECT_EQ(c->models[0].codec, "scalar-2");
  EXPECT_EQ(c->models[0].dtype, "f16");
  std::remove(path.c_str());
}

TEST(ConfigTest, RejectsUnknownAndMalformedInput) {
  EXPECT_EQ(Parse({"--no-such-flag=1"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse({"--host-tier-bytes=lots"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse({"--metrics-port"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse({"stray"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse({"--config=/nonexistent.yaml"}).status().code(), absl::StatusCode::kNotFound);
  Config c;
  EXPECT_FALSE(ApplyYaml("listen: [1, 2]", &c).ok());
  EXPECT_FALSE(ApplyYaml("bogus: 1", &c).ok());
  EXPECT_FALSE(ApplyYaml("models:\n  - {id: x}\n", &c).ok());
  EXPECT_FALSE(ApplyYaml("{unclosed", &c).ok());
}

TEST(ConfigTest, GpuFlagsAndYamlKeys) {
  auto d = Parse({});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->gpu, "auto");
  EXPECT_EQ(d->gpu_device, 0);
  EXPECT_EQ(d->gpu_tier_bytes, 0);  // auto
  auto c = Parse({"--gpu=on", "--gpu-device", "1", "--gpu-tier-bytes=3GiB"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->gpu, "on");
  EXPECT_EQ(c->gpu_device, 1);
  EXPECT_EQ(c->gpu_tier_bytes, int64_t{3} << 30);
  EXPECT_EQ(Parse({"--gpu-tier-bytes=auto"})->gpu_tier_bytes, 0);
  Config y;
  ASSERT_TRUE(ApplyYaml("gpu: off\ngpu_device: 2\ngpu_tier_bytes: 64MiB\n", &y).ok());
  EXPECT_EQ(y.gpu, "off");
  EXPECT_EQ(y.gpu_device, 2);
  EXPECT_EQ(y.gpu_tier_bytes, int64_t{64} << 20);
  EXPECT_EQ(Parse({"--gpu=maybe"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse({"--gpu-device=-1"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse({"--gpu-tier-bytes=-4"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse({"--gpu-transfer=nccl"})->gpu_transfer, "nccl");
  EXPECT_EQ(d->gpu_transfer, "auto");
  EXPECT_EQ(Parse({"--gpu-transfer=rdma"}).status().code(), absl::StatusCode::kInvalidArgument);
  // auto: half the free HBM, capped at 8 GiB.
  EXPECT_EQ(AutoGpuTierBytes(int64_t{6} << 30), int64_t{3} << 30);
  EXPECT_EQ(AutoGpuTierBytes(int64_t{139} << 30), int64_t{8} << 30);
}

TEST(ConfigTest, GpuDeviceLists) {
  Config c;
  EXPECT_THAT(*GpuDevices(c, 2), ::testing::ElementsAre(0));  // --gpu-device alone
  c.gpu_device = 1;
  EXPECT_THAT(*GpuDevices(c, 2), ::testing::ElementsAre(1));
  EXPECT_EQ(GpuDevices(c, 1).status().code(), absl::StatusCode::kInvalidArgument);
  c.gpu_devices = "all";
  EXPECT_THAT(*GpuDevices(c, 3), ::testing::ElementsAre(0, 1, 2));
  EXPECT_EQ(GpuDevices(c, 0).status().code(), absl::StatusCode::kInvalidArgument);
  c.gpu_devices = "2,0";
  EXPECT_THAT(*GpuDevices(c, 4), ::testing::ElementsAre(2, 0));
  EXPECT_EQ(GpuDevices(c, 2).status().code(), absl::StatusCode::kInvalidArgument);  // no 2
  for (const char* bad : {"0,0", "0,", "x", "1;2", "-1"}) {
    c.gpu_devices = bad;
    EXPECT_EQ(GpuDevices(c, 4).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  Config y;
  ASSERT_TRUE(ApplyYaml("gpu_devices: 0,1\ngpu_transfer: peer\n", &y).ok());
  EXPECT_THAT(*GpuDevices(y, 2), ::testing::ElementsAre(0, 1));
  EXPECT_EQ(y.gpu_transfer, "peer");
}

TEST(ConfigTest, HelpListsEveryFlagWithItsDefault) {
  bool help = false;
  ASSERT_TRUE(Parse({"--help"}, &help).ok());
  EXPECT_TRUE(help);
  const std::string u = Usage();
  for (const char* f : {"--listen", "--config", "--host-tier-bytes", "--disk-dir", "--metrics-port",
                        "--log-level", "--max-inflight-bytes", "--shutdown-grace-seconds", "--gpu",
                        "--gpu-device", "--gpu-devices", "--gpu-tier-bytes", "--gpu-transfer"}) {
    EXPECT_NE(u.find(f), std::string::npos) << f;
  }
  EXPECT_NE(u.find("127.0.0.1:50051"), std::string::npos);
}

}  // namespace
}  // namespace vqkv::vqkvd
