// One vqkvd managing two GPUs (label multi_gpu; skips with fewer than 2 CUDA devices): puts
// placed by free tier bytes or on a named device, gets that name another device move the codes
// there and decode there, with tensors bit-identical to a single-GPU daemon decoding the same
// codes; Lookup and GetStats report devices; an unknown device is INVALID_ARGUMENT.
// On a GPU machine without this build tree, $VQKV_VQKVD names the daemon.
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/codebook.h"
#include "kernels/rvq_fit.h"
#include "server/store/gpu_tier.h"
#include "tests/integration/service_test_util.h"

namespace vqkv::testing {
namespace {

using client::BlockPut;
using client::GetOptions;
using client::ModelInfo;
using client::PutOptions;

constexpr int kBlocks = 8;

class MultiGpuDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const int n = store::GpuDeviceCount();
    if (n < 2) GTEST_SKIP() << "needs 2 CUDA devices, " << n << " visible (label multi_gpu)";
    multi_ = Start("multi", {"--gpu=on", "--gpu-devices=0,1", "--gpu-tier-bytes=256MiB"});
    single_ = Start("single", {"--gpu=on", "--gpu-device=0", "--gpu-tier-bytes=256MiB"});
    ASSERT_TRUE(multi_ != nullptr && single_ != nullptr);
  }
  void TearDown() override {
    if (!HasFailure()) return;
    for (auto& [name, d] : daemons_) std::cerr << "--- vqkvd " << name << " log ---\n" << d->Log();
  }

  static ModelInfo Rvq() { return SmallModel("mg-rvq", "rvq"); }
  static ModelInfo Scalar() { return SmallModel("mg-scalar", "scalar-2"); }

  static std::string CodebookFile() {
    const ModelInfo m = Rvq();
    kernels::KvSamples s;
    s.layers = m.layers;
    s.kv_heads = m.kv_heads;
    s.head_dim = m.head_dim;
    const int64_t n = int64_t{512} * m.kv_heads * m.head_dim;
    for (int l = 0; l < m.layers; ++l) {
      s.k.push_back(RandomFloats(n, m.head_dim, 100 + l));
      s.v.push_back(RandomFloats(n, m.head_dim, 200 + l));
    }
    kernels::FitOptions fo;
    fo.iterations = 4;
    auto cb = kernels::FitCodebook(
        kernels::RvqConfig::Uniform(m.layers, m.kv_heads, m.head_dim, {4, 64}, {2, 64}), s, fo);
    EXPECT_TRUE(cb.ok()) << cb.status();
    return cb.ok() ? cb->Serialize() : std::string();
  }

  std::unique_ptr<client::Client> Start(const std::string& name,
                                        const std::vector<std::string>& args) {
    auto d = Daemon::Start(args);
    EXPECT_TRUE(d.ok()) << d.status();
    if (!d.ok()) return nullptr;
    client::ClientOptions o;
    o.target = (*d)->address();
    o.timeout = absl::Seconds(60);
    daemons_.emplace_back(name, *std::move(d));
    auto c = client::Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return nullptr;
    EXPECT_TRUE((*c)->RegisterModel(Rvq()).ok());
    EXPECT_TRUE((*c)->RegisterModel(Scalar()).ok());
    static const std::string* codebook = new std::string(CodebookFile());
    auto up = (*c)->UploadCodebook(Rvq().model_id, *codebook, true);
    EXPECT_TRUE(up.ok()) << up.status();
    return *std::move(c);
  }

  // Puts blocks [first, first + n) of `m` (tensors or codes) in one call.
  void Put(client::Client& c, const ModelInfo& m, int first, int n, int device,
           const std::vector<std::string>* codes = nullptr) {
    std::vector<std::string> data;
    std::vector<BlockPut> puts;
    for (int i = first; i < first + n; ++i) {
      data.push_back(codes != nullptr ? (*codes)[i - first] : RandomBlock(m, i));
    }
    for (int i = first; i < first + n; ++i) {
      BlockPut b;
      b.hash = HashOf(i);
      b.data = data[i - first].data();
      b.bytes = data[i - first].size();
      puts.push_back(b);
    }
    PutOptions po;
    po.device = device;
    po.codes = codes != nullptr;
    auto r = c.Put(m, puts, po);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->stored, n);
  }

  std::vector<std::string> Hashes(int first, int n) {
    std::vector<std::string> h;
    for (int i = first; i < first + n; ++i) h.push_back(HashOf(i));
    return h;
  }

  std::vector<int32_t> Devices(client::Client& c, const ModelInfo& m, int first, int n) {
    auto l = c.Lookup(m.model_id, Hashes(first, n));
    EXPECT_TRUE(l.ok()) << l.status();
    return l.ok() ? l->devices : std::vector<int32_t>{};
  }

  std::vector<std::pair<std::string, std::unique_ptr<Daemon>>> daemons_;
  std::unique_ptr<client::Client> multi_, single_;
};

TEST_F(MultiGpuDaemonTest, CrossDeviceGetMatchesTheSingleDeviceResult) {
  for (const ModelInfo& m : {Rvq(), Scalar()}) {
    SCOPED_TRACE(m.model_id);
    Put(*multi_, m, 0, kBlocks, /*device=*/1);
    EXPECT_EQ(Devices(*multi_, m, 0, kBlocks), std::vector<int32_t>(kBlocks, 1));
    GetOptions codes;
    codes.codes = true;
    auto c = multi_->Get(m.model_id, Hashes(0, kBlocks), codes);
    ASSERT_TRUE(c.ok()) << c.status();
    std::vector<std::string> payloads;
    for (const auto& b : *c) {
      EXPECT_EQ(b.device, 1);
      payloads.push_back(b.data);
    }
    // The single-GPU daemon decodes the same codes: the reference.
    Put(*single_, m, 0, kBlocks, -1, &payloads);
    auto ref = single_->Get(m.model_id, Hashes(0, kBlocks));
    ASSERT_TRUE(ref.ok()) << ref.status();

    GetOptions on0;
    on0.device = 0;
    auto got = multi_->Get(m.model_id, Hashes(0, kBlocks), on0);
    ASSERT_TRUE(got.ok()) << got.status();
    for (int i = 0; i < kBlocks; ++i) {
      EXPECT_EQ((*got)[i].device, 0) << i;
      EXPECT_TRUE((*got)[i].data == (*ref)[i].data) << "block " << i << " decoded on device 0 "
                                                    << "differs from the single-GPU decode";
    }
    // The codes now live on device 0, unchanged.
    EXPECT_EQ(Devices(*multi_, m, 0, kBlocks), std::vector<int32_t>(kBlocks, 0));
    auto moved = multi_->Get(m.model_id, Hashes(0, kBlocks), codes);
    ASSERT_TRUE(moved.ok()) << moved.status();
    for (int i = 0; i < kBlocks; ++i) EXPECT_TRUE((*moved)[i].data == payloads[i]) << i;
  }
  auto stats = multi_->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  ASSERT_GE(stats->tiers_size(), 3);
  EXPECT_EQ(stats->tiers(0).tier(), v1::TIER_GPU);
  EXPECT_EQ(stats->tiers(0).device(), 0);
  EXPECT_EQ(stats->tiers(1).device(), 1);
  EXPECT_EQ(stats->tiers(0).transfers_in(), 2 * kBlocks);
  EXPECT_EQ(stats->tiers(1).transfers_out(), 2 * kBlocks);
  EXPECT_EQ(stats->tiers(0).transfer_failures(), 0);
  EXPECT_EQ(stats->tiers(0).blocks(), 2 * kBlocks);
  EXPECT_EQ(stats->tiers(1).blocks(), 0);
}

TEST_F(MultiGpuDaemonTest, PutsGoToTheDeviceWithMostFreeBytes) {
  const ModelInfo m = Scalar();
  Put(*multi_, m, 0, 4, -1);  // both empty: the first device
  Put(*multi_, m, 4, 2, -1);  // device 1 has more free bytes now
  Put(*multi_, m, 6, 2, -1);  // device 1 holds 2 blocks, device 0 4
  EXPECT_EQ(Devices(*multi_, m, 0, 8), (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 1}));
  // Without a destination each block is decoded where it is.
  auto got = multi_->Get(m.model_id, Hashes(0, 8));
  ASSERT_TRUE(got.ok()) << got.status();
  for (int i = 0; i < 8; ++i) EXPECT_EQ((*got)[i].device, i < 4 ? 0 : 1) << i;
}

TEST_F(MultiGpuDaemonTest, UnknownDeviceIsInvalidArgument) {
  const ModelInfo m = Scalar();
  std::string data = RandomBlock(m, 0);
  BlockPut b;
  b.hash = HashOf(0);
  b.data = data.data();
  b.bytes = data.size();
  PutOptions po;
  po.device = 7;
  auto put = multi_->Put(m, {b}, po);
  EXPECT_EQ(put.status().code(), absl::StatusCode::kInvalidArgument) << put.status();
  EXPECT_NE(put.status().message().find("0, 1"), std::string::npos) << put.status();
  Put(*multi_, m, 0, 1, 0);
  GetOptions go;
  go.device = 2;
  EXPECT_EQ(multi_->Get(m.model_id, {HashOf(0)}, go).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace vqkv::testing
