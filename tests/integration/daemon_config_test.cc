// vqkvd configuration end to end: YAML preloading, the disk tier, the metrics endpoint, --help.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "tests/integration/service_test_util.h"

namespace vqkv::testing {
namespace {

using client::ModelInfo;

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return "";
  }
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, n);
  close(fd);
  return out;
}

class ConfiguredDaemonTest : public ServiceTest {
 protected:
  std::vector<std::string> DaemonArgs() const override {
    const std::string yaml = ::testing::TempDir() + "vqkvd_it_config.yaml";
    std::ofstream(yaml) << "host_tier_bytes: 100KiB\n"
                           "disk_dir: "
                        << DiskDir()
                        << "\n"
                           "disk_tier_bytes: 1MiB\n"
                           "high_watermark: 1.0\n"
                           "low_watermark: 1.0\n"
                           "models:\n"
                           "  - {id: preloaded, layers: 4, kv_heads: 2, head_dim: 32,\n"
                           "     block_tokens: 32, dtype: f16, codec: raw}\n";
    return {"--config=" + yaml, "--metrics-port=" + std::to_string(metrics_port_)};
  }
  static std::string DiskDir() {
    return ::testing::TempDir() + "vqkvd_it_disk_" + std::to_string(getpid());
  }
  const int metrics_port_ = FreePort();
};

TEST_F(ConfiguredDaemonTest, PreloadedModelDiskTierAndMetrics) {
  // The model from the YAML file is registered before the daemon reports SERVING.
  const ModelInfo m = SmallModel("preloaded", "raw");
  auto again = client_->RegisterModel(m);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created());
  // 12 blocks of 32 KiB: 3 fit in the 100 KiB host tier, the rest spill to disk.
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(PutRange(m, i, 1).ok()) << i;
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  ASSERT_EQ(stats->tiers_size(), 2);
  EXPECT_EQ(stats->tiers(1).tier(), v1::TIER_DISK);
  EXPECT_EQ(stats->blocks(), 12);
  EXPECT_EQ(stats->evictions(), 0);
  EXPECT_GT(stats->tiers(1).blocks(), 0);
  EXPECT_LE(stats->tiers(0).used_bytes(), 100 * 1024);
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(DiskDir())) {
    files += e.path().extension() == ".blk";
  }
  EXPECT_EQ(files, stats->tiers(1).blocks());
  auto l = client_->Lookup(m.model_id, {HashOf(0)});
  ASSERT_EQ(l->tiers.size(), 1u);
  EXPECT_EQ(l->tiers[0], v1::TIER_DISK);
  // Everything reads back exactly, from whichever tier.
  for (int i = 0; i < 12; ++i) {
    auto got = client_->Get(m.model_id, {HashOf(i)});
    ASSERT_TRUE(got.ok()) << i << got.status();
    EXPECT_EQ((*got)[0].data, RandomBlock(m, i)) << i;
  }
  stats = client_->Stats();
  EXPECT_GT(stats->tiers(0).promotions(), 0);
  EXPECT_GT(stats->tiers(1).hits(), 0);

  const std::string metrics = HttpGet(metrics_port_, "/metrics");
  EXPECT_NE(metrics.find("vqkv_blocks 12"), std::string::npos) << metrics.substr(0, 2000);
  EXPECT_NE(metrics.find("vqkv_tier_used_bytes{tier=\"disk\"}"), std::string::npos);
  EXPECT_NE(metrics.find("vqkv_model_blocks{model=\"preloaded\"} 12"), std::string::npos);
  EXPECT_NE(metrics.find("vqkv_rpc_total{method=\"PutBlocks\",code=\"OK\"} 12"), std::string::npos);
  EXPECT_EQ(daemon_->Terminate(), 0);
  // The disk tier removes its files on exit.
  files = 0;
  for (const auto& e : std::filesystem::directory_iterator(DiskDir())) {
    files += e.path().extension() == ".blk";
  }
  EXPECT_EQ(files, 0);
  std::filesystem::remove_all(DiskDir());
}

TEST(VqkvdFlagsTest, HelpAndBadFlags) {
  auto help = SpawnWithStdout({VqkvdPath(), "--help"}, "/dev/null");
  ASSERT_TRUE(help.ok());
  auto line = ReadLine(help->second, absl::Seconds(10));
  ASSERT_TRUE(line.ok());
  EXPECT_NE(line->find("vqkvd"), std::string::npos);
  EXPECT_EQ(*WaitExit(help->first, absl::Seconds(10)), 0);
  close(help->second);
  auto bad =
      SpawnWithStdout({VqkvdPath(), "--listen=127.0.0.1:0", "--no-such-flag=1"}, "/dev/null");
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(*WaitExit(bad->first, absl::Seconds(10)), 2);
  close(bad->second);
  auto busy = SpawnWithStdout({VqkvdPath(), "--listen=256.0.0.1:1"}, "/dev/null");
  ASSERT_TRUE(busy.ok());
  EXPECT_EQ(*WaitExit(busy->first, absl::Seconds(10)), 1);
  close(busy->second);
}

}  // namespace
}  // namespace vqkv::testing
