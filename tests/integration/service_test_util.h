// Shared pieces of the integration tests: a fixture owning a daemon and a client, model
// descriptions and deterministic random KV blocks.
#pragma once

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/client.h"
#include "common/dtype.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon.h"

namespace vqkv::testing {

inline client::ModelInfo SmallModel(const std::string& id, const std::string& codec,
                                    DType dtype = DType::kF16) {
  client::ModelInfo m;
  m.model_id = id;
  m.layers = 4;
  m.kv_heads = 2;
  m.head_dim = 32;
  m.dtype = dtype;
  m.block_tokens = 32;
  m.codec = codec;
  return m;
}

// Values like real keys: per-channel offsets plus noise; deterministic in `seed`.
inline std::vector<float> RandomFloats(int64_t n, int head_dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> offset(head_dim);
  for (float& o : offset) o = 2 * nd(rng);
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = nd(rng) + offset[i % head_dim];
  return x;
}

// A block tensor of `m` in its dtype.
inline std::string RandomBlock(const client::ModelInfo& m, uint32_t seed, int32_t tokens = 0) {
  if (tokens == 0) tokens = m.block_tokens;
  const int64_t n = int64_t{m.layers} * 2 * tokens * m.kv_heads * m.head_dim;
  std::vector<float> x = RandomFloats(n, m.head_dim, seed);
  std::string out(n * DTypeSize(m.dtype), '\0');
  FromFloat(x.data(), n, m.dtype, out.data());
  return out;
}

inline std::string HashOf(int i, const std::string& salt = "") {
  return absl::StrCat("block-", salt, "-", i);
}

class ServiceTest : public ::testing::Test {
 protected:
  // Extra daemon flags for this fixture.
  virtual std::vector<std::string> DaemonArgs() const { return {}; }

  void SetUp() override {
    auto d = Daemon::Start(DaemonArgs());
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = *std::move(d);
    client_ = NewClient();
  }
  void TearDown() override {
    if (HasFailure() && daemon_ != nullptr) std::cerr << "--- vqkvd log ---\n" << daemon_->Log();
    client_.reset();
    daemon_.reset();
  }
  std::unique_ptr<client::Client> NewClient(int max_attempts = 3) {
    client::ClientOptions o;
    o.target = daemon_->address();
    o.timeout = absl::Seconds(60);
    o.max_attempts = max_attempts;
    auto c = client::Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }
  void Register(const client::ModelInfo& m) {
    auto r = client_->RegisterModel(m);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  // Puts blocks [first, first + n) of `m` (content RandomBlock(m, i), hash HashOf(i)).
  absl::StatusOr<client::PutResult> PutRange(const client::ModelInfo& m, int first, int n,
                                             const std::string& salt = "") {
    std::vector<std::string> data;
    std::vector<client::BlockPut> puts;
    for (int i = first; i < first + n; ++i) data.push_back(RandomBlock(m, i));
    for (int i = first; i < first + n; ++i) {
      client::BlockPut b;
      b.hash = HashOf(i, salt);
      b.first_token = int64_t{i} * m.block_tokens;
      b.data = data[i - first].data();
      b.bytes = data[i - first].size();
      puts.push_back(b);
    }
    return client_->Put(m, puts);
  }

  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<client::Client> client_;
};

}  // namespace vqkv::testing
