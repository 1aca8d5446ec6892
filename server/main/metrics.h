// Prometheus metrics of vqkvd: a collectable that reads GetStats at scrape time, so the numbers
// are exactly those of the GetStats rpc (no second set of counters to drift).
// Thread-safety: Collect is thread-safe (the handler is).
#pragma once

#include <memory>

#include "prometheus/collectable.h"
#include "server/service/grpc_service.h"
#include "server/service/handler.h"

namespace vqkv::vqkvd {

// `handler` and `rpcs` (may be null) must outlive the collectable's registration.
std::shared_ptr<prometheus::Collectable> NewStatsCollectable(service::ServiceHandler* handler,
                                                             const service::RpcCounters* rpcs);

}  // namespace vqkv::vqkvd
