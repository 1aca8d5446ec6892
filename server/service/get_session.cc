// GetBlocks: leases every requested block up front, then decodes them in batches (one codec
// call per batch, bounded by in-flight bytes) and streams each block as chunks.
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/service/service_core.h"
#include "server/store/host_buffer.h"

namespace vqkv::service {
namespace {

constexpr int kMaxBlocksPerGet = 65536;

class GetSessionImpl final : public GetSession {
 public:
  GetSessionImpl(ServiceCore* core, const CallContext& ctx)
      : core_(core), ctx_(ctx), hold_(&core->budget) {}

  absl::Status Start(const v1::GetBlocksRequest& req) {
    VQKV_ASSIGN_OR_RETURN(std::string tenant, TenantOf(req.tenant()));
    VQKV_ASSIGN_OR_RETURN(model_, FindModel(*core_, req.model_id(), false));
    const ModelConfig& mc = model_->config();
    if (req.encoding() != v1::ENCODING_UNSPECIFIED && req.encoding() != v1::ENCODING_TENSOR &&
        req.encoding() != v1::ENCODING_CODES) {
      return absl::InvalidArgumentError(
          absl::StrCat("GetBlocks: unknown encoding ", req.encoding()));
    }
    codes_ = req.encoding() == v1::ENCODING_CODES;
    VQKV_ASSIGN_OR_RETURN(dtype_, FromProto(req.dtype(), mc.dtype));
    lb_ = req.layer_begin();
    le_ = req.layer_end();
    if (lb_ == 0 && le_ == 0) le_ = mc.layers;
    if (lb_ < 0 || lb_ >= le_ || le_ > mc.layers) {
      return absl::InvalidArgumentError(absl::StrCat("GetBlocks: layer range [", lb_, ", ", le_,
                                                     ") outside [0, ", mc.layers, ")"));
    }
    if (codes_ && (lb_ != 0 || le_ != mc.layers)) {
      return absl::InvalidArgumentError("GetBlocks: codes are returned for whole blocks only");
    }
    chunk_ =
        req.max_chunk_bytes() == 0 ? core_->options.default_chunk_bytes : req.max_chunk_bytes();
    if (chunk_ < 1024 || chunk_ > core_->options.max_chunk_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("GetBlocks: max_chunk_bytes ", chunk_,
                                                     " outside [1024, ",
                                                     core_->options.max_chunk_bytes, "]"));
    }
    if (req.block_hashes_size() > kMaxBlocksPerGet) {
      return absl::InvalidArgumentError(
          absl::StrCat("GetBlocks: more than ", kMaxBlocksPerGet, " blocks in one call"));
    }
    VQKV_ASSIGN_OR_RETURN(codec_, model_->Resolve(req.codebook_id()));
    std::vector<store::BlockKey> keys;
    keys.reserve(req.block_hashes_size());
    for (int i = 0; i < req.block_hashes_size(); ++i) {
      VQKV_RETURN_IF_ERROR(CheckHash(req.block_hashes(i), i));
      keys.push_back({tenant, mc.model_id, codec_.codebook_id, req.block_hashes(i)});
    }
    store::AcquireOptions acquire;
    if (req.has_device()) {
      VQKV_RETURN_IF_ERROR(CheckDevice(*core_, req.device(), "GetBlocks"));
      acquire.device = device_ = req.device();
    }
    // Device-to-device moves happen under the store's lock: bound them by the call's deadline.
    acquire.deadline = ctx_.deadline;
    leases_ = core_->store->Acquire(keys, acquire);
    for (size_t i = 0; i < leases_.size(); ++i) {
      if (!leases_[i].has_value() && !req.allow_missing()) {
        return absl::NotFoundError(
            absl::StrCat("GetBlocks: block #", i, " (", HexHash(keys[i].hash), ") is not stored"));
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<bool> Next(v1::GetBlocksResponse* out) override {
    out->Clear();
    if (next_ >= leases_.size()) return false;
    out->set_index(static_cast<int32_t>(next_));
    if (!leases_[next_].has_value()) {
      out->set_found(false);
      ++next_;
      return true;
    }
    const store::BlockStore::Lease& lease = *leases_[next_];
    std::string_view view;
    if (codes_) {
      view = lease.bytes();
    } else {
      if (next_ >= batch_end_) VQKV_RETURN_IF_ERROR(DecodeBatch());
      const store::HostBuffer& full = decoded_[next_ - batch_begin_];
      const ModelConfig& mc = model_->config();
      const int64_t layer = mc.LayerBytes(lease.meta().tokens, dtype_);
      view = std::string_view(full.data(), full.size()).substr(lb_ * layer, (le_ - lb_) * layer);
    }
    out->set_found(true);
    if (offset_ == 0) {
      v1::BlockInfo* info = out->mutable_info();
      info->set_tokens(lease.meta().tokens);
      info->set_first_token(lease.meta().first_token);
      info->set_tier(static_cast<v1::Tier>(lease.tier()));
      info->set_codec(model_->config().codec_string);
      info->set_codebook_id(codec_.codebook_id);
      info->set_total_bytes(static_cast<int64_t>(view.size()));
      info->set_dtype(ToProto(codes_ ? model_->config().dtype : dtype_));
      if (lease.device() >= 0) info->set_device(lease.device());
    }
    const int64_t len = std::min<int64_t>(chunk_, static_cast<int64_t>(view.size()) - offset_);
    out->set_offset(offset_);
    out->set_data(view.data() + offset_, len);
    offset_ += len;
    if (offset_ >= static_cast<int64_t>(view.size())) {
      // Done with this block: free its lease and decoded bytes before the next one.
      if (!codes_) {
        store::HostBuffer& buf = decoded_[next_ - batch_begin_];
        hold_.Remove(static_cast<int64_t>(buf.size()));
        buf = store::HostBuffer();
      }
      leases_[next_].reset();
      offset_ = 0;
      ++next_;
    }
    return true;
  }

 private:
  // The GPU a block is decoded on: the destination the request names, else the block's own.
  int DecodeDevice(const store::BlockStore::Lease& lease) const {
    return device_ >= 0 ? device_ : lease.device();
  }

  // Decodes the found blocks starting at next_ (up to the first missing one or one decoded on
  // another device, within the batch byte budget, at least one block) with one codec call.
  absl::Status DecodeBatch() {
    VQKV_RETURN_IF_ERROR(CheckDeadline(ctx_));
    const ModelConfig& mc = model_->config();
    std::vector<std::string_view> payloads;
    std::vector<size_t> sizes;
    int64_t total = 0;
    size_t end = next_;
    const int device = DecodeDevice(*leases_[next_]);
    while (end < leases_.size() && leases_[end].has_value() &&
           DecodeDevice(*leases_[end]) == device) {
      const int64_t bytes = mc.LayerBytes(leases_[end]->meta().tokens, dtype_) * mc.layers;
      if (end > next_ && total + bytes > core_->options.codec_batch_bytes) break;
      payloads.push_back(leases_[end]->bytes());
      sizes.push_back(static_cast<size_t>(bytes));
      total += bytes;
      ++end;
    }
    if (!hold_.TryAdd(total)) return Busy(*core_, total);
    decoded_.clear();
    decoded_.resize(payloads.size());
    std::vector<void*> outs;
    for (size_t i = 0; i < payloads.size(); ++i) {
      // Not zero-filled: the codec writes every byte.
      decoded_[i] = store::HostBuffer(core_->options.decode_buffers, sizes[i]);
      outs.push_back(decoded_[i].data());
    }
    absl::Status s = codec_.For(device).DecodeBatched(payloads, dtype_, outs, sizes);
    if (!s.ok()) {
      return absl::DataLossError(
          absl::StrCat("GetBlocks: a stored block failed to decode: ", s.message()));
    }
    batch_begin_ = next_;
    batch_end_ = end;
    return absl::OkStatus();
  }

  ServiceCore* const core_;
  const CallContext ctx_;
  BudgetHold hold_;
  std::shared_ptr<Model> model_;
  ResolvedCodec codec_;
  int device_ = -1;  // destination GPU (-1: decode each block where it is)
  bool codes_ = false;
  DType dtype_ = DType::kF16;
  int32_t lb_ = 0, le_ = 0;
  int64_t chunk_ = 0;
  std::vector<std::optional<store::BlockStore::Lease>> leases_;
  std::vector<store::HostBuffer> decoded_;  // blocks [batch_begin_, batch_end_)
  size_t batch_begin_ = 0, batch_end_ = 0;
  size_t next_ = 0;
  int64_t offset_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GetSession>> NewGetSession(ServiceCore* core,
                                                          const v1::GetBlocksRequest& request,
                                                          const CallContext& ctx) {
  auto s = std::make_unique<GetSessionImpl>(core, ctx);
  VQKV_RETURN_IF_ERROR(s->Start(request));
  return std::unique_ptr<GetSession>(std::move(s));
}

}  // namespace vqkv::service
