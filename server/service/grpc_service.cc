#include "server/service/grpc_service.h"

#include <algorithm>
#include <chrono>
#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace vqkv::service {

grpc::Status ToGrpcStatus(const absl::Status& s, grpc::CallbackServerContext* ctx) {
  if (s.ok()) return grpc::Status::OK;
  if (ctx != nullptr) {
    if (auto ms = s.GetPayload(kRetryAfterPayload); ms.has_value()) {
      ctx->AddTrailingMetadata(kRetryAfterMetadata, std::string(*ms));
    }
  }
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

CallContext MakeCallContext(const grpc::CallbackServerContext* ctx) {
  CallContext c;
  const auto deadline = ctx->deadline();
  // gRPC reports "no deadline" as a far-future time point; keep it infinite.
  if (deadline < std::chrono::system_clock::now() + std::chrono::hours(24 * 365)) {
    c.deadline = absl::FromChrono(deadline);
  }
  c.peer = ctx->peer();
  return c;
}

namespace {

enum Method {
  kRegisterModel,
  kUploadCodebook,
  kFitCodebook,
  kPutBlocks,
  kGetBlocks,
  kLookup,
  kDeleteBlocks,
  kGetStats
};

// Counts a call while it lives and records its status code and latency when it ends.
class CallTracker {
 public:
  CallTracker(Method m, RpcCounters* c, std::atomic<int64_t>* active)
      : method_(m), counters_(c), active_(active), start_(absl::Now()) {
    if (active_ != nullptr) active_->fetch_add(1);
  }
  ~CallTracker() {
    if (active_ != nullptr) active_->fetch_sub(1);
    counters_->calls[method_][std::min<int>(code_, RpcCounters::kCodes - 1)].fetch_add(1);
    counters_->micros[method_].fetch_add(absl::ToInt64Microseconds(absl::Now() - start_));
  }
  // Returns `s` after noting its code.
  grpc::Status Note(grpc::Status s) {
    code_ = static_cast<int>(s.error_code());
    return s;
  }

 private:
  const Method method_;
  RpcCounters* const counters_;
  std::atomic<int64_t>* const active_;
  const absl::Time start_;
  int code_ = static_cast<int>(grpc::StatusCode::CANCELLED);
};

// PutBlocks: read a message, hand it to the session on the work queue, read the next.
class PutBlocksReactor final : public grpc::ServerReadReactor<v1::PutBlocksRequest> {
 public:
  PutBlocksReactor(grpc::CallbackServerContext* ctx, ServiceHandler* handler, WorkQueue* queue,
                   v1::PutBlocksResponse* response, RpcCounters* counters,
                   std::atomic<int64_t>* active)
      : ctx_(ctx),
        queue_(queue),
        response_(response),
        tracker_(kPutBlocks, counters, active),
        session_(handler->StartPut(MakeCallContext(ctx))) {
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      // A broken or cancelled call also ends the reads; only a clean half-close may commit.
      if (ctx_->IsCancelled()) return End(absl::CancelledError("PutBlocks cancelled"));
      queue_->Submit([this] { End(session_->Finish(response_)); });
      return;
    }
    queue_->Submit([this] {
      if (absl::Status s = session_->Add(request_); !s.ok()) return End(s);
      request_.Clear();
      StartRead(&request_);
    });
  }
  void OnDone() override { delete this; }

 private:
  void End(const absl::Status& s) {
    session_.reset();  // discards anything uncommitted and returns its in-flight bytes
    Finish(tracker_.Note(ToGrpcStatus(s, ctx_)));
  }
  grpc::CallbackServerContext* const ctx_;
  WorkQueue* const queue_;
  v1::PutBlocksResponse* const response_;
  CallTracker tracker_;
  std::unique_ptr<PutSession> session_;
  v1::PutBlocksRequest request_;
};

// GetBlocks: the session produces one message at a time on the work queue.
class GetBlocksReactor final : public grpc::ServerWriteReactor<v1::GetBlocksResponse> {
 public:
  GetBlocksReactor(grpc::CallbackServerContext* ctx, ServiceHandler* handler, WorkQueue* queue,
                   const v1::GetBlocksRequest* request, RpcCounters* counters,
                   std::atomic<int64_t>* active)
      : ctx_(ctx), queue_(queue), tracker_(kGetBlocks, counters, active) {
    queue_->Submit([this, handler, request] {
      auto session = handler->StartGet(*request, MakeCallContext(ctx_));
      if (!session.ok()) return End(session.status());
      session_ = *std::move(session);
      WriteNext();
    });
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return End(absl::CancelledError("GetBlocks: the client went away"));
    queue_->Submit([this] { WriteNext(); });
  }
  void OnDone() override { delete this; }

 private:
  void WriteNext() {
    absl::StatusOr<bool> more = session_->Next(&response_);
    if (!more.ok()) return End(more.status());
    if (!*more) return End(absl::OkStatus());
    StartWrite(&response_);
  }
  void End(const absl::Status& s) {
    session_.reset();  // releases the leases now
    Finish(tracker_.Note(ToGrpcStatus(s, ctx_)));
  }
  grpc::CallbackServerContext* const ctx_;
  WorkQueue* const queue_;
  CallTracker tracker_;
  std::unique_ptr<GetSession> session_;
  v1::GetBlocksResponse response_;
};

class UploadCodebookReactor final : public grpc::ServerReadReactor<v1::UploadCodebookRequest> {
 public:
  UploadCodebookReactor(grpc::CallbackServerContext* ctx, ServiceHandler* handler, WorkQueue* queue,
                        v1::UploadCodebookResponse* response, RpcCounters* counters,
                        std::atomic<int64_t>* active)
      : ctx_(ctx),
        queue_(queue),
        response_(response),
        tracker_(kUploadCodebook, counters, active),
        session_(handler->StartUpload(MakeCallContext(ctx))) {
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      if (ctx_->IsCancelled()) return End(absl::CancelledError("UploadCodebook cancelled"));
      queue_->Submit([this] { End(session_->Finish(response_)); });
      return;
    }
    queue_->Submit([this] {
      if (absl::Status s = session_->Add(request_); !s.ok()) return End(s);
      request_.Clear();
      StartRead(&request_);
    });
  }
  void OnDone() override { delete this; }

 private:
  void End(const absl::Status& s) {
    session_.reset();
    Finish(tracker_.Note(ToGrpcStatus(s, ctx_)));
  }
  grpc::CallbackServerContext* const ctx_;
  WorkQueue* const queue_;
  v1::UploadCodebookResponse* const response_;
  CallTracker tracker_;
  std::unique_ptr<UploadSession> session_;
  v1::UploadCodebookRequest request_;
};

// FitCodebook: reads params and samples, then fits on the work queue while streaming progress.
// Progress messages that arrive while a write is in flight replace each other (only the latest
// is sent); the final message is always sent.
class FitCodebookReactor final
    : public grpc::ServerBidiReactor<v1::FitCodebookRequest, v1::FitCodebookResponse> {
 public:
  FitCodebookReactor(grpc::CallbackServerContext* ctx, ServiceHandler* handler, WorkQueue* queue,
                     RpcCounters* counters, std::atomic<int64_t>* active)
      : ctx_(ctx),
        queue_(queue),
        tracker_(kFitCodebook, counters, active),
        session_(handler->StartFit(MakeCallContext(ctx))) {
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      if (ctx_->IsCancelled())
        return Finish(tracker_.Note(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled")));
      queue_->Submit([this] { RunFit(); });
      return;
    }
    queue_->Submit([this] {
      if (absl::Status s = session_->Add(request_); !s.ok()) {
        session_.reset();
        return Finish(tracker_.Note(ToGrpcStatus(s, ctx_)));
      }
      request_.Clear();
      StartRead(&request_);
    });
  }
  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) broken_ = true;
    if (pending_.has_value() && !broken_) {
      out_ = *std::move(pending_);
      pending_.reset();
      writing_ = true;
      l.unlock();
      StartWrite(&out_);
      return;
    }
    if (fit_done_) FinishOrSendFinal(l);
  }
  void OnDone() override { delete this; }

 private:
  void RunFit() {
    v1::FitCodebookResponse final;
    absl::Status s = session_->Finish(
        [this](const v1::FitCodebookResponse& p) {
          std::unique_lock<std::mutex> l(mu_);
          if (broken_) return;
          if (writing_) {
            pending_ = p;
            return;
          }
          out_ = p;
          writing_ = true;
          l.unlock();
          StartWrite(&out_);
        },
        &final);
    session_.reset();
    std::unique_lock<std::mutex> l(mu_);
    fit_done_ = true;
    status_ = s;
    final_ = std::move(final);
    if (!writing_) FinishOrSendFinal(l);
  }
  // Called with mu_ held and no write in flight, once the fit is over.
  void FinishOrSendFinal(std::unique_lock<std::mutex>& l) {
    if (!broken_ && status_.ok() && !final_sent_) {
      final_sent_ = true;
      pending_.reset();
      out_ = final_;
      writing_ = true;
      l.unlock();
      StartWrite(&out_);
      return;
    }
    const grpc::Status st = broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away")
                                    : ToGrpcStatus(status_, ctx_);
    l.unlock();
    Finish(tracker_.Note(st));
  }

  grpc::CallbackServerContext* const ctx_;
  WorkQueue* const queue_;
  CallTracker tracker_;
  std::unique_ptr<FitSession> session_;
  v1::FitCodebookRequest request_;
  std::mutex mu_;
  v1::FitCodebookResponse out_, final_;
  std::optional<v1::FitCodebookResponse> pending_;
  bool writing_ = false, broken_ = false, fit_done_ = false, final_sent_ = false;
  absl::Status status_;
};

}  // namespace

const char* RpcCounters::MethodName(int method) {
  static const char* kNames[kMethods] = {"RegisterModel", "UploadCodebook", "FitCodebook",
                                         "PutBlocks",     "GetBlocks",      "Lookup",
                                         "DeleteBlocks",  "GetStats"};
  return method >= 0 && method < kMethods ? kNames[method] : "?";
}

GrpcService::GrpcService(ServiceHandler* handler, int worker_threads)
    : handler_(handler), queue_(std::make_unique<WorkQueue>(worker_threads)) {}

GrpcService::~GrpcService() = default;

grpc::ServerUnaryReactor* GrpcService::RegisterModel(grpc::CallbackServerContext* ctx,
                                                     const v1::RegisterModelRequest* request,
                                                     v1::RegisterModelResponse* response) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  CallTracker t(kRegisterModel, &counters_, nullptr);
  r->Finish(t.Note(ToGrpcStatus(handler_->RegisterModel(*request, response), ctx)));
  return r;
}

grpc::ServerReadReactor<v1::UploadCodebookRequest>* GrpcService::UploadCodebook(
    grpc::CallbackServerContext* ctx, v1::UploadCodebookResponse* response) {
  return new UploadCodebookReactor(ctx, handler_, queue_.get(), response, &counters_, &active_);
}

grpc::ServerBidiReactor<v1::FitCodebookRequest, v1::FitCodebookResponse>* GrpcService::FitCodebook(
    grpc::CallbackServerContext* ctx) {
  return new FitCodebookReactor(ctx, handler_, queue_.get(), &counters_, &active_);
}

grpc::ServerReadReactor<v1::PutBlocksRequest>* GrpcService::PutBlocks(
    grpc::CallbackServerContext* ctx, v1::PutBlocksResponse* response) {
  return new PutBlocksReactor(ctx, handler_, queue_.get(), response, &counters_, &active_);
}

grpc::ServerWriteReactor<v1::GetBlocksResponse>* GrpcService::GetBlocks(
    grpc::CallbackServerContext* ctx, const v1::GetBlocksRequest* request) {
  return new GetBlocksReactor(ctx, handler_, queue_.get(), request, &counters_, &active_);
}

grpc::ServerUnaryReactor* GrpcService::Lookup(grpc::CallbackServerContext* ctx,
                                              const v1::LookupRequest* request,
                                              v1::LookupResponse* response) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  CallTracker t(kLookup, &counters_, nullptr);
  r->Finish(t.Note(ToGrpcStatus(handler_->Lookup(*request, response), ctx)));
  return r;
}

grpc::ServerUnaryReactor* GrpcService::DeleteBlocks(grpc::CallbackServerContext* ctx,
                                                    const v1::DeleteBlocksRequest* request,
                                                    v1::DeleteBlocksResponse* response) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  CallTracker t(kDeleteBlocks, &counters_, nullptr);
  r->Finish(t.Note(ToGrpcStatus(handler_->DeleteBlocks(*request, response), ctx)));
  return r;
}

grpc::ServerUnaryReactor* GrpcService::GetStats(grpc::CallbackServerContext* ctx,
                                                const v1::GetStatsRequest* request,
                                                v1::GetStatsResponse* response) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  CallTracker t(kGetStats, &counters_, nullptr);
  r->Finish(t.Note(ToGrpcStatus(handler_->GetStats(*request, response), ctx)));
  return r;
}

}  // namespace vqkv::service
