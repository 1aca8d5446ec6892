// vqkvd: builds the tiers and the store, registers configured models, serves vqkv.v1.Vqkv with
// health and reflection, exports metrics, and drains on SIGTERM/SIGINT.
//
// Threads: main thread = setup, then waits for a signal with sigwait (the signals are blocked
// in every thread, so no async handler runs); gRPC's threads run the reactors; the service's
// WorkQueue runs codecs; the prometheus exposer has its own HTTP threads.
#include <csignal>
#include <cstdio>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/dtype.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "prometheus/exposer.h"
#include "server/main/config.h"
#include "server/main/metrics.h"
#include "server/service/grpc_service.h"
#include "server/service/vqkv_handler.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

#ifdef VQKV_HAVE_CUDA
#include "kernels/cuda/cuda_codecs.h"
#include "kernels/cuda/gpu_fit.h"
#include "server/store/gpu_tier.h"
#endif

namespace vqkv::vqkvd {
namespace {

constexpr int kMaxMessageBytes = 64 << 20;  // documented in vqkv.proto

// Whether and how the GPUs are used, decided once at start.
struct GpuSetup {
  bool enabled = false;
  std::vector<int> devices;         // --gpu-devices, or --gpu-device alone
  std::vector<int64_t> tier_bytes;  // per device
  std::string summary;              // for the start-up log: the devices, or why there are none
};

// --gpu=off: nothing CUDA is touched. auto: the GPUs when the build has CUDA and a device is
// visible. on: the same, but no GPU is an error (FailedPrecondition). A bad --gpu-device or
// --gpu-devices is InvalidArgument in both modes.
absl::StatusOr<GpuSetup> DecideGpu(const Config& c) {
  GpuSetup g;
  if (c.gpu == "off") {
    g.summary = "GPU off (--gpu=off)";
    return g;
  }
#ifdef VQKV_HAVE_CUDA
  if (!kernels::cuda::RegisterCudaCodecs() || store::GpuDeviceCount() == 0) {
    if (c.gpu == "on")
      return absl::FailedPreconditionError("--gpu=on but no CUDA device is visible");
    g.summary = "GPU off (no CUDA device visible)";
    return g;
  }
  absl::StatusOr<std::vector<int>> devices = GpuDevices(c, store::GpuDeviceCount());
  if (!devices.ok()) return devices.status();
  std::vector<std::string> lines;
  for (int d : *devices) {
    absl::StatusOr<store::GpuDeviceInfo> info = store::GetGpuDeviceInfo(d);
    if (!info.ok()) return info.status();
    const int64_t bytes =
        c.gpu_tier_bytes > 0 ? c.gpu_tier_bytes : AutoGpuTierBytes(info->free_bytes);
    g.tier_bytes.push_back(bytes);
    lines.push_back(absl::StrCat("GPU ", info->device, " (", info->name, ", sm_", info->cc_major,
                                 info->cc_minor, ", ", info->free_bytes >> 20, " of ",
                                 info->total_bytes >> 20, " MiB free; tier ", bytes, " bytes)"));
  }
  // The first device is the main thread's, so the single-GPU daemon behaves as before.
  if (absl::Status s = store::UseGpuDevice(devices->front()); !s.ok()) return s;
  g.enabled = true;
  g.devices = *std::move(devices);
  g.summary =
      absl::StrCat(absl::StrJoin(lines, ", "), ": codecs rvq -> rvq-cuda, scalar -> scalar-cuda",
                   g.devices.size() > 1 ? " (one instance per device)" : "");
  return g;
#else
  if (c.gpu == "on")
    return absl::FailedPreconditionError("--gpu=on but vqkvd was built without CUDA");
  g.summary = "GPU off (built without CUDA)";
  return g;
#endif
}

// With a GPU: rvq and scalar run as rvq-cuda / scalar-cuda on the chosen device (the payloads
// are the same format, so the model's codec string does not change); raw stays on the CPU.
// With several GPUs, each model gets one instance per device: puts encode and gets decode on
// the device of the blocks.
void UseGpuCodecs(const GpuSetup& g, service::ServiceOptions* opts, int64_t pinned_cache_bytes) {
  if (!g.enabled) return;
#ifdef VQKV_HAVE_CUDA
  auto on_device = [](const kernels::CodecSpec& spec,
                      int device) -> absl::StatusOr<std::unique_ptr<kernels::Codec>> {
    kernels::CodecSpec s = spec;
    if (s.name == "rvq" || s.name == "scalar") {
      // The CUDA codecs bind to the current device of the creating thread (a worker).
      if (absl::Status st = store::UseGpuDevice(device); !st.ok()) return st;
      s.name += "-cuda";
    }
    return kernels::CreateCodec(s);
  };
  const int first = g.devices.front();
  opts->codec_factory = [on_device, first](const kernels::CodecSpec& spec) {
    return on_device(spec, first);
  };
  if (g.devices.size() > 1) {
    opts->gpu_devices = g.devices;
    opts->device_codec_factory = on_device;
  }
  opts->decode_buffers = store::NewPinnedHostAllocator(pinned_cache_bytes);
  // FitCodebook runs the residual k-means on the device (kernels/cuda/gpu_fit.h).
  opts->fit_codebook = [first](const kernels::RvqConfig& cfg, const kernels::KvSamples& samples,
                               const kernels::FitOptions& fo) -> absl::StatusOr<kernels::Codebook> {
    if (absl::Status st = store::UseGpuDevice(first); !st.ok()) return st;
    return kernels::cuda::FitCodebookGpu(cfg, samples, fo);
  };
#else
  (void)opts;
  (void)pinned_cache_bytes;
#endif
}

absl::StatusOr<std::unique_ptr<store::BlockStore>> MakeStore(const Config& c, const GpuSetup& g) {
  store::StoreOptions o;
#ifdef VQKV_HAVE_CUDA
  std::shared_ptr<store::GpuTransport> transport;
  if (g.enabled && g.devices.size() > 1) {
    // Made once for the daemon's GPUs (and its NCCL communicator, when one is needed); the
    // tiers share it, and the last tier to go tears it down.
    store::GpuTransportOptions to;
    to.devices = g.devices;
    to.mode = c.gpu_transfer;
    absl::StatusOr<std::shared_ptr<store::GpuTransport>> t = store::GpuTransport::Create(to);
    if (!t.ok()) return t.status();
    transport = *std::move(t);
    spdlog::info("{}", transport->Describe());
  }
  for (size_t i = 0; g.enabled && i < g.devices.size(); ++i) {
    store::GpuTierOptions go;
    go.device = g.devices[i];
    go.capacity_bytes = g.tier_bytes[i];
    go.transport = transport;
    auto gpu = store::NewGpuTier(go);
    if (!gpu.ok()) return gpu.status();
    o.tiers.push_back(*std::move(gpu));
  }
#else
  (void)g;
#endif
  o.tiers.push_back(store::NewHostTier(c.host_tier_bytes));
  if (!c.disk_dir.empty()) {
    auto disk = store::NewDiskTier(c.disk_dir, c.disk_tier_bytes);
    if (!disk.ok()) return disk.status();
    o.tiers.push_back(*std::move(disk));
  }
  o.high_watermark = c.high_watermark;
  o.low_watermark = c.low_watermark;
  return store::BlockStore::Create(std::move(o));
}

absl::Status Preload(const Config& c, service::VqkvHandler* handler) {
  for (const PreloadModel& m : c.models) {
    v1::RegisterModelRequest req;
    v1::ModelSpec* s = req.mutable_spec();
    s->set_model_id(m.model_id);
    s->set_layers(m.layers);
    s->set_kv_heads(m.kv_heads);
    s->set_head_dim(m.head_dim);
    s->set_block_tokens(m.block_tokens);
    s->set_codec(m.codec);
    absl::StatusOr<DType> dt = ParseDType(m.dtype);
    if (!dt.ok()) return dt.status();
    s->set_dtype(*dt == DType::kF32   ? v1::DTYPE_F32
                 : *dt == DType::kF16 ? v1::DTYPE_F16
                                      : v1::DTYPE_BF16);
    v1::RegisterModelResponse resp;
    if (absl::Status st = handler->RegisterModel(req, &resp); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("model ", m.model_id, ": ", st.message()));
    }
    spdlog::info("registered model {} ({})", m.model_id, resp.codec());
    if (!m.codebook.empty()) {
      absl::StatusOr<std::string> id = handler->LoadCodebookFile(m.model_id, m.codebook, true);
      if (!id.ok()) return id.status();
      spdlog::info("model {}: codebook {} from {}", m.model_id, *id, m.codebook);
    }
  }
  return absl::OkStatus();
}

int Run(int argc, char** argv) {
  // Block the stop signals before any thread starts, so that only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  bool help = false;
  absl::StatusOr<Config> config = ParseConfig(argc, argv, &help);
  if (help) {
    std::fputs(Usage().c_str(), stdout);
    return 0;
  }
  if (!config.ok()) {
    std::fprintf(stderr, "vqkvd: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  auto logger = spdlog::stderr_color_mt("vqkvd");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(config->log_level));

  absl::StatusOr<GpuSetup> gpu = DecideGpu(*config);
  if (!gpu.ok()) {
    spdlog::critical("gpu: {}", std::string(gpu.status().message()));
    return 1;
  }
  spdlog::info("{}", gpu->summary);
  absl::StatusOr<std::unique_ptr<store::BlockStore>> store = MakeStore(*config, *gpu);
  if (!store.ok()) {
    spdlog::critical("store: {}", std::string(store.status().message()));
    return 1;
  }
  service::ServiceOptions opts;
  opts.max_inflight_bytes = config->max_inflight_bytes;
  opts.max_block_bytes = config->max_block_bytes;
  // Decode buffers are bounded by the in-flight budget, so that much pinned memory is kept.
  UseGpuCodecs(*gpu, &opts, config->max_inflight_bytes);
  auto handler = std::make_unique<service::VqkvHandler>(opts, store->get());
  int workers = config->worker_threads;
  if (workers <= 0)
    workers = std::max(4, 2 * static_cast<int>(std::thread::hardware_concurrency()));
  auto grpc_service = std::make_unique<service::GrpcService>(handler.get(), workers);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config->listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.RegisterService(grpc_service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    spdlog::critical("cannot listen on {}", config->listen);
    return 1;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  const std::string kServiceName = "vqkv.v1.Vqkv";
  health->SetServingStatus(false);  // not ready until the models are loaded
  health->SetServingStatus(kServiceName, false);

  if (absl::Status s = Preload(*config, handler.get()); !s.ok()) {
    spdlog::critical("config: {}", std::string(s.message()));
    server->Shutdown();
    return 1;
  }
  const std::string host = config->listen.substr(0, config->listen.rfind(':'));
  std::unique_ptr<prometheus::Exposer> exposer;
  std::shared_ptr<prometheus::Collectable> collectable;
  if (config->metrics_port > 0) {
    try {
      exposer =
          std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", config->metrics_port));
    } catch (const std::exception& e) {
      spdlog::critical("metrics port {}: {}", config->metrics_port, e.what());
      server->Shutdown();
      return 1;
    }
    collectable = NewStatsCollectable(handler.get(), &grpc_service->counters());
    exposer->RegisterCollectable(collectable);
    spdlog::info("metrics on http://{}:{}/metrics", host, config->metrics_port);
  }

  health->SetServingStatus(true);
  health->SetServingStatus(kServiceName, true);
  spdlog::info(
      "{}host tier {} bytes{}; {} workers; max in-flight {} bytes",
      gpu->enabled ? absl::StrCat("gpu tier ", absl::StrJoin(gpu->tier_bytes, "+"),
                                  " bytes on device ", absl::StrJoin(gpu->devices, ","), ", ")
                   : "",
      config->host_tier_bytes,
      config->disk_dir.empty()
          ? std::string()
          : absl::StrCat(", disk tier ", config->disk_tier_bytes, " bytes in ", config->disk_dir),
      workers, config->max_inflight_bytes);
  std::printf("vqkvd listening on %s:%d\n", host.c_str(), port);
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  spdlog::info("signal {}: draining ({} streams in flight)", sig, grpc_service->active_streams());
  health->SetServingStatus(false);
  health->SetServingStatus(kServiceName, false);
  const auto deadline =
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(config->shutdown_grace_seconds * 1000));
  server->Shutdown(deadline);  // stops accepting; waits for in-flight calls up to the deadline
  server->Wait();
  // A call is finished for gRPC once its last message is queued in the transport; a slow reader
  // may not have it yet. Keep the connections up a little so that it arrives.
  spdlog::info("drained; lingering {} s for slow readers", config->shutdown_linger_seconds);
  absl::SleepFor(absl::Seconds(config->shutdown_linger_seconds));
  grpc_service.reset();
  exposer.reset();
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace vqkv::vqkvd

int main(int argc, char** argv) { return vqkv::vqkvd::Run(argc, argv); }
