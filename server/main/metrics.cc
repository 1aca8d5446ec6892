#include "server/main/metrics.h"

#include <string>
#include <vector>

#include "prometheus/metric_family.h"

namespace vqkv::vqkvd {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

const char* TierLabel(int tier) {
  switch (tier) {
    case vqkv::v1::TIER_GPU:
      return "gpu";
    case vqkv::v1::TIER_HOST:
      return "host";
    case vqkv::v1::TIER_DISK:
      return "disk";
    default:
      return "unknown";
  }
}

class StatsCollectable final : public prometheus::Collectable {
 public:
  StatsCollectable(service::ServiceHandler* handler, const service::RpcCounters* rpcs)
      : handler_(handler), rpcs_(rpcs) {}

  std::vector<MetricFamily> Collect() const override {
    vqkv::v1::GetStatsResponse s;
    if (!handler_->GetStats({}, &s).ok()) return {};
    std::vector<MetricFamily> out;
    auto scalar = [&](const char* name, const char* help, MetricType type, double v) {
      MetricFamily f{name, help, type, {}};
      ClientMetric m;
      (type == MetricType::Counter ? m.counter.value : m.gauge.value) = v;
      f.metric.push_back(m);
      out.push_back(std::move(f));
    };
    scalar("vqkv_blocks", "Stored blocks (all tiers).", MetricType::Gauge, s.blocks());
    scalar("vqkv_stored_bytes", "Encoded bytes of stored blocks.", MetricType::Gauge,
           s.stored_bytes());
    scalar("vqkv_logical_bytes", "Uncompressed bytes of stored blocks.", MetricType::Gauge,
           s.logical_bytes());
    scalar("vqkv_hits_total", "Block reads served.", MetricType::Counter, s.hits());
    scalar("vqkv_misses_total", "Block reads that found nothing.", MetricType::Counter, s.misses());
    scalar("vqkv_evictions_total", "Blocks dropped from the bottom tier.", MetricType::Counter,
           s.evictions());
    scalar("vqkv_corrupt_blocks_total", "Blocks dropped after a CRC32C mismatch.",
           MetricType::Counter, s.corrupt_blocks());
    scalar("vqkv_inflight_bytes", "Bytes held by unfinished calls.", MetricType::Gauge,
           s.inflight_bytes());
    scalar("vqkv_max_inflight_bytes", "Limit of in-flight bytes.", MetricType::Gauge,
           s.max_inflight_bytes());
    scalar("vqkv_busy_rejections_total", "Calls refused for in-flight bytes.", MetricType::Counter,
           s.busy_rejections());
    scalar("vqkv_uptime_seconds", "Seconds since start.", MetricType::Gauge, s.uptime_seconds());

    struct PerTier {
      const char* name;
      const char* help;
      MetricType type;
      int64_t (vqkv::v1::TierStats::*get)() const;
    };
    // Labels: tier, and device for GPU tiers only (host and disk series keep their old labels),
    // so that a daemon with several GPUs reports each device's tier on its own.
    const PerTier per_tier[] = {
        {"vqkv_tier_capacity_bytes", "Tier byte budget.", MetricType::Gauge,
         &vqkv::v1::TierStats::capacity_bytes},
        {"vqkv_tier_used_bytes", "Tier bytes used.", MetricType::Gauge,
         &vqkv::v1::TierStats::used_bytes},
        {"vqkv_tier_blocks", "Blocks in the tier.", MetricType::Gauge,
         &vqkv::v1::TierStats::blocks},
        {"vqkv_tier_hits_total", "Reads served by the tier.", MetricType::Counter,
         &vqkv::v1::TierStats::hits},
        {"vqkv_tier_misses_total", "Reads that passed the tier.", MetricType::Counter,
         &vqkv::v1::TierStats::misses},
        {"vqkv_tier_demotions_total", "Blocks moved down out of the tier.", MetricType::Counter,
         &vqkv::v1::TierStats::demotions},
        {"vqkv_tier_promotions_total", "Blocks moved up into the tier.", MetricType::Counter,
         &vqkv::v1::TierStats::promotions},
        {"vqkv_tier_evictions_total", "Blocks dropped from the tier.", MetricType::Counter,
         &vqkv::v1::TierStats::evictions},
        {"vqkv_tier_transfers_in_total", "Blocks copied in from another GPU's tier.",
         MetricType::Counter, &vqkv::v1::TierStats::transfers_in},
        {"vqkv_tier_transfers_out_total", "Blocks copied out to another GPU's tier.",
         MetricType::Counter, &vqkv::v1::TierStats::transfers_out},
        {"vqkv_tier_transfer_failures_total",
         "Device-to-device copies into the tier that failed (host path or miss instead).",
         MetricType::Counter, &vqkv::v1::TierStats::transfer_failures},
        {"vqkv_tier_unavailable_reads_total",
         "Reads that failed because the tier's device was unavailable (misses).",
         MetricType::Counter, &vqkv::v1::TierStats::unavailable_reads},
    };
    for (const PerTier& p : per_tier) {
      MetricFamily f{p.name, p.help, p.type, {}};
      for (const auto& t : s.tiers()) {
        ClientMetric m;
        m.label.push_back({"tier", TierLabel(t.tier())});
        if (t.has_device()) m.label.push_back({"device", std::to_string(t.device())});
        (p.type == MetricType::Counter ? m.counter.value : m.gauge.value) =
            static_cast<double>((t.*p.get)());
        f.metric.push_back(std::move(m));
      }
      out.push_back(std::move(f));
    }
    MetricFamily mb{"vqkv_model_blocks", "Stored blocks per model.", MetricType::Gauge, {}};
    MetricFamily ms{"vqkv_model_stored_bytes", "Stored bytes per model.", MetricType::Gauge, {}};
    MetricFamily ml{"vqkv_model_logical_bytes", "Logical bytes per model.", MetricType::Gauge, {}};
    for (const auto& m : s.models()) {
      ClientMetric c;
      c.label.push_back({"model", m.model_id()});
      c.gauge.value = static_cast<double>(m.blocks());
      mb.metric.push_back(c);
      c.gauge.value = static_cast<double>(m.stored_bytes());
      ms.metric.push_back(c);
      c.gauge.value = static_cast<double>(m.logical_bytes());
      ml.metric.push_back(c);
    }
    out.push_back(std::move(mb));
    out.push_back(std::move(ms));
    out.push_back(std::move(ml));
    if (rpcs_ != nullptr) AddRpcs(&out);
    return out;
  }

  void AddRpcs(std::vector<MetricFamily>* out) const {
    static const char* kCodeNames[service::RpcCounters::kCodes] = {"OK",
                                                                   "CANCELLED",
                                                                   "UNKNOWN",
                                                                   "INVALID_ARGUMENT",
                                                                   "DEADLINE_EXCEEDED",
                                                                   "NOT_FOUND",
                                                                   "ALREADY_EXISTS",
                                                                   "PERMISSION_DENIED",
                                                                   "RESOURCE_EXHAUSTED",
                                                                   "FAILED_PRECONDITION",
                                                                   "ABORTED",
                                                                   "OUT_OF_RANGE",
                                                                   "UNIMPLEMENTED",
                                                                   "INTERNAL",
                                                                   "UNAVAILABLE",
                                                                   "DATA_LOSS",
                                                                   "UNAUTHENTICATED"};
    MetricFamily calls{
        "vqkv_rpc_total", "Finished calls by method and status code.", MetricType::Counter, {}};
    MetricFamily secs{"vqkv_rpc_seconds_total",
                      "Total time of finished calls by method.",
                      MetricType::Counter,
                      {}};
    for (int m = 0; m < service::RpcCounters::kMethods; ++m) {
      for (int c = 0; c < service::RpcCounters::kCodes; ++c) {
        const int64_t n = rpcs_->calls[m][c].load();
        if (n == 0) continue;
        ClientMetric cm;
        cm.label = {{"method", service::RpcCounters::MethodName(m)}, {"code", kCodeNames[c]}};
        cm.counter.value = static_cast<double>(n);
        calls.metric.push_back(std::move(cm));
      }
      ClientMetric sm;
      sm.label = {{"method", service::RpcCounters::MethodName(m)}};
      sm.counter.value = rpcs_->micros[m].load() / 1e6;
      secs.metric.push_back(std::move(sm));
    }
    out->push_back(std::move(calls));
    out->push_back(std::move(secs));
  }

 private:
  service::ServiceHandler* const handler_;
  const service::RpcCounters* const rpcs_;
};

}  // namespace

std::shared_ptr<prometheus::Collectable> NewStatsCollectable(service::ServiceHandler* handler,
                                                             const service::RpcCounters* rpcs) {
  return std::make_shared<StatsCollectable>(handler, rpcs);
}

}  // namespace vqkv::vqkvd
