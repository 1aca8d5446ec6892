// Round trips through a real vqkvd: every codec, dtype conversion, layer ranges, client-encoded
// codes, codebook upload and server-side fitting, Lookup/Delete, stats, health and reflection.
#include <cmath>
#include <future>

#include "absl/strings/escaping.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/rvq_fit.h"
#include "tests/integration/service_test_util.h"

namespace vqkv::testing {
namespace {

using client::BlockPut;
using client::GetOptions;
using client::ModelInfo;

// What the codec itself produces for block i of `m`: payload and decoded tensor.
struct Local {
  std::string payload, decoded;
};
Local LocalCodec(const kernels::Codec& codec, const ModelInfo& m, int i) {
  const std::string x = RandomBlock(m, i);
  kernels::KvBlockView v{{m.layers, m.block_tokens, m.kv_heads, m.head_dim},
                         m.dtype,
                         x.data(),
                         int64_t{i} * m.block_tokens};
  std::vector<std::string> out;
  EXPECT_TRUE(codec.Encode({&v, 1}, &out).ok());
  Local l;
  l.payload = out[0];
  l.decoded.resize(x.size());
  void* ptr = l.decoded.data();
  size_t bytes = l.decoded.size();
  std::string_view p = l.payload;
  EXPECT_TRUE(codec.Decode({&p, 1}, m.dtype, {&ptr, 1}, {&bytes, 1}).ok());
  return l;
}

std::vector<std::string> Hashes(int first, int n) {
  std::vector<std::string> h;
  for (int i = first; i < first + n; ++i) h.push_back(HashOf(i));
  return h;
}

kernels::KvSamples SamplesOf(const ModelInfo& m, const std::vector<std::string>& tensors,
                             int tokens) {
  kernels::KvSamples s;
  s.layers = m.layers;
  s.kv_heads = m.kv_heads;
  s.head_dim = m.head_dim;
  s.k.resize(m.layers);
  s.v.resize(m.layers);
  const kernels::KvShape shape{m.layers, tokens, m.kv_heads, m.head_dim};
  const size_t plane = size_t(tokens) * m.kv_heads * m.head_dim;
  for (const std::string& t : tensors) {
    std::vector<float> x(shape.elements());
    ToFloat(m.dtype, t.data(), x.size(), x.data());
    for (int l = 0; l < m.layers; ++l) {
      s.k[l].insert(s.k[l].end(), x.begin() + shape.Offset(l, 0, 0, 0),
                    x.begin() + shape.Offset(l, 0, 0, 0) + plane);
      s.v[l].insert(s.v[l].end(), x.begin() + shape.Offset(l, 1, 0, 0),
                    x.begin() + shape.Offset(l, 1, 0, 0) + plane);
    }
    s.seq_lens.push_back(tokens);
  }
  return s;
}

using RoundTripTest = ServiceTest;

TEST_F(RoundTripTest, RawIsBitExactInEveryDtype) {
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32}) {
    const ModelInfo m = SmallModel(absl::StrCat("raw-", std::string(DTypeName(dt))), "raw", dt);
    Register(m);
    auto put = PutRange(m, 0, 5);
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_EQ(put->stored, 5);
    EXPECT_EQ(put->logical_bytes, 5 * m.BlockBytes());
    auto got = client_->Get(m.model_id, Hashes(0, 5));
    ASSERT_TRUE(got.ok()) << got.status();
    for (int i = 0; i < 5; ++i) {
      ASSERT_TRUE((*got)[i].found);
      EXPECT_EQ((*got)[i].data, RandomBlock(m, i)) << DTypeName(dt) << " block " << i;
      EXPECT_EQ((*got)[i].tier, v1::TIER_HOST);
      EXPECT_EQ((*got)[i].first_token, i * m.block_tokens);
    }
  }
}

TEST_F(RoundTripTest, GetConvertsDtypeAndSlicesLayers) {
  const ModelInfo m = SmallModel("raw", "raw");
  Register(m);
  ASSERT_TRUE(PutRange(m, 0, 2).ok());
  GetOptions o;
  o.model_dtype = false;
  o.dtype = DType::kF32;
  o.layer_begin = 1;
  o.layer_end = 3;
  o.max_chunk_bytes = 1024;  // many chunks per block
  auto got = client_->Get(m.model_id, Hashes(0, 2), o);
  ASSERT_TRUE(got.ok()) << got.status();
  for (int i = 0; i < 2; ++i) {
    const std::string x = RandomBlock(m, i);
    const int64_t layer_elems = int64_t{2} * m.block_tokens * m.kv_heads * m.head_dim;
    std::vector<float> want(2 * layer_elems);
    ToFloat(DType::kF16, x.data() + layer_elems * 2, want.size(), want.data());
    ASSERT_EQ((*got)[i].data.size(), want.size() * 4);
    EXPECT_EQ(0, std::memcmp((*got)[i].data.data(), want.data(), want.size() * 4));
  }
}

TEST_F(RoundTripTest, ScalarMatchesTheCodecsOwnDecodeAndCodes) {
  const ModelInfo m = SmallModel("scalar", "scalar-2");
  Register(m);
  ASSERT_TRUE(PutRange(m, 0, 3).ok());
  auto codec = kernels::CreateCodec(*kernels::ParseCodecSpec("scalar-2"));
  ASSERT_TRUE(codec.ok());
  auto tensors = client_->Get(m.model_id, Hashes(0, 3));
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  GetOptions codes;
  codes.codes = true;
  auto payloads = client_->Get(m.model_id, Hashes(0, 3), codes);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  for (int i = 0; i < 3; ++i) {
    const Local l = LocalCodec(**codec, m, i);
    EXPECT_EQ((*tensors)[i].data, l.decoded) << i;
    EXPECT_EQ((*payloads)[i].data, l.payload) << i;
    EXPECT_NE((*tensors)[i].data, RandomBlock(m, i));  // lossy
  }
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->blocks(), 3);
  EXPECT_EQ(stats->logical_bytes(), 3 * m.BlockBytes());
  EXPECT_LT(stats->stored_bytes(), stats->logical_bytes() / 4);
}

TEST_F(RoundTripTest, RvqWithUploadedCodebookMatchesTheCodec) {
  auto run = [&](const ModelInfo& m, const std::string& codec_name) {
    Register(m);
    // Without a codebook an rvq model cannot store anything.
    EXPECT_EQ(PutRange(m, 0, 1).status().code(), absl::StatusCode::kFailedPrecondition);

    std::vector<std::string> cal = {RandomBlock(m, 100, 64), RandomBlock(m, 101, 64)};
    kernels::FitOptions fo;
    fo.iterations = 4;
    auto cb = kernels::FitCodebook(
        kernels::RvqConfig::Uniform(m.layers, m.kv_heads, m.head_dim, {2, 16}, {2, 16}),
        SamplesOf(m, cal, 64), fo);
    ASSERT_TRUE(cb.ok()) << cb.status();
    auto up = client_->UploadCodebook(m.model_id, cb->Serialize(), true);
    ASSERT_TRUE(up.ok()) << up.status();
    EXPECT_EQ(up->codebook_id(), cb->id());
    EXPECT_TRUE(up->active());

    auto put = PutRange(m, 0, 4);
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_EQ(put->codebook_id, cb->id());
    kernels::CodecSpec spec = *kernels::ParseCodecSpec(codec_name);
    spec.codebook = std::make_shared<const kernels::Codebook>(*cb);
    auto codec = kernels::CreateCodec(spec);
    ASSERT_TRUE(codec.ok());
    auto got = client_->Get(m.model_id, Hashes(0, 4));
    ASSERT_TRUE(got.ok()) << got.status();
    GetOptions codes;
    codes.codes = true;
    auto payloads = client_->Get(m.model_id, Hashes(0, 4), codes);
    ASSERT_TRUE(payloads.ok());
    for (int i = 0; i < 4; ++i) {
      const Local l = LocalCodec(**codec, m, i);
      EXPECT_EQ((*got)[i].data, l.decoded) << i;
      EXPECT_EQ((*payloads)[i].data, l.payload) << i;
      EXPECT_EQ((*got)[i].codebook_id, cb->id());
    }
    // Blocks are keyed by codebook: naming another (unknown) one finds nothing.
    GetOptions other;
    other.codebook_id = std::string(32, 'f');
    EXPECT_EQ(client_->Get(m.model_id, Hashes(0, 1), other).status().code(),
              absl::StatusCode::kFailedPrecondition);
  };
  // Plain rvq, and rvq whose worst-coded token per block and layer also stores an int8 residual.
  const std::pair<const char*, const char*> cases[] = {{"rvq", "rvq"},
                                                       {"rvq-outliers", "rvq:outliers=1"}};
  for (const auto& [id, codec_name] : cases) {
    SCOPED_TRACE(codec_name);
    run(SmallModel(id, codec_name), codec_name);
  }
}

// The small server-side fit both FitCodebook tests run (2x16 K, 1x16 V, 5 iterations, seed 7),
// its local twin, and 48-token sample views of `cal`.
client::FitParams SmallFit(const ModelInfo& m) {
  client::FitParams p;
  p.model_id = m.model_id;
  p.k_stages = "2x16";
  p.v_stages = "1x16";
  p.iterations = 5;
  p.seed = 7;
  return p;
}
kernels::RvqConfig SmallFitConfig(const ModelInfo& m) {
  return kernels::RvqConfig::Uniform(m.layers, m.kv_heads, m.head_dim, {2, 16}, {1, 16});
}
kernels::FitOptions SmallFitOptions() {
  kernels::FitOptions fo;
  fo.iterations = 5;
  fo.seed = 7;
  return fo;
}
std::vector<client::SampleView> Views48(const ModelInfo& m, const std::vector<std::string>& cal) {
  std::vector<client::SampleView> views;
  for (const std::string& t : cal) views.push_back({48, m.dtype, t.data(), t.size()});
  return views;
}

TEST_F(RoundTripTest, FitCodebookOnTheServerEqualsALocalFit) {
  const ModelInfo m = SmallModel("rvq-fit", "rvq");
  Register(m);
  std::vector<std::string> cal = {RandomBlock(m, 7, 48), RandomBlock(m, 8, 48)};
  const std::vector<client::SampleView> views = Views48(m, cal);
  const client::FitParams p = SmallFit(m);
  int progress = 0;
  auto fit = client_->FitCodebook(p, views, [&](const v1::FitCodebookResponse&) { ++progress; });
  ASSERT_TRUE(fit.ok()) << fit.status();
  EXPECT_GT(progress, 0);
  auto local = kernels::FitCodebook(SmallFitConfig(m), SamplesOf(m, cal, 48), SmallFitOptions());
  ASSERT_TRUE(local.ok());
  EXPECT_EQ(fit->codebook_id(), local->id());
  EXPECT_EQ(fit->sample_vectors(), 96 * m.kv_heads);
  // The fitted codebook is active: puts work now.
  auto put = PutRange(m, 0, 2);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->codebook_id, local->id());
}

// Keys coded before RoPE: the daemon rotates sample keys back by their positions, fits, and
// codes/decodes blocks at their first_token; all equal to a local fit and the CPU codec.
TEST_F(RoundTripTest, FitCodebookWithPreRopeKeysEqualsALocalFit) {
  const ModelInfo m = SmallModel("rvq-rope", "rvq");
  Register(m);
  std::vector<std::string> cal = {RandomBlock(m, 17, 48), RandomBlock(m, 18, 48)};
  std::vector<client::SampleView> views = Views48(m, cal);
  views[1].first_token = 500;
  client::FitParams p = SmallFit(m);
  p.key_rope_theta = 10000;
  auto fit = client_->FitCodebook(p, views, [](const v1::FitCodebookResponse&) {});
  ASSERT_TRUE(fit.ok()) << fit.status();
  kernels::FitOptions fo = SmallFitOptions();
  for (int i = 0; i < m.head_dim / 2; ++i) {
    fo.code_space.key_rope_inv_freq.push_back(float(std::pow(10000.0, -2.0 * i / m.head_dim)));
  }
  kernels::KvSamples samples = SamplesOf(m, cal, 48);
  samples.seq_lens = {48, 48};
  samples.seq_starts = {0, 500};
  auto local = kernels::FitCodebook(SmallFitConfig(m), samples, fo);
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_EQ(local->code_space().DebugString(), "rope");
  EXPECT_EQ(fit->codebook_id(), local->id());
  // Samples placed elsewhere fit another codebook: positions matter.
  views[1].first_token = 0;
  auto moved = client_->FitCodebook(p, views, [](const v1::FitCodebookResponse&) {});
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_NE(moved->codebook_id(), fit->codebook_id());
  // Make the first fit active again by uploading the local copy (same id), then round trip.
  auto up = client_->UploadCodebook(m.model_id, local->Serialize(), true);
  ASSERT_TRUE(up.ok()) << up.status();
  ASSERT_TRUE(PutRange(m, 0, 3).ok());
  kernels::CodecSpec spec = *kernels::ParseCodecSpec("rvq");
  spec.codebook = std::make_shared<const kernels::Codebook>(*local);
  auto codec = kernels::CreateCodec(spec);
  ASSERT_TRUE(codec.ok());
  auto got = client_->Get(m.model_id, Hashes(0, 3));
  ASSERT_TRUE(got.ok()) << got.status();
  for (int i = 0; i < 3; ++i) {
    const Local l = LocalCodec(**codec, m, i);
    EXPECT_EQ((*got)[i].data, l.decoded) << i;
  }
  // A negative theta is refused.
  p.key_rope_theta = -1;
  EXPECT_EQ(client_->FitCodebook(p, views, [](const v1::FitCodebookResponse&) {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RoundTripTest, LayerRangesAssembleIntoOneBlock) {
  const ModelInfo m = SmallModel("layers", "raw");
  Register(m);
  const std::string x = RandomBlock(m, 3);
  const size_t layer = x.size() / m.layers;
  // Layers arrive out of order: [2,4) first, then [0,1), then [1,2).
  std::vector<BlockPut> parts;
  for (auto [b, e] : std::vector<std::pair<int, int>>{{2, 4}, {0, 1}, {1, 2}}) {
    BlockPut p;
    p.hash = HashOf(3);
    p.first_token = 3 * m.block_tokens;
    p.layer_begin = b;
    p.layer_end = e;
    p.data = x.data() + b * layer;
    p.bytes = (e - b) * layer;
    parts.push_back(p);
  }
  auto put = client_->Put(m, parts);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->stored, 1);
  auto got = client_->Get(m.model_id, {HashOf(3)});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ((*got)[0].data, x);
}

TEST_F(RoundTripTest, SmallChunksInOrderReassemble) {
  const ModelInfo m = SmallModel("chunks", "raw");
  Register(m);
  client::ClientOptions o;
  o.target = daemon_->address();
  o.chunk_bytes = 1024;  // 32 chunks per block, several blocks per call
  auto c = client::Client::Connect(o);
  ASSERT_TRUE(c.ok());
  std::vector<std::string> data;
  std::vector<BlockPut> puts;
  for (int i = 0; i < 3; ++i) data.push_back(RandomBlock(m, 30 + i));
  for (int i = 0; i < 3; ++i)
    puts.push_back({HashOf(30 + i), 0, 0, data[i].data(), data[i].size()});
  auto put = (*c)->Put(m, puts);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->stored, 3);
  auto got = client_->Get(m.model_id, Hashes(30, 3));
  ASSERT_TRUE(got.ok());
  for (int i = 0; i < 3; ++i) EXPECT_EQ((*got)[i].data, data[i]);
}

TEST_F(RoundTripTest, ClientEncodedCodesAreStoredAndDecoded) {
  const ModelInfo m = SmallModel("codes", "scalar-4");
  Register(m);
  auto codec = kernels::CreateCodec(*kernels::ParseCodecSpec("scalar-4"));
  std::vector<Local> locals;
  std::vector<BlockPut> puts;
  for (int i = 0; i < 3; ++i) locals.push_back(LocalCodec(**codec, m, i));
  for (int i = 0; i < 3; ++i) {
    BlockPut p;
    p.hash = HashOf(i);
    p.first_token = i * m.block_tokens;
    p.data = locals[i].payload.data();
    p.bytes = locals[i].payload.size();
    puts.push_back(p);
  }
  client::PutOptions po;
  po.codes = true;
  auto put = client_->Put(m, puts, po);
  ASSERT_TRUE(put.ok()) << put.status();
  auto got = client_->Get(m.model_id, Hashes(0, 3));
  ASSERT_TRUE(got.ok());
  for (int i = 0; i < 3; ++i) EXPECT_EQ((*got)[i].data, locals[i].decoded);
}

TEST_F(RoundTripTest, LookupCountsTheCachedPrefixAndDeleteRemoves) {
  const ModelInfo m = SmallModel("lookup", "raw");
  Register(m);
  ASSERT_TRUE(PutRange(m, 0, 3).ok());
  ASSERT_TRUE(PutRange(m, 4, 1).ok());
  auto l = client_->Lookup(m.model_id, Hashes(0, 6));
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->prefix_blocks, 3);
  ASSERT_EQ(l->tiers.size(), 3u);
  EXPECT_EQ(l->tiers[0], v1::TIER_HOST);
  EXPECT_EQ(client_->Lookup(m.model_id, Hashes(3, 2))->prefix_blocks, 0);
  EXPECT_EQ(client_->Lookup(m.model_id, {})->prefix_blocks, 0);
  EXPECT_EQ(*client_->Delete(m.model_id, {HashOf(1), HashOf(9)}), 1);
  EXPECT_EQ(client_->Lookup(m.model_id, Hashes(0, 6))->prefix_blocks, 1);
  GetOptions partial;
  partial.allow_missing = true;
  auto got = client_->Get(m.model_id, Hashes(0, 3), partial);
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE((*got)[0].found);
  EXPECT_FALSE((*got)[1].found);
  EXPECT_TRUE((*got)[2].found);
  EXPECT_EQ((*got)[2].data, RandomBlock(m, 2));
  EXPECT_EQ(*client_->Delete(m.model_id, {}, /*all=*/true), 3);
  EXPECT_EQ(client_->Stats()->blocks(), 0);
}

TEST_F(RoundTripTest, RegisterIsIdempotentAndShortBlocksWork) {
  const ModelInfo m = SmallModel("idem", "raw");
  auto a = client_->RegisterModel(m);
  auto b = client_->RegisterModel(m);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(a->created());
  EXPECT_FALSE(b->created());
  EXPECT_EQ(a->codec(), "raw:sinks=4");
  const std::string x = RandomBlock(m, 5, 7);  // a 7-token tail block
  BlockPut p{HashOf(5), 160, 7, x.data(), x.size()};
  ASSERT_TRUE(client_->Put(m, {p}).ok());
  auto got = client_->Get(m.model_id, {HashOf(5)});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ((*got)[0].tokens, 7);
  EXPECT_EQ((*got)[0].data, x);
}

TEST_F(RoundTripTest, HealthIsServingAndReflectionListsTheService) {
  auto channel = grpc::CreateChannel(daemon_->address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  {
    grpc::ClientContext ctx;
    grpc::Slice empty;
    grpc::ByteBuffer req(&empty, 1), resp;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req, &resp,
                   [&](grpc::Status s) { done.set_value(s); });
    ASSERT_TRUE(done.get_future().get().ok());
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(resp.Dump(&slices).ok());
    std::string bytes;
    for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    EXPECT_EQ(bytes, std::string("\x08\x01", 2));  // status: SERVING
  }
  {
    grpc::CompletionQueue cq;
    grpc::ClientContext ctx;
    auto call = stub.PrepareCall(
        &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
    void* tag;
    bool ok;
    call->StartCall(reinterpret_cast<void*>(1));
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    grpc::Slice list_services(std::string("\x3a\x00", 2));  // list_services: ""
    grpc::ByteBuffer req(&list_services, 1), resp;
    call->Write(req, reinterpret_cast<void*>(2));
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    call->Read(&resp, reinterpret_cast<void*>(3));
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(resp.Dump(&slices).ok());
    std::string bytes;
    for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    EXPECT_NE(bytes.find("vqkv.v1.Vqkv"), std::string::npos);
    ctx.TryCancel();
    grpc::Status st;
    call->Finish(&st, reinterpret_cast<void*>(4));
    cq.Next(&tag, &ok);
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
  }
}

}  // namespace
}  // namespace vqkv::testing
