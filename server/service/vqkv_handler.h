// The service handler: model registry, codebooks, codecs per model and the block store behind
// the ServiceHandler interface.
// Thread-safety: thread-safe.
#pragma once

#include <memory>
#include <string>

#include "server/service/handler.h"
#include "server/service/service_options.h"
#include "server/store/block_store.h"

namespace vqkv::service {

struct ServiceCore;

class VqkvHandler final : public ServiceHandler {
 public:
  // `store` is not owned and must outlive the handler and every session it creates.
  VqkvHandler(const ServiceOptions& options, store::BlockStore* store);
  ~VqkvHandler() override;

  absl::Status RegisterModel(const v1::RegisterModelRequest& request,
                             v1::RegisterModelResponse* response) override;
  absl::Status Lookup(const v1::LookupRequest& request, v1::LookupResponse* response) override;
  absl::Status DeleteBlocks(const v1::DeleteBlocksRequest& request,
                            v1::DeleteBlocksResponse* response) override;
  absl::Status GetStats(const v1::GetStatsRequest& request,
                        v1::GetStatsResponse* response) override;
  std::unique_ptr<PutSession> StartPut(const CallContext& ctx) override;
  absl::StatusOr<std::unique_ptr<GetSession>> StartGet(const v1::GetBlocksRequest& request,
                                                       const CallContext& ctx) override;
  std::unique_ptr<UploadSession> StartUpload(const CallContext& ctx) override;
  std::unique_ptr<FitSession> StartFit(const CallContext& ctx) override;

  // Loads a codebook file for a registered rvq model (vqkvd's config preloading). Returns its id.
  absl::StatusOr<std::string> LoadCodebookFile(const std::string& model_id, const std::string& path,
                                               bool activate);

 private:
  std::unique_ptr<ServiceCore> core_;
};

}  // namespace vqkv::service
