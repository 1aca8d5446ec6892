// PutBlocks: assembles blocks from chunks, encodes complete blocks in batches (one codec call
// per batch), holds the encoded blocks invisibly and commits them all at once at the end.
#include <cmath>
#include <cstring>
#include <map>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/service/service_core.h"

namespace vqkv::service {
namespace {

struct PendingBlock {
  std::string hash;
  int64_t first_token = 0;
  int32_t tokens = 0;
  int64_t total = 0;               // bytes expected in this call's encoding
  std::string buf;                 // assembled bytes; the encoded payload once encoded
  std::map<int64_t, int64_t> got;  // received byte ranges: start -> end
  int64_t received = 0;
  bool encoded = false;
};

class PutSessionImpl final : public PutSession {
 public:
  PutSessionImpl(ServiceCore* core, const CallContext& ctx)
      : core_(core), ctx_(ctx), hold_(&core->budget) {}

  absl::Status Add(v1::PutBlocksRequest& msg) override {
    if (commit_) return absl::InvalidArgumentError("PutBlocks: message after the commit message");
    if (model_ == nullptr) VQKV_RETURN_IF_ERROR(Begin(msg));
    VQKV_RETURN_IF_ERROR(CheckDeadline(ctx_));
    for (v1::BlockChunk& chunk : *msg.mutable_chunks()) VQKV_RETURN_IF_ERROR(AddChunk(chunk));
    if (ready_bytes_ >= core_->options.codec_batch_bytes) VQKV_RETURN_IF_ERROR(EncodeReady());
    commit_ = msg.commit();
    return absl::OkStatus();
  }

  absl::Status Finish(v1::PutBlocksResponse* response) override {
    if (!commit_) {
      return absl::InvalidArgumentError(
          "PutBlocks: the stream ended without a commit message (truncated); nothing stored");
    }
    for (const PendingBlock& b : blocks_) {
      if (b.received != b.total) {
        return absl::InvalidArgumentError(absl::StrCat("PutBlocks: block ", HexHash(b.hash),
                                                       " is incomplete: received ", b.received,
                                                       " of ", b.total, " bytes; nothing stored"));
      }
    }
    VQKV_RETURN_IF_ERROR(EncodeReady());
    // A client past its deadline has given up: storing now would surprise nobody but it.
    VQKV_RETURN_IF_ERROR(CheckDeadline(ctx_));
    const ModelConfig& mc = model_->config();
    std::vector<store::NewBlock> out;
    out.reserve(blocks_.size());
    for (PendingBlock& b : blocks_) {
      store::NewBlock nb;
      nb.key = store::BlockKey{tenant_, mc.model_id, codec_.codebook_id, std::move(b.hash)};
      nb.bytes = std::move(b.buf);
      nb.meta.logical_bytes = mc.LayerBytes(b.tokens, mc.dtype) * mc.layers;
      nb.meta.tokens = b.tokens;
      nb.meta.first_token = b.first_token;
      out.push_back(std::move(nb));
    }
    blocks_.clear();
    absl::StatusOr<store::BlockStore::CommitResult> committed =
        core_->store->Commit(std::move(out), device_);
    hold_.Remove(hold_.held());  // the blocks now belong to the store (or are gone)
    VQKV_ASSIGN_OR_RETURN(store::BlockStore::CommitResult r, std::move(committed));
    response->set_blocks_stored(r.stored);
    response->set_blocks_existing(r.existing);
    response->set_stored_bytes(r.stored_bytes);
    response->set_logical_bytes(r.logical_bytes);
    response->set_codebook_id(codec_.codebook_id);
    return absl::OkStatus();
  }

 private:
  absl::Status Begin(const v1::PutBlocksRequest& msg) {
    if (!msg.has_header()) {
      return absl::InvalidArgumentError("PutBlocks: the first message must carry a header");
    }
    const v1::PutHeader& h = msg.header();
    VQKV_ASSIGN_OR_RETURN(tenant_, TenantOf(h.tenant()));
    VQKV_ASSIGN_OR_RETURN(std::shared_ptr<Model> model, FindModel(*core_, h.model_id(), true));
    const ModelConfig& mc = model->config();
    if (h.encoding() != v1::ENCODING_UNSPECIFIED && h.encoding() != v1::ENCODING_TENSOR &&
        h.encoding() != v1::ENCODING_CODES) {
      return absl::InvalidArgumentError(absl::StrCat("PutBlocks: unknown encoding ", h.encoding()));
    }
    codes_ = h.encoding() == v1::ENCODING_CODES;
    VQKV_ASSIGN_OR_RETURN(DType dt, FromProto(h.dtype(), mc.dtype));
    if (dt != mc.dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat("PutBlocks: dtype ", std::string(DTypeName(dt)), " does not match model ",
                       mc.model_id, " (", std::string(DTypeName(mc.dtype)), ")"));
    }
    VQKV_ASSIGN_OR_RETURN(codec_, model->Resolve(h.codebook_id()));
    if (h.has_device()) {
      VQKV_RETURN_IF_ERROR(CheckDevice(*core_, h.device(), "PutBlocks"));
      device_ = h.device();
    } else {
      // Placement by free capacity, decided once per call: the call's blocks are encoded on the
      // GPU whose tier will hold them (-1 without GPU tiers).
      device_ = core_->store->PickDevice();
    }
    model_ = std::move(model);
    return absl::OkStatus();
  }

  absl::Status AddChunk(v1::BlockChunk& c) {
    const ModelConfig& mc = model_->config();
    const int64_t chunk_index = chunks_seen_++;
    VQKV_RETURN_IF_ERROR(CheckHash(c.block_hash(), chunk_index));
    const int32_t tokens = c.tokens() == 0 ? mc.block_tokens : c.tokens();
    if (tokens < 1 || tokens > mc.block_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", HexHash(c.block_hash()), ": tokens ", tokens,
                       " outside [1, block_tokens=", mc.block_tokens, "]"));
    }
    if (c.first_token() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", HexHash(c.block_hash()), ": negative first_token"));
    }
    const int64_t layer_bytes = mc.LayerBytes(tokens, mc.dtype);
    const int64_t tensor_bytes = layer_bytes * mc.layers;
    auto [it, fresh] = index_.try_emplace(c.block_hash(), blocks_.size());
    if (fresh) {
      if (static_cast<int64_t>(blocks_.size()) >= core_->options.max_blocks_per_call) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "PutBlocks: more than ", core_->options.max_blocks_per_call, " blocks in one call"));
      }
      PendingBlock b;
      b.hash = c.block_hash();
      b.first_token = c.first_token();
      b.tokens = tokens;
      if (codes_) {
        if (c.total_bytes() <= 40 || c.total_bytes() > 2 * tensor_bytes + 4096) {
          return absl::InvalidArgumentError(
              absl::StrCat("block ", HexHash(b.hash), ": codes total_bytes ", c.total_bytes(),
                           " is not a plausible payload size for this model"));
        }
        b.total = c.total_bytes();
      } else {
        b.total = tensor_bytes;
      }
      if (tensor_bytes > core_->options.max_block_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "block ", HexHash(b.hash), ": ", tensor_bytes, " bytes exceeds max_block_bytes"));
      }
      if (hold_.held() + b.total > core_->budget.limit()) {
        // Not a transient condition: this call alone would never fit. No retry trailer.
        return absl::ResourceExhaustedError(absl::StrCat(
            "PutBlocks: this call holds more than max_inflight_bytes (", core_->budget.limit(),
            ") before its commit; split it into smaller calls"));
      }
      if (!hold_.TryAdd(b.total)) return Busy(*core_, b.total);
      blocks_.push_back(std::move(b));
    }
    PendingBlock& b = blocks_[it->second];
    if (b.first_token != c.first_token() || b.tokens != tokens ||
        (codes_ && c.total_bytes() != b.total)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", HexHash(b.hash), ": chunks disagree on first_token/tokens/total_bytes"));
    }
    if (b.encoded || b.received == b.total) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", HexHash(b.hash), ": chunk after the block was complete"));
    }
    int64_t start = 0, limit = b.total;
    if (codes_) {
      if (c.layer_begin() != 0 || c.layer_end() != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("block ", HexHash(b.hash), ": codes chunks cannot carry a layer range"));
      }
    } else {
      int32_t lb = c.layer_begin(), le = c.layer_end();
      if (lb == 0 && le == 0) le = mc.layers;
      if (lb < 0 || lb >= le || le > mc.layers) {
        return absl::InvalidArgumentError(absl::StrCat("block ", HexHash(b.hash), ": layer range [",
                                                       lb, ", ", le, ") outside [0, ", mc.layers,
                                                       ")"));
      }
      start = lb * layer_bytes;
      limit = le * layer_bytes;
    }
    const int64_t len = static_cast<int64_t>(c.data().size());
    if (len == 0 || c.offset() < 0 || start + c.offset() + len > limit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", HexHash(b.hash), ": chunk of ", len, " bytes at offset ", c.offset(),
          " does not fit its range of ", limit - start, " bytes (shape or dtype mismatch?)"));
    }
    start += c.offset();
    const int64_t end = start + len;
    auto next = b.got.upper_bound(start);
    if ((next != b.got.end() && next->first < end) ||
        (next != b.got.begin() && std::prev(next)->second > start)) {
      return absl::InvalidArgumentError(absl::StrCat("block ", HexHash(b.hash), ": bytes [", start,
                                                     ", ", end, ") were already received"));
    }
    if (start == 0 && len == b.total) {
      b.buf = std::move(*c.mutable_data());  // the common one-chunk block: no copy
    } else if (b.got.empty() && start == 0) {
      b.buf.reserve(b.total);  // chunks in order (the usual case) are appended: no zero fill
      b.buf.append(c.data());
    } else if (b.got.size() == 1 && b.got.begin()->first == 0 &&
               start == static_cast<int64_t>(b.buf.size())) {
      b.buf.append(c.data());
    } else {
      b.buf.resize(b.total);
      std::memcpy(b.buf.data() + start, c.data().data(), len);
    }
    // Keep received ranges merged: in-order chunks stay one range [0, received).
    auto [pos, inserted] = b.got.emplace(start, end);
    if (pos != b.got.begin() && std::prev(pos)->second == start) {
      std::prev(pos)->second = end;
      b.got.erase(pos);
    }
    b.received += len;
    if (b.received == b.total) {
      ready_.push_back(it->second);
      ready_bytes_ += b.total;
    }
    return absl::OkStatus();
  }

  // Encodes (tensor) or validates (codes) every complete, not yet encoded block.
  absl::Status EncodeReady() {
    if (ready_.empty()) return absl::OkStatus();
    VQKV_RETURN_IF_ERROR(CheckDeadline(ctx_));
    const ModelConfig& mc = model_->config();
    if (codes_) {
      for (size_t i : ready_) VQKV_RETURN_IF_ERROR(ValidateCodes(blocks_[i]));
    } else {
      std::vector<kernels::KvBlockView> views;
      for (size_t i : ready_) {
        views.push_back(
            {mc.Shape(blocks_[i].tokens), mc.dtype, blocks_[i].buf.data(), blocks_[i].first_token});
      }
      std::vector<std::string> encoded;
      if (absl::Status s = codec_.For(device_).EncodeBatched(views, &encoded); !s.ok()) {
        return Annotate(s, "PutBlocks: encoding failed");
      }
      for (size_t j = 0; j < ready_.size(); ++j) {
        PendingBlock& b = blocks_[ready_[j]];
        const int64_t delta = static_cast<int64_t>(encoded[j].size()) - b.total;
        if (delta > 0) hold_.ForceAdd(delta);
        if (delta < 0) hold_.Remove(-delta);
        b.buf = std::move(encoded[j]);
      }
    }
    for (size_t i : ready_) {
      blocks_[i].encoded = true;
      blocks_[i].got.clear();
    }
    ready_.clear();
    ready_bytes_ = 0;
    return absl::OkStatus();
  }

  // A client-encoded payload must be exactly what this model's codec would have produced for
  // the block, and must decode to finite values.
  absl::Status ValidateCodes(const PendingBlock& b) const {
    const ModelConfig& mc = model_->config();
    const kernels::Codec& codec = codec_.For(device_);
    const std::string where = absl::StrCat("block ", HexHash(b.hash), ": ");
    absl::StatusOr<kernels::PayloadHeader> h = kernels::ReadPayloadHeader(b.buf);
    if (!h.ok()) return Annotate(h.status(), where);
    const kernels::KvShape shape = mc.Shape(b.tokens);
    const int64_t want = codec.PayloadBytes(shape, mc.dtype, b.first_token);
    if (h->kind != static_cast<uint8_t>(codec.kind()) ||
        h->dtype != static_cast<uint8_t>(mc.dtype) || !(kernels::HeaderShape(*h) == shape) ||
        want != b.total) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "codes do not match model ", mc.DebugString(), " with ", b.tokens,
                       " tokens at position ", b.first_token, " (expected a ", want, "-byte ",
                       codec.Label(), " payload of shape ", shape.DebugString(), ", got ", b.total,
                       " bytes of shape ", kernels::HeaderShape(*h).DebugString(), ")"));
    }
    absl::StatusOr<std::vector<float>> x = codec.DecodeToFloat(b.buf);
    if (!x.ok()) return Annotate(x.status(), where);
    for (float v : *x) {
      if (!std::isfinite(v)) return absl::InvalidArgumentError(where + "codes decode to NaN/Inf");
    }
    return absl::OkStatus();
  }

  ServiceCore* const core_;
  const CallContext ctx_;
  BudgetHold hold_;
  std::shared_ptr<Model> model_;
  ResolvedCodec codec_;
  std::string tenant_;
  int device_ = -1;  // GPU the blocks go to (-1: no GPU tier)
  bool codes_ = false;
  bool commit_ = false;
  int64_t chunks_seen_ = 0;
  std::vector<PendingBlock> blocks_;
  absl::flat_hash_map<std::string, size_t> index_;
  std::vector<size_t> ready_;
  int64_t ready_bytes_ = 0;
};

}  // namespace

std::unique_ptr<PutSession> NewPutSession(ServiceCore* core, const CallContext& ctx) {
  return std::make_unique<PutSessionImpl>(core, ctx);
}

}  // namespace vqkv::service
