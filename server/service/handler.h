// The service's business logic behind a plain interface, free of gRPC types (ray's
// object_manager_server.h pattern): the gRPC layer (grpc_service.h) converts and calls; tests
// drive a handler directly. Requests and responses are the vqkv.v1 protobuf messages.
//
// Streaming calls are sessions: the transport creates one per call, feeds it the client's
// messages in order and asks it for the messages to send. A session is used by one thread at a
// time (the transport serialises calls on it) and may be destroyed at any point: a put session
// destroyed before Finish stores nothing.
//
// Errors are absl::Status with canonical codes (see proto/vqkv/v1/vqkv.proto). A status may
// carry the payload kRetryAfterPayload (decimal milliseconds): the call was refused because the
// daemon is busy and may be retried after that delay.
// Thread-safety: ServiceHandler methods are thread-safe.
#pragma once

#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "vqkv/v1/vqkv.pb.h"

namespace vqkv::service {

namespace v1 = ::vqkv::v1;

// Status payload type URL marking a retryable "busy" refusal; the value is milliseconds.
inline constexpr char kRetryAfterPayload[] = "vqkv.dev/retry-after-ms";

// What a handler knows about the call it serves.
struct CallContext {
  absl::Time deadline = absl::InfiniteFuture();
  std::string peer;
};

class PutSession {
 public:
  virtual ~PutSession() = default;
  // Consumes one client message (its data may be moved out). An error ends the call; nothing is
  // stored then.
  virtual absl::Status Add(v1::PutBlocksRequest& msg) = 0;
  // The client half-closed: checks completeness and commits every block atomically.
  virtual absl::Status Finish(v1::PutBlocksResponse* response) = 0;
};

class GetSession {
 public:
  virtual ~GetSession() = default;
  // Fills the next message to send; false when there is nothing more. An error ends the call.
  virtual absl::StatusOr<bool> Next(v1::GetBlocksResponse* response) = 0;
};

class UploadSession {
 public:
  virtual ~UploadSession() = default;
  virtual absl::Status Add(v1::UploadCodebookRequest& msg) = 0;
  virtual absl::Status Finish(v1::UploadCodebookResponse* response) = 0;
};

class FitSession {
 public:
  virtual ~FitSession() = default;
  virtual absl::Status Add(v1::FitCodebookRequest& msg) = 0;
  // Runs the fit, calling `progress` from this thread for progress messages, and fills `final`.
  virtual absl::Status Finish(const std::function<void(const v1::FitCodebookResponse&)>& progress,
                              v1::FitCodebookResponse* final) = 0;
};

class ServiceHandler {
 public:
  virtual ~ServiceHandler() = default;

  virtual absl::Status RegisterModel(const v1::RegisterModelRequest& request,
                                     v1::RegisterModelResponse* response) = 0;
  virtual absl::Status Lookup(const v1::LookupRequest& request, v1::LookupResponse* response) = 0;
  virtual absl::Status DeleteBlocks(const v1::DeleteBlocksRequest& request,
                                    v1::DeleteBlocksResponse* response) = 0;
  virtual absl::Status GetStats(const v1::GetStatsRequest& request,
                                v1::GetStatsResponse* response) = 0;

  virtual std::unique_ptr<PutSession> StartPut(const CallContext& ctx) = 0;
  // Validates the request and leases the blocks (errors: see GetBlocks in the .proto).
  virtual absl::StatusOr<std::unique_ptr<GetSession>> StartGet(const v1::GetBlocksRequest& request,
                                                               const CallContext& ctx) = 0;
  virtual std::unique_ptr<UploadSession> StartUpload(const CallContext& ctx) = 0;
  virtual std::unique_ptr<FitSession> StartFit(const CallContext& ctx) = 0;
};

}  // namespace vqkv::service
