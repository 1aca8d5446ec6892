// The gRPC layer: vqkv.v1.Vqkv implemented with the callback API. Each streaming rpc is a named
// reactor class that only converts between gRPC and the ServiceHandler and moves work to a
// WorkQueue; unary rpcs call the handler inline (they are cheap). No business logic here.
// Thread-safety: thread-safe. Destroy only after the grpc::Server using it has shut down.
#pragma once

#include <atomic>
#include <memory>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "server/service/handler.h"
#include "server/service/work_queue.h"
#include "vqkv/v1/vqkv.grpc.pb.h"

namespace vqkv::service {

// Trailing metadata key of a busy refusal: milliseconds after which to retry. ("grpc-" keys are
// reserved for gRPC itself.)
inline constexpr char kRetryAfterMetadata[] = "vqkv-retry-after-ms";

// absl::Status -> grpc::Status with the same code and message. When `ctx` is given and the
// status carries kRetryAfterPayload, adds trailing metadata kRetryAfterMetadata.
grpc::Status ToGrpcStatus(const absl::Status& s, grpc::CallbackServerContext* ctx = nullptr);
// The handler's view of a call.
CallContext MakeCallContext(const grpc::CallbackServerContext* ctx);

// Calls finished, by method and status code, and their total latency (for /metrics).
struct RpcCounters {
  static constexpr int kMethods = 8;
  static constexpr int kCodes = 17;
  // "RegisterModel", "UploadCodebook", ... in the order of the .proto.
  static const char* MethodName(int method);
  std::atomic<int64_t> calls[kMethods][kCodes] = {};
  std::atomic<int64_t> micros[kMethods] = {};
};

class GrpcService final : public v1::Vqkv::CallbackService {
 public:
  // `handler` is not owned. `worker_threads` run session work.
  GrpcService(ServiceHandler* handler, int worker_threads);
  ~GrpcService() override;

  // Streaming calls in progress.
  int64_t active_streams() const { return active_.load(); }
  const RpcCounters& counters() const { return counters_; }

  grpc::ServerUnaryReactor* RegisterModel(grpc::CallbackServerContext* ctx,
                                          const v1::RegisterModelRequest* request,
                                          v1::RegisterModelResponse* response) override;
  grpc::ServerReadReactor<v1::UploadCodebookRequest>* UploadCodebook(
      grpc::CallbackServerContext* ctx, v1::UploadCodebookResponse* response) override;
  grpc::ServerBidiReactor<v1::FitCodebookRequest, v1::FitCodebookResponse>* FitCodebook(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerReadReactor<v1::PutBlocksRequest>* PutBlocks(
      grpc::CallbackServerContext* ctx, v1::PutBlocksResponse* response) override;
  grpc::ServerWriteReactor<v1::GetBlocksResponse>* GetBlocks(
      grpc::CallbackServerContext* ctx, const v1::GetBlocksRequest* request) override;
  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* ctx,
                                   const v1::LookupRequest* request,
                                   v1::LookupResponse* response) override;
  grpc::ServerUnaryReactor* DeleteBlocks(grpc::CallbackServerContext* ctx,
                                         const v1::DeleteBlocksRequest* request,
                                         v1::DeleteBlocksResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const v1::GetStatsRequest* request,
                                     v1::GetStatsResponse* response) override;

 private:
  ServiceHandler* const handler_;
  std::atomic<int64_t> active_{0};
  RpcCounters counters_;
  std::unique_ptr<WorkQueue> queue_;  // last member: joined first on destruction
};

}  // namespace vqkv::service
