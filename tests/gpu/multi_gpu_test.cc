// Several GPUs (label multi_gpu; every test skips with fewer than 2 devices): the transport's
// paths (peer copy, NCCL send/recv, host staging) move bytes exactly, 1 GiB of codes crosses
// devices, and the store over two GPU tiers places blocks by free bytes, moves codes to the
// device a read names, and reads a failed device's blocks as misses.
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/store/block_store.h"
#include "server/store/gpu_tier.h"
#include "server/store/gpu_transport.h"

namespace vqkv::store {
namespace {

// Device memory on one device, freed on destruction.
struct DeviceBytes {
  DeviceBytes(int device, size_t n) : device(device), size(n) {
    (void)cudaSetDevice(device);
    if (cudaMalloc(&p, n) != cudaSuccess) p = nullptr;
  }
  ~DeviceBytes() {
    (void)cudaSetDevice(device);
    (void)cudaFree(p);
  }
  int device;
  size_t size;
  void* p = nullptr;
};

std::string Pattern(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  std::mt19937 rng(seed);
  for (size_t i = 0; i + 4 <= n; i += 4) {
    const uint32_t v = rng();
    std::memcpy(&s[i], &v, 4);
  }
  return s;
}

class MultiGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const int n = GpuDeviceCount();
    if (n < 2) GTEST_SKIP() << "needs 2 CUDA devices, " << n << " visible (label multi_gpu)";
  }

  std::shared_ptr<GpuTransport> Transport(const std::string& mode) {
    GpuTransportOptions o;
    o.devices = {0, 1};
    o.mode = mode;
    auto t = GpuTransport::Create(o);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : nullptr;
  }

  // Copies `n` pattern bytes 0 -> 1 and back 1 -> 0 through `t` and checks both.
  void RoundTrip(GpuTransport& t, size_t n, GpuTransferPath want) {
    const std::string pattern = Pattern(n, static_cast<uint32_t>(n));
    DeviceBytes a(0, n), b(1, n), c(0, n);
    ASSERT_TRUE(a.p && b.p && c.p) << "cudaMalloc of " << n << " bytes";
    (void)cudaSetDevice(0);
    ASSERT_EQ(cudaMemcpy(a.p, pattern.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
    GpuTransferPath used = GpuTransferPath::kHost;
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    ASSERT_TRUE(t.Copy(1, b.p, 0, a.p, static_cast<int64_t>(n), deadline, &used).ok());
    EXPECT_EQ(used, want);
    ASSERT_TRUE(t.Copy(0, c.p, 1, b.p, static_cast<int64_t>(n), deadline, &used).ok());
    EXPECT_EQ(used, want);
    std::string back(n, '\0');
    (void)cudaSetDevice(1);
    ASSERT_EQ(cudaMemcpy(back.data(), b.p, n, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_TRUE(back == pattern) << "device 1 copy differs (" << GpuTransferPathName(want) << ")";
    (void)cudaSetDevice(0);
    ASSERT_EQ(cudaMemcpy(back.data(), c.p, n, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_TRUE(back == pattern) << "round trip differs (" << GpuTransferPathName(want) << ")";
  }
};

TEST_F(MultiGpuTest, EveryPathCopiesExactly) {
  auto t = Transport("peer");
  ASSERT_NE(t, nullptr);
  std::printf("%s\n", t->Describe().c_str());
  for (size_t n : {size_t{1}, size_t{4097}, size_t{40} << 20}) {
    ASSERT_TRUE(t->ForcePath(GpuTransferPath::kHost).ok());
    RoundTrip(*t, n, GpuTransferPath::kHost);
    if (t->ForcePath(GpuTransferPath::kPeer).ok()) RoundTrip(*t, n, GpuTransferPath::kPeer);
  }
  auto nccl = GpuTransport::Create({.devices = {0, 1}, .mode = "nccl"});
  if (!nccl.ok()) {
    GTEST_SKIP() << "NCCL path not checked: " << nccl.status();
  }
  std::printf("%s\n", (*nccl)->Describe().c_str());
  EXPECT_EQ((*nccl)->PathFor(0, 1), GpuTransferPath::kNccl);
  for (size_t n : {size_t{1}, size_t{4097}, size_t{40} << 20}) {
    RoundTrip(**nccl, n, GpuTransferPath::kNccl);
  }
  EXPECT_EQ(getenv("NCCL_NVLS_ENABLE"), std::string("0"));
}

TEST_F(MultiGpuTest, OneGiBOfCodesCrossesDevices) {
  auto t = Transport("auto");
  ASSERT_NE(t, nullptr);
  RoundTrip(*t, size_t{1} << 30, t->PathFor(0, 1));
  const GpuTransferCounters c = t->Counters(t->PathFor(0, 1));
  EXPECT_EQ(c.copies, 2);
  EXPECT_EQ(c.bytes, int64_t{2} << 30);
  std::printf("1 GiB over %s: %.1f GB/s\n", GpuTransferPathName(t->PathFor(0, 1)),
              c.bytes / c.seconds / 1e9);
}

TEST_F(MultiGpuTest, NcclErrorFallsBackToPeerOrHost) {
  auto t = GpuTransport::Create({.devices = {0, 1}, .mode = "nccl"});
  if (!t.ok()) GTEST_SKIP() << "no NCCL: " << t.status();
  (*t)->AbortNccl("test: rank failure");
  EXPECT_FALSE((*t)->nccl_active());
  EXPECT_NE((*t)->PathFor(0, 1), GpuTransferPath::kNccl);
  RoundTrip(**t, size_t{8} << 20, (*t)->PathFor(0, 1));
  EXPECT_TRUE((*t)->ForcePath(GpuTransferPath::kNccl).code() ==
              absl::StatusCode::kFailedPrecondition);
}

struct TwoGpuStore {
  std::shared_ptr<GpuTransport> transport;
  std::unique_ptr<BlockStore> store;
};

TwoGpuStore MakeStore(int64_t tier_bytes) {
  TwoGpuStore s;
  auto t = GpuTransport::Create({.devices = {0, 1}});
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return s;
  s.transport = *t;
  StoreOptions o;
  for (int d = 0; d < 2; ++d) {
    auto tier = NewGpuTier({.device = d, .capacity_bytes = tier_bytes, .transport = s.transport});
    EXPECT_TRUE(tier.ok()) << tier.status();
    if (!tier.ok()) return s;
    o.tiers.push_back(*std::move(tier));
  }
  o.tiers.push_back(NewHostTier(int64_t{1} << 30));
  auto store = BlockStore::Create(std::move(o));
  EXPECT_TRUE(store.ok()) << store.status();
  if (store.ok()) s.store = *std::move(store);
  return s;
}

NewBlock Block(int i, size_t n) {
  NewBlock b;
  b.key = BlockKey{"t", "m", "", absl::StrCat("h", i)};
  b.bytes = Pattern(n, 1000 + i);
  b.meta.tokens = 16;
  return b;
}

std::vector<NewBlock> Blocks(int first, int count, size_t n) {
  std::vector<NewBlock> v;
  for (int i = first; i < first + count; ++i) v.push_back(Block(i, n));
  return v;
}

BlockKey Key(int i) { return BlockKey{"t", "m", "", absl::StrCat("h", i)}; }

TEST_F(MultiGpuTest, StorePlacesByFreeBytesAndMovesCodesToTheReader) {
  TwoGpuStore s = MakeStore(int64_t{64} << 20);
  ASSERT_NE(s.store, nullptr);
  ASSERT_TRUE(s.store->Commit(Blocks(0, 4, 1 << 20)).ok());  // tie: device 0
  ASSERT_TRUE(s.store->Commit(Blocks(4, 2, 1 << 20)).ok());  // device 1 has more free
  ASSERT_TRUE(s.store->Commit(Blocks(6, 2, 1 << 20), 1).ok());
  std::vector<int> devices;
  for (const BlockPlace& p :
       s.store->LookupPrefix({Key(0), Key(3), Key(4), Key(5), Key(6), Key(7)})) {
    EXPECT_EQ(p.tier, TierKind::kGpu);
    devices.push_back(p.device);
  }
  EXPECT_EQ(devices, (std::vector<int>{0, 0, 1, 1, 1, 1}));

  auto leases = s.store->Acquire({Key(4), Key(5), Key(0)}, {.device = 0});
  for (int k = 0; k < 3; ++k) {
    ASSERT_TRUE(leases[k].has_value()) << k;
    EXPECT_EQ(leases[k]->device(), 0);
  }
  EXPECT_TRUE(leases[0]->bytes() == Block(4, 1 << 20).bytes);
  EXPECT_TRUE(leases[1]->bytes() == Block(5, 1 << 20).bytes);
  const StoreStats st = s.store->Stats();
  EXPECT_EQ(st.tiers[0].transfers_in, 2);
  EXPECT_EQ(st.tiers[1].transfers_out, 2);
  EXPECT_EQ(st.tiers[0].transfer_failures, 0);
  EXPECT_EQ(st.corrupt_blocks, 0);
}

TEST_F(MultiGpuTest, AFailedRankIsAMiss) {
  TwoGpuStore s = MakeStore(int64_t{16} << 20);
  ASSERT_NE(s.store, nullptr);
  ASSERT_TRUE(s.store->Commit(Blocks(0, 2, 4096), 1).ok());
  ASSERT_TRUE(s.store->Commit(Blocks(2, 1, 4096), 0).ok());
  s.transport->MarkFailed(1);
  const absl::Time start = absl::Now();
  auto leases = s.store->Acquire({Key(0), Key(1), Key(2)},
                                 {.device = 0, .deadline = absl::Now() + absl::Seconds(5)});
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_FALSE(leases[0].has_value());
  EXPECT_FALSE(leases[1].has_value());
  ASSERT_TRUE(leases[2].has_value());
  EXPECT_TRUE(leases[2]->bytes() == Block(2, 4096).bytes);
  const StoreStats st = s.store->Stats();
  EXPECT_EQ(st.misses, 2);
  EXPECT_EQ(st.corrupt_blocks, 0);
  EXPECT_EQ(st.tiers[1].unavailable_reads, 2);
  EXPECT_EQ(st.tiers[0].transfer_failures, 2);
  // Puts aimed at the failed device fail as UNAVAILABLE; the other device still takes them.
  EXPECT_EQ(s.store->Commit(Blocks(9, 1, 4096), 1).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(s.store->Commit(Blocks(9, 1, 4096), 0).ok());
}

}  // namespace
}  // namespace vqkv::store
