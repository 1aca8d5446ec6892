// Many clients at once, a client killed mid-put, and SIGTERM while traffic is flowing.
#include <signal.h>

#include <atomic>
#include <random>
#include <thread>

#include "grpcpp/grpcpp.h"
#include "tests/integration/service_test_util.h"
#include "vqkv/v1/vqkv.grpc.pb.h"

namespace vqkv::testing {
namespace {

using client::BlockPut;
using client::ModelInfo;

using LifecycleTest = ServiceTest;

TEST_F(LifecycleTest, SixteenClientsWithOverlappingKeysSeeOnlyCorrectBytes) {
  const ModelInfo m = SmallModel("m", "scalar-2");
  Register(m);
  // Expected decode of block i: what the server returns for the first put of it (blocks are
  // deterministic in i, so every client puts identical content under a key).
  constexpr int kKeys = 48, kClients = 16, kOps = 24;
  std::vector<std::string> blocks;
  for (int i = 0; i < kKeys; ++i) blocks.push_back(RandomBlock(m, i));
  std::vector<std::string> expected(kKeys);
  std::mutex mu;
  std::atomic<int> wrong{0}, errors{0}, gets{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kClients; ++t) {
    threads.emplace_back([&, t] {
      auto c = NewClient(/*max_attempts=*/10);
      std::mt19937 rng(t);
      for (int op = 0; op < kOps; ++op) {
        const int i = static_cast<int>(rng() % kKeys);
        if (rng() % 2 == 0) {
          BlockPut b{HashOf(i), int64_t{i} * m.block_tokens, 0, blocks[i].data(), blocks[i].size()};
          if (!c->Put(m, {b}).ok()) ++errors;
        } else {
          auto got = c->Get(m.model_id, {HashOf(i)});
          if (!got.ok()) {
            if (got.status().code() != absl::StatusCode::kNotFound) ++errors;
            continue;
          }
          ++gets;
          std::lock_guard<std::mutex> l(mu);
          if (expected[i].empty()) expected[i] = (*got)[0].data;
          if ((*got)[0].data != expected[i]) ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(gets.load(), 0);
  // And every stored block decodes to exactly what a fresh read gives.
  for (int i = 0; i < kKeys; ++i) {
    auto got = client_->Get(m.model_id, {HashOf(i)});
    if (got.ok() && !expected[i].empty()) {
      EXPECT_EQ((*got)[0].data, expected[i]);
    }
  }
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->inflight_bytes(), 0);
}

TEST_F(LifecycleTest, ClientKilledMidPutLeavesNothing) {
  const ModelInfo m = SmallModel("m", "raw");
  Register(m);
  ASSERT_TRUE(PutRange(m, 0, 2).ok());
  auto spawned = SpawnWithStdout(
      {PartialPutPath(), daemon_->address(), m.model_id, std::to_string(m.BlockBytes()), "4"},
      "/dev/null");
  ASSERT_TRUE(spawned.ok()) << spawned.status();
  auto line = ReadLine(spawned->second, absl::Seconds(20));
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(*line, "sent");
  // The daemon holds the half blocks in flight until the client dies.
  absl::SleepFor(absl::Milliseconds(200));
  kill(spawned->first, SIGKILL);
  ASSERT_TRUE(WaitExit(spawned->first, absl::Seconds(10)).ok());
  close(spawned->second);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  int64_t inflight = -1;
  while (absl::Now() < deadline) {
    inflight = client_->Stats()->inflight_bytes();
    if (inflight == 0) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(inflight, 0);
  std::vector<std::string> partial;
  for (int i = 0; i < 4; ++i) partial.push_back("partial-" + std::to_string(i));
  for (const std::string& h : partial) {
    EXPECT_EQ(client_->Lookup(m.model_id, {h})->prefix_blocks, 0) << h;
  }
  auto stats = client_->Stats();
  EXPECT_EQ(stats->blocks(), 2);
  auto got = client_->Get(m.model_id, {HashOf(0), HashOf(1)});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ((*got)[1].data, RandomBlock(m, 1));
}

TEST_F(LifecycleTest, SigtermDrainsInFlightCallsAndExitsZero) {
  const ModelInfo m = SmallModel("m", "raw");
  Register(m);
  constexpr int kStored = 32;
  ASSERT_TRUE(PutRange(m, 0, kStored).ok());
  auto stub = v1::Vqkv::NewStub(
      grpc::CreateChannel(daemon_->address(), grpc::InsecureChannelCredentials()));
  // A slow reader: a GetBlocks stream of 512 chunks read 1 ms apart, in flight at the signal.
  std::atomic<bool> reading{false};
  std::atomic<int> chunks{0}, bad_chunks{0};
  grpc::Status read_status;
  std::thread reader([&] {
    grpc::ClientContext ctx;
    v1::GetBlocksRequest req;
    req.set_model_id(m.model_id);
    for (int i = 0; i < kStored; ++i) req.add_block_hashes(HashOf(i));
    req.set_max_chunk_bytes(2048);
    auto r = stub->GetBlocks(&ctx, req);
    v1::GetBlocksResponse resp;
    std::string expect;
    while (r->Read(&resp)) {
      reading = true;
      if (resp.offset() == 0) expect = RandomBlock(m, resp.index());
      if (expect.compare(resp.offset(), resp.data().size(), resp.data()) != 0) ++bad_chunks;
      ++chunks;
      absl::SleepFor(absl::Milliseconds(1));
    }
    read_status = r->Finish();
  });
  // Slow writers: each put streams one block in 64 pieces 5 ms apart, so the signal lands in
  // the middle of it. Acknowledged = OK with the block stored.
  std::atomic<int> slow_started{0};
  std::vector<grpc::Status> slow_status(2);
  std::vector<int64_t> slow_stored(2, -1);
  std::vector<std::thread> writers;
  for (int t = 0; t < 2; ++t) {
    writers.emplace_back([&, t] {
      const std::string x = RandomBlock(m, 500 + t);
      grpc::ClientContext ctx;
      v1::PutBlocksResponse resp;
      auto w = stub->PutBlocks(&ctx, &resp);
      const size_t piece = x.size() / 64;
      for (int i = 0; i < 64; ++i) {
        v1::PutBlocksRequest r;
        if (i == 0) r.mutable_header()->set_model_id(m.model_id);
        v1::BlockChunk* c = r.add_chunks();
        c->set_block_hash(HashOf(500 + t));
        c->set_offset(i * piece);
        c->set_data(x.substr(i * piece, piece));
        r.set_commit(i == 63);
        if (!w->Write(r)) break;
        if (i == 0) ++slow_started;
        absl::SleepFor(absl::Milliseconds(5));
      }
      w->WritesDone();
      slow_status[t] = w->Finish();
      slow_stored[t] = resp.blocks_stored();
    });
  }
  while (!reading || slow_started < 2) absl::SleepFor(absl::Milliseconds(1));
  absl::SleepFor(absl::Milliseconds(50));
  const int rc = daemon_->Terminate(absl::Seconds(30));
  for (auto& w : writers) w.join();
  reader.join();
  EXPECT_EQ(rc, 0);
  for (int t = 0; t < 2; ++t) {
    EXPECT_TRUE(slow_status[t].ok()) << t << ": " << slow_status[t].error_message();
    EXPECT_EQ(slow_stored[t], 1) << t;
  }
  EXPECT_TRUE(read_status.ok()) << read_status.error_message();
  EXPECT_EQ(chunks.load(), kStored * 16);
  EXPECT_EQ(bad_chunks.load(), 0);
  // New calls are refused once the daemon is gone.
  auto late = NewClient(/*max_attempts=*/1)->Stats();
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
  const std::string log = daemon_->Log();
  EXPECT_NE(log.find("draining"), std::string::npos);
  EXPECT_NE(log.find("stopped"), std::string::npos);
}

}  // namespace
}  // namespace vqkv::testing
