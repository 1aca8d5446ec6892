// The handler without gRPC: sessions, atomicity, budgets and deadlines.
#include "server/service/vqkv_handler.h"

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace vqkv::service {
namespace {

class HandlerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store::StoreOptions so;
    so.tiers.push_back(store::NewHostTier(1 << 20));
    store_ = *store::BlockStore::Create(std::move(so));
    ServiceOptions opts;
    opts.max_inflight_bytes = 64 << 10;
    handler_ = std::make_unique<VqkvHandler>(opts, store_.get());
    v1::RegisterModelRequest r;
    v1::ModelSpec* s = r.mutable_spec();
    s->set_model_id("m");
    s->set_layers(2);
    s->set_kv_heads(1);
    s->set_head_dim(8);
    s->set_dtype(v1::DTYPE_F32);
    s->set_block_tokens(4);
    v1::RegisterModelResponse resp;
    ASSERT_TRUE(handler_->RegisterModel(r, &resp).ok());
  }

  // 2 layers x 2 x 4 tokens x 1 head x 8 dims x 4 bytes = 512 bytes.
  static v1::PutBlocksRequest Message(const std::string& hash, bool header, bool commit) {
    v1::PutBlocksRequest m;
    if (header) m.mutable_header()->set_model_id("m");
    v1::BlockChunk* c = m.add_chunks();
    c->set_block_hash(hash);
    std::vector<float> x(128, 1.5f);
    c->set_data(reinterpret_cast<const char*>(x.data()), 512);
    m.set_commit(commit);
    return m;
  }

  int64_t Inflight() {
    v1::GetStatsResponse s;
    EXPECT_TRUE(handler_->GetStats({}, &s).ok());
    return s.inflight_bytes();
  }

  std::unique_ptr<store::BlockStore> store_;
  std::unique_ptr<VqkvHandler> handler_;
};

TEST_F(HandlerTest, PutIsInvisibleUntilFinishAndDroppedSessionsStoreNothing) {
  {
    auto put = handler_->StartPut({});
    auto m = Message("a", true, false);
    ASSERT_TRUE(put->Add(m).ok());
    EXPECT_EQ(Inflight(), 512);
    EXPECT_EQ(store_->Stats().blocks, 0);
  }  // dropped without Finish (client went away)
  EXPECT_EQ(Inflight(), 0);
  EXPECT_EQ(store_->Stats().blocks, 0);
  auto put = handler_->StartPut({});
  auto m = Message("a", true, true);
  ASSERT_TRUE(put->Add(m).ok());
  v1::PutBlocksResponse resp;
  ASSERT_TRUE(put->Finish(&resp).ok());
  EXPECT_EQ(resp.blocks_stored(), 1);
  EXPECT_EQ(resp.logical_bytes(), 512);
  EXPECT_EQ(store_->Stats().blocks, 1);
}

TEST_F(HandlerTest, GetStreamsChunksAndReleasesLeases) {
  auto put = handler_->StartPut({});
  auto m = Message("a", true, true);
  ASSERT_TRUE(put->Add(m).ok());
  v1::PutBlocksResponse pr;
  ASSERT_TRUE(put->Finish(&pr).ok());
  v1::GetBlocksRequest g;
  g.set_model_id("m");
  g.add_block_hashes()->push_back('a');
  g.set_max_chunk_bytes(1024);
  g.set_dtype(v1::DTYPE_F16);
  auto get = handler_->StartGet(g, {});
  ASSERT_TRUE(get.ok()) << get.status();
  v1::GetBlocksResponse r;
  auto more = (*get)->Next(&r);
  ASSERT_TRUE(more.ok() && *more);
  EXPECT_EQ(r.info().total_bytes(), 256);
  EXPECT_EQ(r.data().size(), 256u);
  EXPECT_EQ(r.data().substr(0, 2), std::string("\x00\x3e", 2));  // f16 1.5
  more = (*get)->Next(&r);
  ASSERT_TRUE(more.ok());
  EXPECT_FALSE(*more);
  // The lease is gone: the block can be deleted and freed at once.
  v1::DeleteBlocksRequest d;
  d.set_model_id("m");
  d.add_block_hashes()->push_back('a');
  v1::DeleteBlocksResponse dr;
  ASSERT_TRUE(handler_->DeleteBlocks(d, &dr).ok());
  EXPECT_EQ(store_->Stats().tiers[0].used_bytes, 0);
  EXPECT_EQ(Inflight(), 0);
}

TEST_F(HandlerTest, BudgetRefusesWithRetryPayloadAndDeadlinesStopWork) {
  auto hog = handler_->StartPut({});
  v1::PutBlocksRequest big;
  big.mutable_header()->set_model_id("m");
  for (int i = 0; i < 128; ++i) {  // 128 x 512 bytes = the whole budget
    v1::BlockChunk* c = big.add_chunks();
    c->set_block_hash(absl::StrCat("h", i));
    c->set_data(std::string(256, '\0'));  // half of each block
  }
  ASSERT_TRUE(hog->Add(big).ok());
  auto other = handler_->StartPut({});
  auto m = Message("b", true, true);
  absl::Status s = other->Add(m);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(s.GetPayload(kRetryAfterPayload).has_value());
  // One call alone over the limit is not "busy": no retry payload.
  v1::PutBlocksRequest more;
  more.add_chunks()->set_block_hash("x");
  more.mutable_chunks(0)->set_data(std::string(512, '\0'));
  more.add_chunks()->set_block_hash("y");
  more.mutable_chunks(1)->set_data(std::string(512, '\0'));
  s = hog->Add(more);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(s.GetPayload(kRetryAfterPayload).has_value());
  hog.reset();
  other.reset();
  EXPECT_EQ(Inflight(), 0);

  CallContext past;
  past.deadline = absl::Now() - absl::Seconds(1);
  auto late = handler_->StartPut(past);
  auto lm = Message("c", true, true);
  EXPECT_EQ(late->Add(lm).code(), absl::StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace vqkv::service
