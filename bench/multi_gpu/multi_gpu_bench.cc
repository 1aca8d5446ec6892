// multi_gpu_bench: cross-device get throughput of the store over two GPU tiers, against the
// peer copy rate measured in the same run (docs/gpu.md "Several GPUs" says how to run it).
//
//   1. Ceilings: one `bytes`-sized cudaMemcpyPeerAsync 1 -> 0 and 0 -> 1 (NVLink or PCIe), timed
//      with events; then the same bytes through GpuTransport on each usable path (peer, nccl,
//      host), timed on the host (what the store sees).
//   2. Cross-device get: LLaMA-3.1-8B geometry blocks (32 layers, 8 KV heads, head_dim 128, 16
//      tokens; paper budget K 56x1024, V 16x512, random codebook) encoded by rvq-cuda on device
//      1 and committed to device 1's tier. Each round leases every block with destination
//      device 0 (the codes move 1 -> 0 device to device, then are read for the decode) and
//      decodes them on device 0 with that device's codec, in batches of --batch blocks; the next
//      round moves them back. Reported: GB/s of codes moved (transport time), GB/s of codes per
//      get (lease time), GB/s of KV reconstructed (fp16 bytes / (lease + decode time)).
//
// Flags: --bytes=1073741824 --blocks=2048 --batch=128 --rounds=4 --path=auto|peer|nccl|host
// Exits 0 with a note when fewer than 2 GPUs are visible.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/cuda/cuda_codecs.h"
#include "server/store/block_store.h"
#include "server/store/gpu_tier.h"
#include "server/store/gpu_transport.h"

namespace vqkv {
namespace {

using store::GpuTransferPath;

struct Flags {
  int64_t bytes = int64_t{1} << 30;
  int blocks = 2048, batch = 128, rounds = 4;
  std::string path = "auto";
};

int64_t Flag(const char* arg, const char* name, int64_t value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) == 0 && arg[n] == '=') {
    int64_t v = 0;
    if (absl::SimpleAtoi(arg + n + 1, &v)) return v;
    std::fprintf(stderr, "bad %s\n", arg);
    std::exit(2);
  }
  return value;
}

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

#define CHECK_CUDA(x)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

#define CHECK_OK(x)                                                            \
  do {                                                                         \
    absl::Status s_ = (x);                                                     \
    if (!s_.ok()) {                                                            \
      std::fprintf(stderr, "%s: %s\n", #x, std::string(s_.message()).c_str()); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

// GB/s of one raw peer copy of `bytes`, from `src` to `dst`, best of 5.
double RawPeer(int dst, int src, int64_t bytes) {
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaSetDevice(src));
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaSetDevice(dst));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreate(&s));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  float best = 1e30f;
  for (int i = 0; i < 6; ++i) {
    CHECK_CUDA(cudaEventRecord(e0, s));
    CHECK_CUDA(cudaMemcpyPeerAsync(b, dst, a, src, bytes, s));
    CHECK_CUDA(cudaEventRecord(e1, s));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i > 0) best = std::min(best, ms);  // the first copy warms the link up
  }
  (void)cudaEventDestroy(e0);
  (void)cudaEventDestroy(e1);
  (void)cudaStreamDestroy(s);
  (void)cudaFree(b);
  CHECK_CUDA(cudaSetDevice(src));
  (void)cudaFree(a);
  return bytes / (best * 1e-3) / 1e9;
}

// GB/s through the transport on `path`, best of 5 (host-timed, as the store waits).
double TransportRate(store::GpuTransport& t, GpuTransferPath path, int64_t bytes) {
  if (!t.ForcePath(path).ok()) return -1;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaSetDevice(1));
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaSetDevice(0));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  double best = 1e30;
  for (int i = 0; i < 6; ++i) {
    GpuTransferPath used;
    auto start = std::chrono::steady_clock::now();
    CHECK_OK(t.Copy(0, b, 1, a, bytes, absl::Now() + absl::Seconds(60), &used));
    if (i > 0) best = std::min(best, Seconds(start));
    if (used != path) return -1;
  }
  CHECK_OK(t.ForcePath(std::nullopt));
  (void)cudaFree(b);
  CHECK_CUDA(cudaSetDevice(1));
  (void)cudaFree(a);
  return bytes / best / 1e9;
}

kernels::Codebook PaperCodebook(const kernels::RvqConfig& cfg) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0, 1);
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < cfg.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const kernels::StageConfig& s = cfg.at(l, c);
      std::vector<float> t(size_t(s.stages) * s.size * cfg.head_dim);
      for (int st = 0; st < s.stages; ++st) {
        const float scale = 1.6f * std::pow(0.82f, float(st));
        for (size_t i = 0; i < size_t(s.size) * cfg.head_dim; ++i) {
          t[size_t(st) * s.size * cfg.head_dim + i] = scale * nd(rng);
        }
      }
      tables.push_back(std::move(t));
    }
  }
  auto cb = kernels::Codebook::Create(cfg, std::move(tables));
  CHECK_OK(cb.status());
  return *std::move(cb);
}

int Run(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    f.bytes = Flag(argv[i], "--bytes", f.bytes);
    f.blocks = static_cast<int>(Flag(argv[i], "--blocks", f.blocks));
    f.batch = static_cast<int>(Flag(argv[i], "--batch", f.batch));
    f.rounds = static_cast<int>(Flag(argv[i], "--rounds", f.rounds));
    if (std::strncmp(argv[i], "--path=", 7) == 0) f.path = argv[i] + 7;
  }
  const int n = store::GpuDeviceCount();
  if (n < 2) {
    std::printf("multi_gpu_bench: needs 2 CUDA devices, %d visible; nothing measured\n", n);
    return 0;
  }
  for (int d = 0; d < 2; ++d) {
    auto info = store::GetGpuDeviceInfo(d);
    CHECK_OK(info.status());
    std::printf("device %d: %s, %lld MiB\n", d, info->name.c_str(),
                static_cast<long long>(info->total_bytes >> 20));
  }

  // 1. Ceilings.
  auto transport = store::GpuTransport::Create({.devices = {0, 1}, .mode = f.path});
  CHECK_OK(transport.status());
  std::printf("%s\n", (*transport)->Describe().c_str());
  auto nccl = store::GpuTransport::Create({.devices = {0, 1}, .mode = "nccl"});
  std::printf("\n| copy of %lld MiB | GB/s |\n| --- | --- |\n",
              static_cast<long long>(f.bytes >> 20));
  std::printf("| cudaMemcpyPeerAsync 1 -> 0 (events) | %.1f |\n", RawPeer(0, 1, f.bytes));
  std::printf("| cudaMemcpyPeerAsync 0 -> 1 (events) | %.1f |\n", RawPeer(1, 0, f.bytes));
  for (GpuTransferPath p : {GpuTransferPath::kPeer, GpuTransferPath::kHost}) {
    const double r = TransportRate(**transport, p, f.bytes);
    if (r > 0) std::printf("| transport %s 1 -> 0 | %.1f |\n", GpuTransferPathName(p), r);
  }
  if (nccl.ok()) {
    std::printf("| transport nccl 1 -> 0 | %.1f |\n",
                TransportRate(**nccl, GpuTransferPath::kNccl, f.bytes));
  } else {
    std::printf("| transport nccl | unavailable: %s |\n",
                std::string(nccl.status().message()).c_str());
  }
  nccl = absl::UnavailableError("released");  // tear the second communicator down now

  // 2. Cross-device get through the store.
  const auto cfg = kernels::RvqConfig::Uniform(32, 8, 128, {56, 1024}, {16, 512});
  auto cb = std::make_shared<const kernels::Codebook>(PaperCodebook(cfg));
  if (!kernels::cuda::RegisterCudaCodecs()) {
    std::fprintf(stderr, "no CUDA codecs\n");
    return 1;
  }
  std::unique_ptr<kernels::Codec> codec[2];
  for (int d = 0; d < 2; ++d) {
    CHECK_CUDA(cudaSetDevice(d));
    auto c = kernels::CreateCodec({.name = "rvq-cuda", .codebook = cb});
    CHECK_OK(c.status());
    codec[d] = *std::move(c);
  }
  const kernels::KvShape shape{32, 16, 8, 128};
  const int64_t logical = shape.elements() * 2;
  // Encode a pool of distinct blocks on device 1; the store keys repeat them.
  const int pool = std::min(f.blocks, 64);
  std::vector<std::string> inputs(pool);
  std::vector<kernels::KvBlockView> views;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 1);
  for (int i = 0; i < pool; ++i) {
    std::vector<float> x(shape.elements());
    for (float& v : x) v = nd(rng);
    inputs[i].resize(logical);
    FromFloat(x.data(), x.size(), DType::kF16, inputs[i].data());
    views.push_back({shape, DType::kF16, inputs[i].data(), int64_t{16} * (i + 1)});
  }
  std::vector<std::string> payloads;
  CHECK_OK(codec[1]->EncodeBatched(views, &payloads));
  const int64_t code_bytes = static_cast<int64_t>(payloads[0].size());
  const int64_t tier_bytes = (code_bytes + 4096) * f.blocks * 5 / 4;
  store::StoreOptions so;
  for (int d = 0; d < 2; ++d) {
    auto tier =
        store::NewGpuTier({.device = d, .capacity_bytes = tier_bytes, .transport = *transport});
    CHECK_OK(tier.status());
    so.tiers.push_back(*std::move(tier));
  }
  so.tiers.push_back(store::NewHostTier(int64_t{1} << 30));
  auto st = store::BlockStore::Create(std::move(so));
  CHECK_OK(st.status());
  store::BlockStore& s = **st;
  std::vector<store::BlockKey> keys;
  for (int i = 0; i < f.blocks; i += f.batch) {
    std::vector<store::NewBlock> batch;
    for (int j = i; j < std::min(f.blocks, i + f.batch); ++j) {
      store::NewBlock b;
      b.key = {"bench", "llama-8b", cb->id(), absl::StrCat("b", j)};
      b.bytes = payloads[j % pool];
      b.meta.logical_bytes = logical;
      b.meta.tokens = 16;
      keys.push_back(b.key);
      batch.push_back(std::move(b));
    }
    CHECK_OK(s.Commit(std::move(batch), 1).status());
  }
  std::vector<void*> outs(f.batch);
  for (void*& p : outs) CHECK_CUDA(cudaMallocHost(&p, logical));
  std::vector<size_t> out_bytes(f.batch, static_cast<size_t>(logical));
  std::printf("\n%d blocks of %lld code bytes (%lld fp16 bytes), batches of %d, path %s\n",
              f.blocks, static_cast<long long>(code_bytes), static_cast<long long>(logical),
              f.batch, GpuTransferPathName((*transport)->PathFor(1, 0)));
  std::printf(
      "| round | to | codes moved GB/s | codes per get GB/s | KV reconstructed GB/s |\n"
      "| --- | --- | --- | --- | --- |\n");
  for (int r = 0; r < f.rounds; ++r) {
    const int to = r % 2 == 0 ? 0 : 1;
    const GpuTransferPath path = (*transport)->PathFor(1 - to, to);
    const store::GpuTransferCounters before = (*transport)->Counters(path);
    double lease_s = 0, decode_s = 0;
    for (int i = 0; i < f.blocks; i += f.batch) {
      const int m = std::min(f.batch, f.blocks - i);
      auto t0 = std::chrono::steady_clock::now();
      auto leases = s.Acquire(absl::MakeConstSpan(keys).subspan(i, m),
                              {.device = to, .deadline = absl::Now() + absl::Seconds(60)});
      lease_s += Seconds(t0);
      std::vector<std::string_view> in;
      for (auto& l : leases) {
        if (!l.has_value() || l->device() != to) {
          std::fprintf(stderr, "block not moved to device %d\n", to);
          return 1;
        }
        in.push_back(l->bytes());
      }
      auto t1 = std::chrono::steady_clock::now();
      CHECK_OK(codec[to]->DecodeBatched(in, DType::kF16, absl::MakeConstSpan(outs).first(m),
                                        absl::MakeConstSpan(out_bytes).first(m)));
      decode_s += Seconds(t1);
    }
    const store::GpuTransferCounters after = (*transport)->Counters(path);
    const double moved = static_cast<double>(after.bytes - before.bytes);
    std::printf("| %d | %d | %.1f | %.1f | %.1f |\n", r, to,
                moved / (after.seconds - before.seconds) / 1e9,
                double(code_bytes) * f.blocks / lease_s / 1e9,
                double(logical) * f.blocks / (lease_s + decode_s) / 1e9);
  }
  const store::StoreStats stats = s.Stats();
  std::printf(
      "transfers: device 0 in %lld out %lld, device 1 in %lld out %lld, failures %lld\n",
      static_cast<long long>(stats.tiers[0].transfers_in),
      static_cast<long long>(stats.tiers[0].transfers_out),
      static_cast<long long>(stats.tiers[1].transfers_in),
      static_cast<long long>(stats.tiers[1].transfers_out),
      static_cast<long long>(stats.tiers[0].transfer_failures + stats.tiers[1].transfer_failures));
  for (void* p : outs) (void)cudaFreeHost(p);
  return 0;
}

}  // namespace
}  // namespace vqkv

int main(int argc, char** argv) { return vqkv::Run(argc, argv); }
