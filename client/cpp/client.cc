#include "client/cpp/client.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "grpcpp/grpcpp.h"
#include "proto/dtype_convert.h"
#include "vqkv/v1/vqkv.grpc.pb.h"

namespace vqkv::client {
namespace {

using ::vqkv::proto::ToProto;

constexpr int kMaxMessageBytes = 64 << 20;
constexpr char kRetryAfterMetadata[] = "vqkv-retry-after-ms";

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

class GrpcClient final : public Client {
 public:
  GrpcClient(const ClientOptions& o, std::shared_ptr<grpc::Channel> channel)
      : options_(o), channel_(std::move(channel)), stub_(v1::Vqkv::NewStub(channel_)) {}

  absl::Status WaitReady(absl::Duration timeout) override {
    if (channel_->WaitForConnected(absl::ToChronoTime(absl::Now() + timeout))) {
      return absl::OkStatus();
    }
    return absl::DeadlineExceededError(
        absl::StrCat("vqkv client: could not connect to ", options_.target));
  }

  absl::StatusOr<v1::RegisterModelResponse> RegisterModel(const ModelInfo& m) override {
    v1::RegisterModelRequest req;
    v1::ModelSpec* s = req.mutable_spec();
    s->set_model_id(m.model_id);
    s->set_layers(m.layers);
    s->set_kv_heads(m.kv_heads);
    s->set_head_dim(m.head_dim);
    s->set_dtype(ToProto(m.dtype));
    s->set_block_tokens(m.block_tokens);
    s->set_codec(m.codec);
    v1::RegisterModelResponse resp;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      resp.Clear();
      return stub_->RegisterModel(ctx, req, &resp);
    });
    if (!st.ok()) return st;
    return resp;
  }

  absl::StatusOr<v1::UploadCodebookResponse> UploadCodebook(const std::string& model_id,
                                                            const std::string& bytes,
                                                            bool activate) override {
    v1::UploadCodebookResponse resp;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      resp.Clear();
      auto writer = stub_->UploadCodebook(ctx, &resp);
      size_t off = 0;
      do {
        v1::UploadCodebookRequest msg;
        if (off == 0) {
          msg.set_model_id(model_id);
          msg.set_activate(activate);
        }
        const size_t len = std::min<size_t>(options_.chunk_bytes, bytes.size() - off);
        msg.set_data(bytes.data() + off, len);
        off += len;
        if (!writer->Write(msg)) break;
      } while (off < bytes.size());
      writer->WritesDone();
      return writer->Finish();
    });
    if (!st.ok()) return st;
    return resp;
  }

  absl::StatusOr<v1::FitCodebookResponse> FitCodebook(
      const FitParams& p, absl::Span<const SampleView> samples,
      const std::function<void(const v1::FitCodebookResponse&)>& progress) override {
    v1::FitCodebookResponse final;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      final.Clear();
      auto stream = stub_->FitCodebook(ctx);
      v1::FitCodebookRequest msg;
      v1::FitParams* fp = msg.mutable_params();
      fp->set_model_id(p.model_id);
      fp->set_k_stages(p.k_stages);
      fp->set_v_stages(p.v_stages);
      fp->set_iterations(p.iterations);
      fp->set_seed(p.seed);
      fp->set_per_head(p.per_head);
      fp->set_activate(p.activate);
      fp->set_use_stored_blocks(p.use_stored_blocks);
      fp->set_tenant(options_.tenant);
      fp->set_key_rope_theta(p.key_rope_theta);
      bool ok = stream->Write(msg);
      for (size_t i = 0; ok && i < samples.size(); ++i) {
        const SampleView& sv = samples[i];
        const char* data = static_cast<const char*>(sv.data);
        for (size_t off = 0; ok && off < sv.bytes; off += options_.chunk_bytes) {
          v1::FitCodebookRequest m;
          v1::SampleChunk* c = m.mutable_samples();
          c->set_sample(static_cast<int32_t>(i));
          c->set_tokens(sv.tokens);
          c->set_first_token(sv.first_token);
          c->set_dtype(ToProto(sv.dtype));
          c->set_offset(static_cast<int64_t>(off));
          c->set_data(data + off, std::min<size_t>(options_.chunk_bytes, sv.bytes - off));
          ok = stream->Write(m);
        }
      }
      stream->WritesDone();
      v1::FitCodebookResponse r;
      while (stream->Read(&r)) {
        if (!r.codebook_id().empty()) {
          final = r;
        } else if (progress) {
          progress(r);
        }
      }
      return stream->Finish();
    });
    if (!st.ok()) return st;
    return final;
  }

  absl::StatusOr<PutResult> Put(const ModelInfo& model, absl::Span<const BlockPut> blocks,
                                const PutOptions& o) override {
    PutResult total;
    size_t begin = 0;
    while (begin < blocks.size()) {
      // Calls end at block boundaries (all parts of a hash stay in one call).
      size_t end = begin;
      int64_t bytes = 0;
      while (end < blocks.size() &&
             (end == begin || blocks[end].hash == blocks[end - 1].hash ||
              bytes + static_cast<int64_t>(blocks[end].bytes) <= options_.max_call_bytes)) {
        bytes += static_cast<int64_t>(blocks[end].bytes);
        ++end;
      }
      absl::StatusOr<PutResult> r = PutCall(model, blocks.subspan(begin, end - begin), o);
      if (!r.ok()) return r.status();
      total.stored += r->stored;
      total.existing += r->existing;
      total.stored_bytes += r->stored_bytes;
      total.logical_bytes += r->logical_bytes;
      total.codebook_id = r->codebook_id;
      begin = end;
    }
    return total;
  }

 private:
  absl::StatusOr<PutResult> PutCall(const ModelInfo& model, absl::Span<const BlockPut> blocks,
                                    const PutOptions& o) {
    PutResult result;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      v1::PutBlocksResponse resp;
      auto writer = stub_->PutBlocks(ctx, &resp);
      v1::PutBlocksRequest msg;
      v1::PutHeader* h = msg.mutable_header();
      h->set_tenant(options_.tenant);
      h->set_model_id(model.model_id);
      h->set_codebook_id(o.codebook_id);
      h->set_encoding(o.codes ? v1::ENCODING_CODES : v1::ENCODING_TENSOR);
      h->set_dtype(ToProto(model.dtype));
      if (o.device >= 0) h->set_device(o.device);
      int64_t msg_bytes = 0;
      bool ok = true;
      for (const BlockPut& b : blocks) {
        const char* data = static_cast<const char*>(b.data);
        size_t off = 0;
        do {
          const size_t len = std::min<size_t>(options_.chunk_bytes - msg_bytes, b.bytes - off);
          v1::BlockChunk* c = msg.add_chunks();
          c->set_block_hash(b.hash);
          c->set_first_token(b.first_token);
          c->set_tokens(b.tokens);
          c->set_layer_begin(b.layer_begin);
          c->set_layer_end(b.layer_end);
          c->set_offset(static_cast<int64_t>(off));
          if (o.codes) c->set_total_bytes(static_cast<int64_t>(b.bytes));
          c->set_data(data + off, len);
          off += len;
          msg_bytes += static_cast<int64_t>(len);
          if (msg_bytes >= options_.chunk_bytes) {
            ok = writer->Write(msg);
            msg.Clear();
            msg_bytes = 0;
          }
        } while (ok && off < b.bytes);
        if (!ok) break;
      }
      if (ok) {
        msg.set_commit(true);
        writer->Write(msg);
      }
      writer->WritesDone();
      grpc::Status s = writer->Finish();
      if (s.ok()) {
        result.stored = resp.blocks_stored();
        result.existing = resp.blocks_existing();
        result.stored_bytes = resp.stored_bytes();
        result.logical_bytes = resp.logical_bytes();
        result.codebook_id = resp.codebook_id();
      }
      return s;
    });
    if (!st.ok()) return st;
    return result;
  }

 public:
  absl::StatusOr<std::vector<BlockGot>> Get(const std::string& model_id,
                                            absl::Span<const std::string> hashes,
                                            const GetOptions& o) override {
    v1::GetBlocksRequest req;
    req.set_tenant(options_.tenant);
    req.set_model_id(model_id);
    req.set_codebook_id(o.codebook_id);
    for (const std::string& h : hashes) req.add_block_hashes(h);
    req.set_encoding(o.codes ? v1::ENCODING_CODES : v1::ENCODING_TENSOR);
    if (!o.model_dtype) req.set_dtype(ToProto(o.dtype));
    req.set_layer_begin(o.layer_begin);
    req.set_layer_end(o.layer_end);
    req.set_max_chunk_bytes(o.max_chunk_bytes);
    req.set_allow_missing(o.allow_missing);
    if (o.device >= 0) req.set_device(o.device);
    std::vector<BlockGot> out;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      out.assign(hashes.size(), BlockGot{});
      auto reader = stub_->GetBlocks(ctx, req);
      v1::GetBlocksResponse r;
      bool bad = false;
      while (reader->Read(&r)) {
        if (r.index() < 0 || r.index() >= static_cast<int>(out.size())) {
          bad = true;
          continue;
        }
        BlockGot& b = out[r.index()];
        if (!r.found()) continue;
        b.found = true;
        if (r.has_info()) {
          b.tokens = r.info().tokens();
          b.first_token = r.info().first_token();
          b.tier = r.info().tier();
          b.codec = r.info().codec();
          b.codebook_id = r.info().codebook_id();
          b.device = r.info().has_device() ? r.info().device() : -1;
          b.data.resize(r.info().total_bytes());
        }
        if (r.offset() < 0 || r.offset() + r.data().size() > b.data.size()) {
          bad = true;
          continue;
        }
        std::memcpy(b.data.data() + r.offset(), r.data().data(), r.data().size());
      }
      grpc::Status s = reader->Finish();
      if (s.ok() && bad)
        return grpc::Status(grpc::StatusCode::INTERNAL, "malformed GetBlocks reply");
      return s;
    });
    if (!st.ok()) return st;
    return out;
  }

  absl::StatusOr<LookupResult> Lookup(const std::string& model_id,
                                      absl::Span<const std::string> hashes,
                                      const std::string& codebook_id) override {
    v1::LookupRequest req;
    req.set_tenant(options_.tenant);
    req.set_model_id(model_id);
    req.set_codebook_id(codebook_id);
    for (const std::string& h : hashes) req.add_block_hashes(h);
    v1::LookupResponse resp;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      resp.Clear();
      return stub_->Lookup(ctx, req, &resp);
    });
    if (!st.ok()) return st;
    LookupResult r;
    r.prefix_blocks = resp.prefix_blocks();
    for (int t : resp.tiers()) r.tiers.push_back(static_cast<v1::Tier>(t));
    r.devices.assign(resp.devices().begin(), resp.devices().end());
    return r;
  }

  absl::StatusOr<int64_t> Delete(const std::string& model_id, absl::Span<const std::string> hashes,
                                 bool all) override {
    v1::DeleteBlocksRequest req;
    req.set_tenant(options_.tenant);
    req.set_model_id(model_id);
    req.set_all_blocks(all);
    for (const std::string& h : hashes) req.add_block_hashes(h);
    v1::DeleteBlocksResponse resp;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      resp.Clear();
      return stub_->DeleteBlocks(ctx, req, &resp);
    });
    if (!st.ok()) return st;
    return resp.deleted();
  }

  absl::StatusOr<v1::GetStatsResponse> Stats() override {
    v1::GetStatsResponse resp;
    absl::Status st = Retry([&](grpc::ClientContext* ctx) {
      resp.Clear();
      return stub_->GetStats(ctx, v1::GetStatsRequest(), &resp);
    });
    if (!st.ok()) return st;
    return resp;
  }

 private:
  // Runs `attempt` with a fresh context per try until it succeeds, fails with a status that is
  // not worth retrying, or runs out of attempts or time.
  absl::Status Retry(const std::function<grpc::Status(grpc::ClientContext*)>& attempt) {
    const absl::Time deadline = absl::Now() + options_.timeout;
    absl::Duration backoff = options_.initial_backoff;
    thread_local std::mt19937 rng(std::random_device{}());
    for (int i = 1;; ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(deadline));
      grpc::Status s = attempt(&ctx);
      if (s.ok()) return absl::OkStatus();
      // This client never cancels its own calls, so CANCELLED means the server dropped the call
      // (a daemon shutting down does that to calls that arrive as it closes).
      bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                   s.error_code() == grpc::StatusCode::CANCELLED;
      absl::Duration wait = backoff;
      if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        const auto& md = ctx.GetServerTrailingMetadata();
        auto it = md.find(kRetryAfterMetadata);
        int64_t ms = 0;
        if (it != md.end() &&
            absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()), &ms)) {
          retry = true;
          wait = std::max(wait, absl::Milliseconds(ms));
        }
      }
      // Full jitter keeps many clients from retrying in lockstep.
      wait = absl::Microseconds(std::uniform_int_distribution<int64_t>(
          absl::ToInt64Microseconds(wait) / 2, absl::ToInt64Microseconds(wait))(rng));
      if (!retry || i >= options_.max_attempts || absl::Now() + wait >= deadline) {
        return FromGrpc(s);
      }
      absl::SleepFor(wait);
      backoff = std::min(backoff * 2, options_.max_backoff);
    }
  }

  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Vqkv::Stub> stub_;
};

}  // namespace

int64_t ModelInfo::BlockBytes(int32_t tokens) const {
  if (tokens == 0) tokens = block_tokens;
  return int64_t{layers} * 2 * tokens * kv_heads * head_dim *
         static_cast<int64_t>(DTypeSize(dtype));
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  if (options.target.empty()) return absl::InvalidArgumentError("client: empty target");
  if (options.chunk_bytes < 1024 || options.chunk_bytes > (32 << 20)) {
    return absl::InvalidArgumentError("client: chunk_bytes must be in [1 KiB, 32 MiB]");
  }
  if (options.max_attempts < 1) return absl::InvalidArgumentError("client: max_attempts < 1");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  // Our own retry loop handles UNAVAILABLE; gRPC's transparent retries would double it.
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  if (options.separate_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto channel =
      grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args);
  return std::unique_ptr<Client>(new GrpcClient(options, std::move(channel)));
}

std::future<absl::StatusOr<PutResult>> Client::PutAsync(const ModelInfo& model,
                                                        absl::Span<const BlockPut> blocks,
                                                        const PutOptions& options) {
  return std::async(std::launch::async,
                    [this, model, blocks, options] { return Put(model, blocks, options); });
}

std::future<absl::StatusOr<std::vector<BlockGot>>> Client::GetAsync(
    const std::string& model_id, absl::Span<const std::string> hashes, const GetOptions& options) {
  return std::async(std::launch::async,
                    [this, model_id, hashes, options] { return Get(model_id, hashes, options); });
}

std::vector<std::string> BlockHashChain(absl::Span<const int32_t> tokens, int block_tokens,
                                        const std::string& extra) {
  std::vector<std::string> out;
  std::string parent;
  for (size_t b = 0; block_tokens > 0 && (b + 1) * block_tokens <= tokens.size(); ++b) {
    std::string buf = parent;
    buf.append(reinterpret_cast<const char*>(tokens.data() + b * block_tokens),
               block_tokens * sizeof(int32_t));
    buf.append(extra);
    const std::array<uint8_t, 32> h = Sha256(buf);
    parent.assign(reinterpret_cast<const char*>(h.data()), 16);
    out.push_back(parent);
  }
  return out;
}

}  // namespace vqkv::client
