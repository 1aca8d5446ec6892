#include "server/service/vqkv_handler.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "server/service/service_core.h"

#ifndef VQKV_VERSION
#define VQKV_VERSION "0.1.0"
#endif

namespace vqkv::service {

absl::StatusOr<std::string> TenantOf(const std::string& tenant) {
  if (tenant.size() > 256) return absl::InvalidArgumentError("tenant longer than 256 bytes");
  return tenant.empty() ? std::string("default") : tenant;
}

absl::Status CheckHash(const std::string& hash, int64_t index) {
  if (hash.empty() || hash.size() > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("block hash #", index, " is ", hash.size(), " bytes; must be 1..64"));
  }
  return absl::OkStatus();
}

std::string HexHash(const std::string& hash) {
  return absl::BytesToHexString(absl::string_view(hash.data(), hash.size()));
}

absl::Status Busy(const ServiceCore& core, int64_t wanted) {
  absl::Status s = absl::ResourceExhaustedError(
      absl::StrCat("daemon busy: ", wanted, " more bytes would exceed max_inflight_bytes (",
                   core.budget.used(), " of ", core.budget.limit(), " in use); retry later"));
  s.SetPayload(kRetryAfterPayload, absl::Cord(absl::StrCat(core.options.retry_after_ms)));
  return s;
}

absl::Status CheckDevice(const ServiceCore& core, int32_t device, const char* what) {
  if (core.store->HasTopDevice(device)) return absl::OkStatus();
  const std::vector<int> devices = core.store->Devices();
  if (devices.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": device ", device, " asked for, but this daemon has no GPU tier"));
  }
  return absl::InvalidArgumentError(absl::StrCat(what, ": device ", device,
                                                 " is not one of this daemon's GPUs (",
                                                 absl::StrJoin(devices, ", "), ")"));
}

absl::Status CheckDeadline(const CallContext& ctx) {
  if (absl::Now() > ctx.deadline) return absl::DeadlineExceededError("deadline exceeded");
  return absl::OkStatus();
}

absl::Status Annotate(const absl::Status& s, const std::string& prefix) {
  if (s.ok()) return s;
  absl::Status out(s.code(), absl::StrCat(prefix, ": ", std::string(s.message())));
  s.ForEachPayload(
      [&](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

absl::StatusOr<std::shared_ptr<Model>> FindModel(const ServiceCore& core,
                                                 const std::string& model_id, bool for_put) {
  std::shared_ptr<Model> m = core.models.Find(model_id);
  if (m != nullptr) return m;
  const std::string msg = absl::StrCat("model '", model_id, "' is not registered");
  return for_put ? absl::FailedPreconditionError(msg) : absl::NotFoundError(msg);
}

VqkvHandler::VqkvHandler(const ServiceOptions& options, store::BlockStore* store)
    : core_(std::make_unique<ServiceCore>(options, store)) {}

VqkvHandler::~VqkvHandler() = default;

absl::Status VqkvHandler::RegisterModel(const v1::RegisterModelRequest& request,
                                        v1::RegisterModelResponse* response) {
  const v1::ModelSpec& s = request.spec();
  if (s.dtype() == v1::DTYPE_UNSPECIFIED) {
    return absl::InvalidArgumentError("model.dtype is required");
  }
  VQKV_ASSIGN_OR_RETURN(DType dtype, FromProto(s.dtype(), DType::kF16));
  VQKV_ASSIGN_OR_RETURN(
      ModelConfig config,
      MakeModelConfig(s.model_id(), s.layers(), s.kv_heads(), s.head_dim(), dtype, s.block_tokens(),
                      s.codec(), core_->options.max_block_bytes));
  VQKV_ASSIGN_OR_RETURN(bool created, core_->models.Register(config));
  response->set_created(created);
  response->set_codec(config.codec_string);
  response->set_active_codebook_id(core_->models.Find(s.model_id())->active_codebook_id());
  return absl::OkStatus();
}

absl::Status VqkvHandler::Lookup(const v1::LookupRequest& request, v1::LookupResponse* response) {
  VQKV_ASSIGN_OR_RETURN(std::string tenant, TenantOf(request.tenant()));
  VQKV_ASSIGN_OR_RETURN(std::shared_ptr<Model> model, FindModel(*core_, request.model_id(), false));
  std::string codebook = request.codebook_id();
  if (codebook.empty()) codebook = model->active_codebook_id();
  std::vector<store::BlockKey> keys;
  keys.reserve(request.block_hashes_size());
  for (int i = 0; i < request.block_hashes_size(); ++i) {
    VQKV_RETURN_IF_ERROR(CheckHash(request.block_hashes(i), i));
    keys.push_back({tenant, request.model_id(), codebook, request.block_hashes(i)});
  }
  std::vector<store::BlockPlace> places = core_->store->LookupPrefix(keys);
  response->set_prefix_blocks(static_cast<int32_t>(places.size()));
  for (const store::BlockPlace& p : places) {
    response->add_tiers(static_cast<v1::Tier>(p.tier));
    response->add_devices(p.device);
  }
  return absl::OkStatus();
}

absl::Status VqkvHandler::DeleteBlocks(const v1::DeleteBlocksRequest& request,
                                       v1::DeleteBlocksResponse* response) {
  VQKV_ASSIGN_OR_RETURN(std::string tenant, TenantOf(request.tenant()));
  VQKV_ASSIGN_OR_RETURN(std::shared_ptr<Model> model, FindModel(*core_, request.model_id(), false));
  if (request.all_blocks()) {
    response->set_deleted(core_->store->DeleteModel(tenant, request.model_id()));
    return absl::OkStatus();
  }
  std::string codebook = request.codebook_id();
  if (codebook.empty()) codebook = model->active_codebook_id();
  std::vector<store::BlockKey> keys;
  for (int i = 0; i < request.block_hashes_size(); ++i) {
    VQKV_RETURN_IF_ERROR(CheckHash(request.block_hashes(i), i));
    keys.push_back({tenant, request.model_id(), codebook, request.block_hashes(i)});
  }
  response->set_deleted(core_->store->Delete(keys));
  return absl::OkStatus();
}

absl::Status VqkvHandler::GetStats(const v1::GetStatsRequest&, v1::GetStatsResponse* response) {
  const store::StoreStats st = core_->store->Stats();
  for (const store::TierCounters& t : st.tiers) {
    v1::TierStats* ts = response->add_tiers();
    ts->set_tier(static_cast<v1::Tier>(t.kind));
    ts->set_capacity_bytes(t.capacity_bytes);
    ts->set_used_bytes(t.used_bytes);
    ts->set_blocks(t.blocks);
    ts->set_hits(t.hits);
    ts->set_misses(t.misses);
    ts->set_demotions(t.demotions);
    ts->set_promotions(t.promotions);
    ts->set_evictions(t.evictions);
    if (t.device >= 0) ts->set_device(t.device);
    ts->set_transfers_in(t.transfers_in);
    ts->set_transfers_out(t.transfers_out);
    ts->set_transfer_failures(t.transfer_failures);
    ts->set_unavailable_reads(t.unavailable_reads);
  }
  response->set_blocks(st.blocks);
  response->set_stored_bytes(st.stored_bytes);
  response->set_logical_bytes(st.logical_bytes);
  response->set_hits(st.hits);
  response->set_misses(st.misses);
  response->set_evictions(st.evictions);
  response->set_corrupt_blocks(st.corrupt_blocks);
  response->set_inflight_bytes(core_->budget.used());
  response->set_max_inflight_bytes(core_->budget.limit());
  response->set_busy_rejections(core_->budget.rejections());
  for (const std::shared_ptr<Model>& m : core_->models.All()) {
    v1::ModelStats* ms = response->add_models();
    ms->set_model_id(m->config().model_id);
    ms->set_codec(m->config().codec_string);
    const store::ModelUsage u = core_->store->Usage(m->config().model_id);
    ms->set_blocks(u.blocks);
    ms->set_stored_bytes(u.stored_bytes);
    ms->set_logical_bytes(u.logical_bytes);
    for (const std::string& id : m->codebook_ids()) ms->add_codebook_ids(id);
    ms->set_active_codebook_id(m->active_codebook_id());
  }
  response->set_uptime_seconds(absl::ToDoubleSeconds(absl::Now() - core_->start_time));
  response->set_version(VQKV_VERSION);
  return absl::OkStatus();
}

std::unique_ptr<PutSession> VqkvHandler::StartPut(const CallContext& ctx) {
  return NewPutSession(core_.get(), ctx);
}

absl::StatusOr<std::unique_ptr<GetSession>> VqkvHandler::StartGet(
    const v1::GetBlocksRequest& request, const CallContext& ctx) {
  return NewGetSession(core_.get(), request, ctx);
}

std::unique_ptr<UploadSession> VqkvHandler::StartUpload(const CallContext& ctx) {
  return NewUploadSession(core_.get(), ctx);
}

std::unique_ptr<FitSession> VqkvHandler::StartFit(const CallContext& ctx) {
  return NewFitSession(core_.get(), ctx);
}

absl::StatusOr<std::string> VqkvHandler::LoadCodebookFile(const std::string& model_id,
                                                          const std::string& path, bool activate) {
  VQKV_ASSIGN_OR_RETURN(std::shared_ptr<Model> model, FindModel(*core_, model_id, true));
  VQKV_ASSIGN_OR_RETURN(kernels::Codebook cb, kernels::Codebook::Load(path));
  const std::string id = cb.id();
  VQKV_RETURN_IF_ERROR(
      model->AddCodebook(std::make_shared<const kernels::Codebook>(std::move(cb)), activate)
          .status());
  return id;
}

}  // namespace vqkv::service
