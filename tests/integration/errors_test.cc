// Bad input gets the precise status and leaves stored data intact; eviction under a tiny budget
// never returns wrong bytes.
#include "grpcpp/grpcpp.h"
#include "kernels/codec.h"
#include "tests/integration/service_test_util.h"
#include "vqkv/v1/vqkv.grpc.pb.h"

namespace vqkv::testing {
namespace {

using client::BlockPut;
using client::ModelInfo;

class ErrorsTest : public ServiceTest {
 protected:
  void SetUp() override {
    ServiceTest::SetUp();
    if (HasFatalFailure()) return;
    model_ = SmallModel("m", "raw");
    Register(model_);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(PutRange(model_, i, 1, "keep").ok());
    channel_ = grpc::CreateChannel(daemon_->address(), grpc::InsecureChannelCredentials());
    stub_ = v1::Vqkv::NewStub(channel_);
  }

  // The blocks stored in SetUp are still there, byte for byte, and nothing else is.
  void ExpectIntact(int other_blocks = 0) {
    std::vector<std::string> h = {HashOf(0, "keep"), HashOf(1, "keep"), HashOf(2, "keep")};
    auto got = client_->Get(model_.model_id, h);
    ASSERT_TRUE(got.ok()) << got.status();
    for (int i = 0; i < 3; ++i) EXPECT_EQ((*got)[i].data, RandomBlock(model_, i));
    auto stats = client_->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->blocks(), 3 + other_blocks);
    EXPECT_EQ(stats->inflight_bytes(), 0);
  }

  // Sends `msgs` on one PutBlocks stream, then half-closes.
  grpc::Status RawPut(const std::vector<v1::PutBlocksRequest>& msgs) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::PutBlocksResponse resp;
    auto w = stub_->PutBlocks(&ctx, &resp);
    for (const auto& m : msgs) {
      if (!w->Write(m)) break;
    }
    w->WritesDone();
    return w->Finish();
  }

  v1::PutBlocksRequest Header(const std::string& model, v1::DType dtype = v1::DTYPE_F16,
                              v1::Encoding enc = v1::ENCODING_TENSOR) {
    v1::PutBlocksRequest r;
    r.mutable_header()->set_model_id(model);
    r.mutable_header()->set_dtype(dtype);
    r.mutable_header()->set_encoding(enc);
    return r;
  }

  static v1::BlockChunk* Chunk(v1::PutBlocksRequest* r, const std::string& hash,
                               const std::string& data, int64_t offset = 0) {
    v1::BlockChunk* c = r->add_chunks();
    c->set_block_hash(hash);
    c->set_offset(offset);
    c->set_data(data);
    return c;
  }

  ModelInfo model_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Vqkv::Stub> stub_;
};

TEST_F(ErrorsTest, UnknownModel) {
  ModelInfo other = SmallModel("nope", "raw");
  EXPECT_EQ(PutRange(other, 0, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(client_->Get("nope", {HashOf(0)}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->Lookup("nope", {HashOf(0)}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->Delete("nope", {HashOf(0)}).status().code(), absl::StatusCode::kNotFound);
  ExpectIntact();
}

TEST_F(ErrorsTest, MissingBlockIsNotFound) {
  auto got = client_->Get(model_.model_id, {HashOf(0, "keep"), HashOf(7)});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(got.status().message().find("#1"), std::string::npos) << got.status();
  ExpectIntact();
}

TEST_F(ErrorsTest, DeviceFieldsWithoutAGpu) {
  // This daemon runs --gpu=off: a put or get naming a device is INVALID_ARGUMENT (nothing is
  // stored), and lookups and reads report no device.
  client::PutOptions po;
  po.device = 0;
  std::string data = RandomBlock(model_, 9);
  BlockPut b;
  b.hash = HashOf(9);
  b.data = data.data();
  b.bytes = data.size();
  auto put = client_->Put(model_, {b}, po);
  EXPECT_EQ(put.status().code(), absl::StatusCode::kInvalidArgument) << put.status();
  EXPECT_NE(put.status().message().find("no GPU tier"), std::string::npos) << put.status();
  client::GetOptions go;
  go.device = 1;
  auto got = client_->Get(model_.model_id, {HashOf(0, "keep")}, go);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << got.status();
  auto plain = client_->Get(model_.model_id, {HashOf(0, "keep")});
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ((*plain)[0].device, -1);
  auto look = client_->Lookup(model_.model_id, {HashOf(0, "keep"), HashOf(1, "keep")});
  ASSERT_TRUE(look.ok()) << look.status();
  EXPECT_EQ(look->devices, (std::vector<int32_t>{-1, -1}));
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  for (const auto& t : stats->tiers()) EXPECT_FALSE(t.has_device());
  ExpectIntact();
}

TEST_F(ErrorsTest, ConflictingRegistrationAndBadSpecs) {
  ModelInfo changed = model_;
  changed.block_tokens = 64;
  EXPECT_EQ(client_->RegisterModel(changed).status().code(), absl::StatusCode::kAlreadyExists);
  ModelInfo bad = SmallModel("bad", "raw");
  bad.layers = 0;
  EXPECT_EQ(client_->RegisterModel(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = SmallModel("bad", "zstd");
  EXPECT_EQ(client_->RegisterModel(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = SmallModel("bad", "scalar-2:bits=3");
  EXPECT_EQ(client_->RegisterModel(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = SmallModel("huge", "raw");
  bad.layers = 1024;
  bad.kv_heads = 64;
  bad.head_dim = 256;
  bad.block_tokens = 4096;  // 256 GiB per block
  EXPECT_EQ(client_->RegisterModel(bad).status().code(), absl::StatusCode::kResourceExhausted);
  ExpectIntact();
}

TEST_F(ErrorsTest, ShapeAndDtypeMismatch) {
  const std::string x = RandomBlock(model_, 9);
  // One element too many for the block.
  {
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "a", x + "xx");
    r.set_commit(true);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // bf16 data for an f16 model.
  {
    v1::PutBlocksRequest r = Header(model_.model_id, v1::DTYPE_BF16);
    Chunk(&r, "a", x);
    r.set_commit(true);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // A layer range outside the model, tokens over block_tokens, an empty or oversized hash.
  {
    v1::PutBlocksRequest r = Header(model_.model_id);
    v1::BlockChunk* c = Chunk(&r, "a", x.substr(0, x.size() / 4));
    c->set_layer_begin(4);
    c->set_layer_end(5);
    r.set_commit(true);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "a", x)->set_tokens(model_.block_tokens + 1);
    r.set_commit(true);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  for (const std::string& h : {std::string(), std::string(65, 'h')}) {
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, h, x);
    r.set_commit(true);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Overlapping chunks of one block.
  {
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "a", x.substr(0, 1000));
    Chunk(&r, "a", x.substr(500, 1000), 500);
    r.set_commit(true);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // NaN values.
  {
    std::string nan = x;
    nan[2] = '\x00';
    nan[3] = '\x7e';  // f16 0x7e00 = NaN
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "a", nan);
    r.set_commit(true);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // A get in an unknown dtype or a bad layer range.
  {
    grpc::ClientContext ctx;
    v1::GetBlocksRequest g;
    g.set_model_id(model_.model_id);
    g.add_block_hashes(HashOf(0, "keep"));
    g.set_layer_begin(3);
    g.set_layer_end(2);
    auto reader = stub_->GetBlocks(&ctx, g);
    v1::GetBlocksResponse resp;
    while (reader->Read(&resp)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_EQ(client_->Lookup(model_.model_id, {"a"})->prefix_blocks, 0);
  ExpectIntact();
}

TEST_F(ErrorsTest, TruncatedStreamsStoreNothing) {
  const std::string x = RandomBlock(model_, 9);
  // Everything sent, but no commit message: a stream cut at a block boundary.
  {
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "whole", x);
    grpc::Status s = RawPut({r});
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("commit"), std::string::npos) << s.error_message();
  }
  // Commit with half a block.
  {
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "whole", x);
    Chunk(&r, "half", x.substr(0, x.size() / 2));
    r.set_commit(true);
    grpc::Status s = RawPut({r});
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("incomplete"), std::string::npos) << s.error_message();
  }
  // No header at all.
  {
    v1::PutBlocksRequest r;
    Chunk(&r, "whole", x);
    EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // The client cancels half-way.
  {
    grpc::ClientContext ctx;
    v1::PutBlocksResponse resp;
    auto w = stub_->PutBlocks(&ctx, &resp);
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "whole", x);
    ASSERT_TRUE(w->Write(r));
    ctx.TryCancel();
    EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  auto l = client_->Lookup(model_.model_id, {"whole"});
  EXPECT_EQ(l->prefix_blocks, 0);
  ExpectIntact();
}

TEST_F(ErrorsTest, GarbageAndForeignCodes) {
  ModelInfo sm = SmallModel("s2", "scalar-2");
  Register(sm);
  client::PutOptions codes;
  codes.codes = true;
  // Random bytes.
  std::string garbage(4000, '\x5a');
  BlockPut g{"g", 0, 0, garbage.data(), garbage.size()};
  auto r = client_->Put(sm, {g}, codes);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  // A valid payload of another codec (scalar-4) and of another shape.
  auto s4 = kernels::CreateCodec(*kernels::ParseCodecSpec("scalar-4"));
  const std::string x = RandomBlock(sm, 1);
  kernels::KvBlockView v{
      {sm.layers, sm.block_tokens, sm.kv_heads, sm.head_dim}, sm.dtype, x.data(), 0};
  std::vector<std::string> out;
  ASSERT_TRUE((*s4)->Encode({&v, 1}, &out).ok());
  BlockPut foreign{"f", 0, 0, out[0].data(), out[0].size()};
  EXPECT_EQ(client_->Put(sm, {foreign}, codes).status().code(), absl::StatusCode::kInvalidArgument);
  // A right-sized scalar-2 payload whose header claims other tokens.
  auto s2 = kernels::CreateCodec(*kernels::ParseCodecSpec("scalar-2"));
  out.clear();
  ASSERT_TRUE((*s2)->Encode({&v, 1}, &out).ok());
  BlockPut wrong_pos{"p", 64, 0, out[0].data(), out[0].size()};  // encoded at position 0
  EXPECT_EQ(client_->Put(sm, {wrong_pos}, codes).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The same payload under its own position is fine.
  BlockPut ok{"ok", 0, 0, out[0].data(), out[0].size()};
  ASSERT_TRUE(client_->Put(sm, {ok}, codes).ok());
  EXPECT_EQ(client_->Lookup(sm.model_id, {"ok", "g", "f", "p"})->prefix_blocks, 1);
  ExpectIntact(/*other_blocks=*/1);
}

TEST_F(ErrorsTest, UnknownCodebook) {
  ModelInfo rvq = SmallModel("r", "rvq");
  Register(rvq);
  EXPECT_EQ(PutRange(rvq, 0, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  client::PutOptions o;
  o.codebook_id = std::string(32, 'a');
  const std::string x = RandomBlock(rvq, 0);
  BlockPut b{"b", 0, 0, x.data(), x.size()};
  EXPECT_EQ(client_->Put(rvq, {b}, o).status().code(), absl::StatusCode::kFailedPrecondition);
  // A codebook id for a model without codebooks is a bad argument.
  EXPECT_EQ(client_->Put(model_, {b}, o).status().code(), absl::StatusCode::kInvalidArgument);
  // Damaged codebook files and codebooks for raw models.
  EXPECT_EQ(client_->UploadCodebook(rvq.model_id, "not a codebook", true).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->UploadCodebook(model_.model_id, "x", true).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ExpectIntact();
}

TEST_F(ErrorsTest, OversizedMessageIsRefused) {
  // 65 MiB in one message: over the 64 MiB limit.
  v1::PutBlocksRequest r = Header(model_.model_id);
  Chunk(&r, "big", std::string(65 << 20, '\0'));
  r.set_commit(true);
  EXPECT_EQ(RawPut({r}).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  ExpectIntact();
}

class BackpressureTest : public ErrorsTest {
 protected:
  std::vector<std::string> DaemonArgs() const override { return {"--max-inflight-bytes=40KiB"}; }
};

TEST_F(BackpressureTest, BusyDaemonRefusesWithRetryAfterAndClientsRetry) {
  const std::string a = RandomBlock(model_, 20);
  // Hold a block's worth (32 KiB) in flight: half of block A arrived, no commit yet.
  grpc::ClientContext ctx;
  v1::PutBlocksResponse resp;
  auto w = stub_->PutBlocks(&ctx, &resp);
  v1::PutBlocksRequest first = Header(model_.model_id);
  Chunk(&first, "A", a.substr(0, a.size() / 2));
  ASSERT_TRUE(w->Write(first));
  absl::SleepFor(absl::Milliseconds(100));
  // A second put does not fit: RESOURCE_EXHAUSTED with the retry trailer.
  {
    const std::string b = RandomBlock(model_, 21);
    v1::PutBlocksRequest r = Header(model_.model_id);
    Chunk(&r, "B", b);
    r.set_commit(true);
    grpc::ClientContext c2;
    v1::PutBlocksResponse r2;
    auto w2 = stub_->PutBlocks(&c2, &r2);
    w2->Write(r);
    w2->WritesDone();
    grpc::Status s = w2->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
    EXPECT_EQ(c2.GetServerTrailingMetadata().count("vqkv-retry-after-ms"), 1u);
  }
  // A retrying client gets through once A commits.
  auto retrying = NewClient(/*max_attempts=*/50);
  const std::string b = RandomBlock(model_, 21);
  BlockPut pb{"B", 0, 0, b.data(), b.size()};
  auto pending = retrying->PutAsync(model_, {&pb, 1});
  absl::SleepFor(absl::Milliseconds(200));
  v1::PutBlocksRequest rest;
  Chunk(&rest, "A", a.substr(a.size() / 2), static_cast<int64_t>(a.size() / 2));
  rest.set_commit(true);
  ASSERT_TRUE(w->Write(rest));
  w->WritesDone();
  ASSERT_TRUE(w->Finish().ok());
  auto put = pending.get();
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->stored, 1);
  auto stats = client_->Stats();
  EXPECT_GT(stats->busy_rejections(), 0);
  EXPECT_EQ(stats->inflight_bytes(), 0);
  ExpectIntact(/*other_blocks=*/2);
}

class EvictionTest : public ServiceTest {
 protected:
  std::vector<std::string> DaemonArgs() const override {
    return {"--host-tier-bytes=300KiB", "--high-watermark=0.9", "--low_watermark=0.6"};
  }
};

TEST_F(EvictionTest, EvictedBlocksAreNotFoundNeverWrong) {
  const ModelInfo m = SmallModel("m", "raw");  // 32 KiB blocks
  Register(m);
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(PutRange(m, i, 1).ok()) << i;
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GT(stats->evictions(), 0);
  EXPECT_LE(stats->tiers(0).used_bytes(), 300 * 1024);
  int found = 0;
  for (int i = 0; i < 40; ++i) {
    auto got = client_->Get(m.model_id, {HashOf(i)});
    if (got.ok()) {
      ++found;
      EXPECT_EQ((*got)[0].data, RandomBlock(m, i)) << i;
    } else {
      EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound) << got.status();
    }
  }
  EXPECT_GT(found, 0);
  EXPECT_EQ(found, client_->Stats()->blocks());
  // The most recent block survived.
  EXPECT_EQ(client_->Lookup(m.model_id, {HashOf(39)})->prefix_blocks, 1);
  // A block larger than the whole tier cannot be stored.
  ModelInfo big = SmallModel("big", "raw", DType::kF32);
  big.block_tokens = 512;  // 1 MiB
  Register(big);
  EXPECT_EQ(PutRange(big, 0, 1).status().code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace vqkv::testing
