// State shared by the handler and its sessions, and small helpers they share (internal to
// server/service).
// Thread-safety: members are thread-safe objects; the struct itself is immutable after setup.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "proto/dtype_convert.h"
#include "server/service/byte_budget.h"
#include "server/service/handler.h"
#include "server/service/model_registry.h"
#include "server/service/service_options.h"
#include "server/store/block_store.h"

namespace vqkv::service {

struct ServiceCore {
  ServiceCore(ServiceOptions opts, store::BlockStore* s)
      : options(opts),
        store(s),
        models(opts.codec_factory, opts.gpu_devices, opts.device_codec_factory),
        budget(opts.max_inflight_bytes) {}
  const ServiceOptions options;
  store::BlockStore* const store;
  ModelRegistry models;
  ByteBudget budget;
  const absl::Time start_time = absl::Now();
};

// dtype conversions live in proto/dtype_convert.h.
using ::vqkv::proto::FromProto;
using ::vqkv::proto::ToProto;

// "default" for an empty tenant; InvalidArgument when longer than 256 bytes.
absl::StatusOr<std::string> TenantOf(const std::string& tenant);
// Block hashes are 1..64 bytes.
absl::Status CheckHash(const std::string& hash, int64_t index);
std::string HexHash(const std::string& hash);

// ResourceExhausted carrying the retry-after payload.
absl::Status Busy(const ServiceCore& core, int64_t wanted);
// Checks a request's optional GPU device: InvalidArgument (naming `what`) when the store has
// no top-level GPU tier on it.
absl::Status CheckDevice(const ServiceCore& core, int32_t device, const char* what);
// DeadlineExceeded once ctx.deadline has passed.
absl::Status CheckDeadline(const CallContext& ctx);
// Prefixes a status message, keeping its code and payloads.
absl::Status Annotate(const absl::Status& s, const std::string& prefix);

// Looks a model up: NotFound (or FailedPrecondition when `for_put`) when unknown.
absl::StatusOr<std::shared_ptr<Model>> FindModel(const ServiceCore& core,
                                                 const std::string& model_id, bool for_put);

std::unique_ptr<PutSession> NewPutSession(ServiceCore* core, const CallContext& ctx);
absl::StatusOr<std::unique_ptr<GetSession>> NewGetSession(ServiceCore* core,
                                                          const v1::GetBlocksRequest& request,
                                                          const CallContext& ctx);
std::unique_ptr<UploadSession> NewUploadSession(ServiceCore* core, const CallContext& ctx);
std::unique_ptr<FitSession> NewFitSession(ServiceCore* core, const CallContext& ctx);

}  // namespace vqkv::service
