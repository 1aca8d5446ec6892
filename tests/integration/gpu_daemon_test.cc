// vqkvd with a GPU (label gpu): codes encoded by rvq-cuda / scalar-cuda and kept in the GPU tier
// (HBM arena), real tinystories-656k K/V, compared with a second daemon on the CPU path
// (--gpu=off) and with the CPU codec in-process; then a GPU tier too small for the data, so
// blocks are demoted to the host tier and promoted back, with the same results. Every test
// skips without a CUDA device. On a GPU machine without this build tree, $VQKV_VQKVD names the
// daemon and $VQKV_TEST_MODEL_DIR the model folder.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/rvq_fit.h"
#include "model/llama.h"
#include "server/store/gpu_tier.h"
#include "tests/integration/service_test_util.h"

namespace vqkv::testing {
namespace {

using client::BlockPut;
using client::GetOptions;
using client::ModelInfo;

constexpr int kSeqs = 4, kSeqTokens = 128, kBlockTokens = 16;
constexpr int kBlocksPerSeq = kSeqTokens / kBlockTokens;

std::string ModelDir() {
  const char* env = std::getenv("VQKV_TEST_MODEL_DIR");
  return env != nullptr && *env != '\0' ? env
                                        : std::string(VQKV_SHARED_DIR) + "/models/tinystories-656k";
}

// Real K/V of tinystories-656k: kSeqs greedy continuations of different first tokens, cut into
// fp16 blocks [layers, 2, kBlockTokens, kv_heads, head_dim]; plus a codebook fitted on them.
struct RealKv {
  int layers = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::string> blocks;  // fp16
  std::vector<std::string> hashes;
  std::vector<int64_t> first_tokens;
  kernels::KvSamples samples;
};

absl::StatusOr<RealKv> CaptureRealKv() {
  auto model = model::LlamaModel::Load(ModelDir());
  if (!model.ok()) return model.status();
  const model::LlamaConfig& c = model->config();
  RealKv r;
  r.layers = c.num_hidden_layers;
  r.kv_heads = c.num_key_value_heads;
  r.head_dim = c.head_dim;
  r.samples.layers = r.layers;
  r.samples.kv_heads = r.kv_heads;
  r.samples.head_dim = r.head_dim;
  r.samples.k.resize(r.layers);
  r.samples.v.resize(r.layers);
  const size_t row = size_t(r.kv_heads) * r.head_dim;
  for (int s = 0; s < kSeqs; ++s) {
    // BOS, a first token, then the model's own greedy story (a new story after each EOS).
    std::vector<int> tokens = {1, 300 + 97 * s};
    while (static_cast<int>(tokens.size()) < kSeqTokens) {
      auto more = model->Generate(tokens, kSeqTokens - static_cast<int>(tokens.size()));
      if (!more.ok()) return more.status();
      if (more->empty()) return absl::InternalError("the model generated nothing");
      tokens.insert(tokens.end(), more->begin(), more->end());
      if (tokens.back() == 2 && static_cast<int>(tokens.size()) < kSeqTokens) tokens.push_back(1);
    }
    tokens.resize(kSeqTokens);
    model::KvCache cache;
    model::ForwardOptions fo;
    fo.capture = &cache;
    fo.capture_queries = false;
    if (auto f = model->Forward(tokens, fo); !f.ok()) return f.status();
    for (int l = 0; l < r.layers; ++l) {
      r.samples.k[l].insert(r.samples.k[l].end(), cache.k[l].begin(), cache.k[l].end());
      r.samples.v[l].insert(r.samples.v[l].end(), cache.v[l].begin(), cache.v[l].end());
    }
    r.samples.seq_lens.push_back(kSeqTokens);
    for (int b = 0; b < kBlocksPerSeq; ++b) {
      const kernels::KvShape shape{r.layers, kBlockTokens, r.kv_heads, r.head_dim};
      std::vector<float> x(shape.elements());
      for (int l = 0; l < r.layers; ++l) {
        const size_t from = size_t(b) * kBlockTokens * row, n = size_t(kBlockTokens) * row;
        std::memcpy(&x[shape.Offset(l, 0, 0, 0)], cache.k[l].data() + from, n * 4);
        std::memcpy(&x[shape.Offset(l, 1, 0, 0)], cache.v[l].data() + from, n * 4);
      }
      std::string f16(x.size() * 2, '\0');
      FromFloat(x.data(), x.size(), DType::kF16, f16.data());
      r.blocks.push_back(std::move(f16));
      r.hashes.push_back(absl::StrCat("ts-", s, "-", b));
      r.first_tokens.push_back(int64_t{b} * kBlockTokens);
    }
  }
  return r;
}

class GpuDaemonTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (store::GpuDeviceCount() == 0) return;
    kv_ = new absl::StatusOr<RealKv>(CaptureRealKv());
    if (!kv_->ok()) return;
    kernels::FitOptions fo;
    fo.iterations = 6;
    const RealKv& r = **kv_;
    auto cb = kernels::FitCodebook(
        kernels::RvqConfig::Uniform(r.layers, r.kv_heads, r.head_dim, {4, 256}, {2, 256}),
        r.samples, fo);
    codebook_ = new absl::StatusOr<kernels::Codebook>(std::move(cb));
  }
  static void TearDownTestSuite() {
    delete kv_;
    delete codebook_;
    kv_ = nullptr;
    codebook_ = nullptr;
  }

  void SetUp() override {
    if (store::GpuDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    ASSERT_TRUE(kv_->ok()) << "tinystories K/V from " << ModelDir() << ": " << kv_->status();
    ASSERT_TRUE(codebook_->ok()) << codebook_->status();
  }
  void TearDown() override {
    if (!HasFailure()) return;
    for (auto& [name, d] : daemons_) std::cerr << "--- vqkvd " << name << " log ---\n" << d->Log();
  }

  const RealKv& kv() const { return **kv_; }
  ModelInfo Model(const std::string& id, const std::string& codec) const {
    ModelInfo m;
    m.model_id = id;
    m.layers = kv().layers;
    m.kv_heads = kv().kv_heads;
    m.head_dim = kv().head_dim;
    m.dtype = DType::kF16;
    m.block_tokens = kBlockTokens;
    m.codec = codec;
    return m;
  }

  // Starts a daemon, registers the rvq model (with the codebook) and the scalar model.
  std::unique_ptr<client::Client> StartDaemon(const std::string& name,
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
    EXPECT_TRUE((*c)->RegisterModel(Model("ts-rvq", "rvq")).ok());
    EXPECT_TRUE((*c)->RegisterModel(Model("ts-scalar", "scalar-2")).ok());
    auto up = (*c)->UploadCodebook("ts-rvq", (*codebook_)->Serialize(), true);
    EXPECT_TRUE(up.ok()) << up.status();
    return *std::move(c);
  }

  // Puts blocks [first, first + n) in calls of `per_call` blocks.
  void PutBlocks(client::Client& c, const std::string& model_id, int first, int n, int per_call) {
    const ModelInfo m = Model(model_id, model_id == "ts-rvq" ? "rvq" : "scalar-2");
    for (int i = first; i < first + n; i += per_call) {
      std::vector<BlockPut> puts;
      for (int j = i; j < std::min(first + n, i + per_call); ++j) {
        BlockPut b;
        b.hash = kv().hashes[j];
        b.first_token = kv().first_tokens[j];
        b.data = kv().blocks[j].data();
        b.bytes = kv().blocks[j].size();
        puts.push_back(b);
      }
      auto r = c.Put(m, puts);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(r->stored, static_cast<int64_t>(puts.size()));
    }
  }

  std::vector<client::BlockGot> Get(client::Client& c, const std::string& model_id,
                                    bool codes = false) {
    GetOptions o;
    o.codes = codes;
    auto got = c.Get(model_id, kv().hashes, o);
    EXPECT_TRUE(got.ok()) << got.status();
    return got.ok() ? *std::move(got) : std::vector<client::BlockGot>{};
  }

  static const v1::TierStats* TierOf(const v1::GetStatsResponse& s, v1::Tier t) {
    for (const auto& ts : s.tiers()) {
      if (ts.tier() == t) return &ts;
    }
    return nullptr;
  }

  static absl::StatusOr<RealKv>* kv_;
  static absl::StatusOr<kernels::Codebook>* codebook_;
  std::vector<std::pair<std::string, std::unique_ptr<Daemon>>> daemons_;
};

absl::StatusOr<RealKv>* GpuDaemonTest::kv_ = nullptr;
absl::StatusOr<kernels::Codebook>* GpuDaemonTest::codebook_ = nullptr;

// Per vector (head_dim values of one token, head, K/V, layer) of two fp16 blocks: whether they
// are bit-identical.
int64_t DifferingVectors(const std::string& a, const std::string& b, int head_dim) {
  const size_t vec = size_t(head_dim) * 2;
  int64_t n = 0;
  for (size_t off = 0; off + vec <= a.size(); off += vec) {
    n += std::memcmp(a.data() + off, b.data() + off, vec) != 0;
  }
  return n;
}

double SquaredError(const std::string& a, const std::string& ref, double* ref_energy) {
  std::vector<float> x(a.size() / 2), y(ref.size() / 2);
  ToFloat(DType::kF16, a.data(), x.size(), x.data());
  ToFloat(DType::kF16, ref.data(), y.size(), y.data());
  double e = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    e += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    *ref_energy += double(y[i]) * y[i];
  }
  return e;
}

TEST_F(GpuDaemonTest, CodesLiveInHbmAndMatchTheCpuPath) {
  auto gpu = StartDaemon("gpu", {"--gpu=on", "--gpu-tier-bytes=64MiB"});
  auto cpu = StartDaemon("cpu", {"--gpu=off"});
  ASSERT_TRUE(gpu != nullptr && cpu != nullptr);
  const int n = static_cast<int>(kv().blocks.size());
  PutBlocks(*gpu, "ts-rvq", 0, n, n);
  PutBlocks(*gpu, "ts-scalar", 0, n, n);
  PutBlocks(*cpu, "ts-rvq", 0, n, n);
  PutBlocks(*cpu, "ts-scalar", 0, n, n);

  // Every block sits in the GPU tier; the host tier below it is empty.
  auto stats = gpu->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  ASSERT_GE(stats->tiers_size(), 2);
  EXPECT_EQ(stats->tiers(0).tier(), v1::TIER_GPU);
  EXPECT_EQ(stats->tiers(0).capacity_bytes(), int64_t{64} << 20);
  EXPECT_EQ(stats->tiers(0).blocks(), 2 * n);
  EXPECT_EQ(stats->tiers(0).used_bytes(), stats->stored_bytes());
  EXPECT_EQ(stats->tiers(1).tier(), v1::TIER_HOST);
  EXPECT_EQ(stats->tiers(1).blocks(), 0);
  auto cpu_stats = cpu->Stats();
  ASSERT_TRUE(cpu_stats.ok());
  EXPECT_EQ(cpu_stats->tiers(0).tier(), v1::TIER_HOST);
  EXPECT_EQ(TierOf(*cpu_stats, v1::TIER_GPU), nullptr);
  auto lookup = gpu->Lookup("ts-rvq", kv().hashes);
  ASSERT_TRUE(lookup.ok());
  EXPECT_EQ(lookup->prefix_blocks, n);
  for (v1::Tier t : lookup->tiers) EXPECT_EQ(t, v1::TIER_GPU);

  kernels::CodecSpec spec = *kernels::ParseCodecSpec("rvq");
  spec.codebook = std::make_shared<const kernels::Codebook>(**codebook_);
  auto cpu_codec = kernels::CreateCodec(spec);
  ASSERT_TRUE(cpu_codec.ok());

  // rvq: GPU tensors = CPU decode of the GPU's codes, bit for bit (fp32 tables, same sums);
  // GPU and CPU codes differ only at near-ties: at most 1% of vectors, with the same error.
  const auto g_t = Get(*gpu, "ts-rvq"), g_c = Get(*gpu, "ts-rvq", true);
  const auto c_t = Get(*cpu, "ts-rvq"), c_c = Get(*cpu, "ts-rvq", true);
  ASSERT_EQ(g_t.size(), size_t(n));
  ASSERT_EQ(c_c.size(), size_t(n));
  int64_t vectors = 0, differing = 0;
  double err_gpu = 0, err_cpu = 0, energy = 0, unused = 0;
  for (int i = 0; i < n; ++i) {
    ASSERT_TRUE(g_t[i].found && g_c[i].found && c_t[i].found && c_c[i].found) << i;
    EXPECT_EQ(g_t[i].tier, v1::TIER_GPU) << i;
    EXPECT_EQ(c_t[i].tier, v1::TIER_HOST) << i;
    ASSERT_EQ(g_c[i].data.size(), c_c[i].data.size()) << i;
    std::string own(kv().blocks[i].size(), '\0');
    void* ptr = own.data();
    size_t bytes = own.size();
    std::string_view p = g_c[i].data;
    ASSERT_TRUE((*cpu_codec)->Decode({&p, 1}, DType::kF16, {&ptr, 1}, {&bytes, 1}).ok());
    EXPECT_EQ(g_t[i].data, own) << "GPU decode differs from the CPU decode of its codes, block "
                                << i;
    vectors += static_cast<int64_t>(own.size()) / (2 * kv().head_dim);
    differing += DifferingVectors(g_t[i].data, c_t[i].data, kv().head_dim);
    err_gpu += SquaredError(g_t[i].data, kv().blocks[i], &energy);
    err_cpu += SquaredError(c_t[i].data, kv().blocks[i], &unused);
  }
  std::printf(
      "rvq: %lld of %lld vectors differ between GPU and CPU codes; relative error GPU "
      "%.6g, CPU %.6g\n",
      static_cast<long long>(differing), static_cast<long long>(vectors), err_gpu / energy,
      err_cpu / energy);
  EXPECT_LE(differing * 100, vectors) << "more than 1% of vectors coded differently";
  EXPECT_NEAR(err_gpu / energy, err_cpu / energy, 0.01 * err_cpu / energy);
  EXPECT_LT(err_gpu / energy, 0.5);  // a real reconstruction, not noise

  // scalar: the GPU quantizer is the CPU's exactly: same payloads, same tensors.
  const auto gs_t = Get(*gpu, "ts-scalar"), gs_c = Get(*gpu, "ts-scalar", true);
  const auto cs_t = Get(*cpu, "ts-scalar"), cs_c = Get(*cpu, "ts-scalar", true);
  ASSERT_EQ(gs_t.size(), size_t(n));
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(gs_c[i].data, cs_c[i].data) << "scalar payload " << i;
    EXPECT_EQ(gs_t[i].data, cs_t[i].data) << "scalar tensor " << i;
    EXPECT_EQ(gs_t[i].tier, v1::TIER_GPU);
  }

  // A layer range in fp32 through the pinned decode buffers.
  GetOptions o;
  o.model_dtype = false;
  o.dtype = DType::kF32;
  o.layer_begin = kv().layers - 1;
  o.layer_end = kv().layers;
  auto last = gpu->Get("ts-rvq", kv().hashes, o);
  ASSERT_TRUE(last.ok()) << last.status();
  for (int i = 0; i < n; ++i) {
    std::vector<float> want(g_t[i].data.size() / 2);
    ToFloat(DType::kF16, g_t[i].data.data(), want.size(), want.data());
    const size_t layer = want.size() / kv().layers;
    std::vector<float> got((*last)[i].data.size() / 4);
    ASSERT_EQ(got.size(), layer) << i;
    std::memcpy(got.data(), (*last)[i].data.data(), got.size() * 4);
    // The fp32 output is the unrounded sum; the fp16 one is its rounding.
    std::string rounded(layer * 2, '\0');
    FromFloat(got.data(), got.size(), DType::kF16, rounded.data());
    EXPECT_EQ(0, std::memcmp(rounded.data(), g_t[i].data.data() + (kv().layers - 1) * layer * 2,
                             layer * 2))
        << i;
  }
  EXPECT_EQ(daemons_[0].second->Terminate(), 0);
  EXPECT_NE(daemons_[0].second->Log().find("rvq-cuda"), std::string::npos);
}

TEST_F(GpuDaemonTest, SmallGpuTierDemotesToHostAndReturnsTheSameData) {
  auto ref = StartDaemon("gpu-large", {"--gpu=on", "--gpu-tier-bytes=64MiB"});
  ASSERT_TRUE(ref != nullptr);
  const int n = static_cast<int>(kv().blocks.size());
  PutBlocks(*ref, "ts-rvq", 0, n, n);
  const auto want_t = Get(*ref, "ts-rvq"), want_c = Get(*ref, "ts-rvq", true);
  ASSERT_EQ(want_c.size(), size_t(n));
  // Room for about four payloads (plus the arena's 256-byte alignment): most blocks must go down.
  size_t biggest = 0;
  for (const auto& b : want_c) biggest = std::max(biggest, b.data.size());
  const int64_t tier = 4 * static_cast<int64_t>((biggest + 255) / 256 * 256);
  auto small = StartDaemon("gpu-small", {"--gpu=on", absl::StrCat("--gpu-tier-bytes=", tier)});
  ASSERT_TRUE(small != nullptr);
  PutBlocks(*small, "ts-rvq", 0, n, 2);
  auto stats = small->Stats();
  ASSERT_TRUE(stats.ok());
  const v1::TierStats* g = TierOf(*stats, v1::TIER_GPU);
  const v1::TierStats* h = TierOf(*stats, v1::TIER_HOST);
  ASSERT_TRUE(g != nullptr && h != nullptr);
  EXPECT_EQ(g->capacity_bytes(), tier);
  EXPECT_LE(g->used_bytes(), tier);
  EXPECT_GT(g->blocks(), 0);
  EXPECT_GT(g->demotions(), 0);
  EXPECT_GT(h->blocks(), 0);
  EXPECT_EQ(g->blocks() + h->blocks(), n);
  EXPECT_EQ(stats->evictions(), 0);

  // Every block comes back identical (codes and tensors), wherever it was; reads from the host
  // tier promote blocks back into the arena.
  const auto got_t = Get(*small, "ts-rvq"), got_c = Get(*small, "ts-rvq", true);
  ASSERT_EQ(got_t.size(), size_t(n));
  int from_host = 0;
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(got_c[i].data, want_c[i].data) << "codes of block " << i;
    EXPECT_EQ(got_t[i].data, want_t[i].data) << "tensor of block " << i;
    from_host += got_t[i].tier == v1::TIER_HOST;
  }
  EXPECT_GT(from_host, 0);
  stats = small->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GT(TierOf(*stats, v1::TIER_GPU)->promotions(), 0);
  EXPECT_LE(TierOf(*stats, v1::TIER_GPU)->used_bytes(), tier);
  EXPECT_EQ(stats->blocks(), n);
}

TEST_F(GpuDaemonTest, GpuOnWithABadDeviceFailsToStart) {
  auto d = Daemon::Start({"--gpu=on", "--gpu-device=4096"});
  ASSERT_FALSE(d.ok());
  EXPECT_NE(std::string(d.status().message()).find("4096"), std::string::npos) << d.status();
}

}  // namespace
}  // namespace vqkv::testing
