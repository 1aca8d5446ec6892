// Device-to-device copies: peer copies, NCCL send/recv (loaded at run time), host staging.
// Every wait is a poll with a deadline, so a lost device or a stuck peer costs a timeout and a
// fallback, never a hang.
#include "server/store/gpu_transport.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_status.h"

#ifdef VQKV_HAVE_NCCL
#include <dlfcn.h>
#include <nccl.h>
#endif

namespace vqkv::store {
namespace {

using kernels::cuda::CudaStatus;

// A failed copy is a transfer failure (the caller falls back), never "out of space".
absl::Status CopyError(cudaError_t e, const std::string& op) {
  (void)cudaGetLastError();
  return absl::UnavailableError(CudaStatus(e, op).message());
}

// Polls `stream` until its work is done, it fails, or `deadline` passes.
absl::Status WaitStream(cudaStream_t stream, absl::Time deadline, const std::string& op) {
  absl::Duration pause = absl::Microseconds(2);
  while (true) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return absl::OkStatus();
    if (e != cudaErrorNotReady) return CopyError(e, op);
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(op, ": not finished by the deadline"));
    }
    absl::SleepFor(pause);
    pause = std::min(pause * 2, absl::Microseconds(200));
  }
}

// Makes `device` current for the scope and restores the caller's device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    ok_ = cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceScope() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  bool ok() const { return ok_; }

 private:
  int prev_ = -1;
  bool ok_ = false;
};

#ifdef VQKV_HAVE_NCCL
// The NCCL entry points, resolved from libnccl.so.2 at run time.
struct NcclApi {
  void* lib = nullptr;
  decltype(&ncclGetVersion) GetVersion = nullptr;
  decltype(&ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&ncclCommInitRankConfig) CommInitRankConfig = nullptr;
  decltype(&ncclGroupStart) GroupStart = nullptr;
  decltype(&ncclGroupEnd) GroupEnd = nullptr;
  decltype(&ncclSend) Send = nullptr;
  decltype(&ncclRecv) Recv = nullptr;
  decltype(&ncclCommGetAsyncError) CommGetAsyncError = nullptr;
  decltype(&ncclCommAbort) CommAbort = nullptr;
  decltype(&ncclCommDestroy) CommDestroy = nullptr;
  decltype(&ncclGetErrorString) GetErrorString = nullptr;

  static absl::StatusOr<NcclApi> Load() {
    NcclApi api;
    for (const char* name : {"libnccl.so.2", "libnccl.so"}) {
      api.lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (api.lib != nullptr) break;
    }
    if (api.lib == nullptr) {
      const char* err = dlerror();
      return absl::FailedPreconditionError(
          absl::StrCat("cannot load libnccl.so.2: ", err != nullptr ? err : "not found"));
    }
    bool ok = true;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(api.lib, name));
      ok = ok && fn != nullptr;
    };
    sym(api.GetVersion, "ncclGetVersion");
    sym(api.GetUniqueId, "ncclGetUniqueId");
    sym(api.CommInitRankConfig, "ncclCommInitRankConfig");
    sym(api.GroupStart, "ncclGroupStart");
    sym(api.GroupEnd, "ncclGroupEnd");
    sym(api.Send, "ncclSend");
    sym(api.Recv, "ncclRecv");
    sym(api.CommGetAsyncError, "ncclCommGetAsyncError");
    sym(api.CommAbort, "ncclCommAbort");
    sym(api.CommDestroy, "ncclCommDestroy");
    sym(api.GetErrorString, "ncclGetErrorString");
    if (!ok) {
      dlclose(api.lib);
      return absl::FailedPreconditionError("libnccl.so.2 lacks an entry point vqkv needs");
    }
    return api;
  }
};
#endif

}  // namespace

const char* GpuTransferPathName(GpuTransferPath path) {
  switch (path) {
    case GpuTransferPath::kPeer:
      return "peer";
    case GpuTransferPath::kNccl:
      return "nccl";
    case GpuTransferPath::kHost:
      return "host";
  }
  return "?";
}

struct GpuTransport::Impl {
  GpuTransportOptions options;
  std::vector<int> devices;
  std::vector<cudaStream_t> streams;    // one per device (rank), created on it
  std::vector<std::vector<bool>> peer;  // peer[s][d]: peer access between rank s and rank d
  char* staging = nullptr;              // pinned, options.staging_bytes
  std::unique_ptr<std::atomic<bool>[]> failed;
  std::optional<GpuTransferPath> forced;

  mutable std::mutex mu;  // serialises copies; guards counters and the NCCL state
  std::array<GpuTransferCounters, 3> counters;
  std::string nccl_why = "not built with NCCL (VQKV_NCCL=OFF)";
  bool nccl_on = false;
#ifdef VQKV_HAVE_NCCL
  std::optional<NcclApi> nccl;
  std::vector<ncclComm_t> comms;  // rank r = devices[r]
#endif

  int Rank(int device) const {
    for (size_t r = 0; r < devices.size(); ++r) {
      if (devices[r] == device) return static_cast<int>(r);
    }
    return -1;
  }

  GpuTransferPath Choose(int s, int d) const {
    if (forced.has_value()) return *forced;
    const std::string& m = options.mode;
    if (m == "host") return GpuTransferPath::kHost;
    if (m == "nccl" && nccl_on) return GpuTransferPath::kNccl;
    if (peer[s][d]) return GpuTransferPath::kPeer;
    if (m == "auto" && nccl_on) return GpuTransferPath::kNccl;
    return GpuTransferPath::kHost;
  }

  absl::Status CopyPeer(int s, int d, void* dst, const void* src, size_t n, absl::Time deadline) {
    // Without peer access enabled the driver stages a peer copy through host memory itself;
    // Choose() only picks this path where access is enabled.
    const cudaError_t e = cudaMemcpyPeerAsync(dst, devices[d], src, devices[s], n, streams[d]);
    if (e != cudaSuccess) return CopyError(e, "peer copy");
    return WaitStream(streams[d], deadline, "peer copy");
  }

  absl::Status CopyHost(int s, int d, void* dst, const void* src, size_t n, absl::Time deadline) {
    const size_t piece = static_cast<size_t>(options.staging_bytes);
    for (size_t done = 0; done < n; done += piece) {
      const size_t k = std::min(piece, n - done);
      cudaError_t e = cudaMemcpyAsync(staging, static_cast<const char*>(src) + done, k,
                                      cudaMemcpyDeviceToHost, streams[s]);
      if (e != cudaSuccess) return CopyError(e, "host-staged copy (out)");
      VQKV_RETURN_IF_ERROR(WaitStream(streams[s], deadline, "host-staged copy (out)"));
      e = cudaMemcpyAsync(static_cast<char*>(dst) + done, staging, k, cudaMemcpyHostToDevice,
                          streams[d]);
      if (e != cudaSuccess) return CopyError(e, "host-staged copy (in)");
      VQKV_RETURN_IF_ERROR(WaitStream(streams[d], deadline, "host-staged copy (in)"));
    }
    return absl::OkStatus();
  }

#ifdef VQKV_HAVE_NCCL
  std::string NcclError(ncclResult_t r) const {
    return nccl.has_value() ? nccl->GetErrorString(r) : "nccl";
  }

  // Polls every communicator until none is in progress. Returns the first error, or
  // DeadlineExceeded.
  absl::Status WaitComms(absl::Time deadline, const char* op) {
    absl::Duration pause = absl::Microseconds(2);
    while (true) {
      bool pending = false;
      for (ncclComm_t c : comms) {
        ncclResult_t r = ncclSuccess;
        const ncclResult_t q = nccl->CommGetAsyncError(c, &r);
        if (q != ncclSuccess) r = q;
        if (r == ncclInProgress) {
          pending = true;
        } else if (r != ncclSuccess) {
          return absl::UnavailableError(absl::StrCat(op, ": ", NcclError(r)));
        }
      }
      if (!pending) return absl::OkStatus();
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(op, ": not finished by the deadline"));
      }
      absl::SleepFor(pause);
      pause = std::min(pause * 2, absl::Microseconds(200));
    }
  }

  // Makes one non-blocking communicator rank per device from this thread (a group of
  // ncclCommInitRankConfig calls: what ncclCommInitAll does, but pollable with a timeout).
  absl::Status InitNccl() {
    setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast stays off, whatever the caller set
    absl::StatusOr<NcclApi> api = NcclApi::Load();
    if (!api.ok()) return api.status();
    nccl = *api;
    ncclUniqueId id;
    ncclResult_t r = nccl->GetUniqueId(&id);
    if (r != ncclSuccess) {
      return absl::FailedPreconditionError(absl::StrCat("ncclGetUniqueId: ", NcclError(r)));
    }
    comms.assign(devices.size(), nullptr);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    nccl->GroupStart();
    for (size_t k = 0; k < devices.size(); ++k) {
      DeviceScope scope(devices[k]);
      r = nccl->CommInitRankConfig(&comms[k], static_cast<int>(devices.size()), id,
                                   static_cast<int>(k), &config);
      if (r != ncclSuccess && r != ncclInProgress) break;
    }
    const ncclResult_t g = nccl->GroupEnd();
    if ((r != ncclSuccess && r != ncclInProgress) || (g != ncclSuccess && g != ncclInProgress)) {
      const ncclResult_t bad = r != ncclSuccess && r != ncclInProgress ? r : g;
      Abort();
      return absl::FailedPreconditionError(
          absl::StrCat("NCCL communicator set-up: ", NcclError(bad)));
    }
    if (absl::Status s = WaitComms(absl::Now() + options.timeout, "NCCL communicator set-up");
        !s.ok()) {
      Abort();
      return absl::FailedPreconditionError(s.message());
    }
    nccl_on = true;
    int version = 0;
    nccl->GetVersion(&version);
    nccl_why = absl::StrCat("NCCL ", version, ": one communicator, ", devices.size(),
                            " ranks (NCCL_NVLS_ENABLE=0)");
    return absl::OkStatus();
  }

  void Abort() {
    for (ncclComm_t& c : comms) {
      if (c != nullptr) nccl->CommAbort(c);
      c = nullptr;
    }
    comms.clear();
    nccl_on = false;
  }

  absl::Status CopyNccl(int s, int d, void* dst, const void* src, size_t n, absl::Time deadline) {
    nccl->GroupStart();
    ncclResult_t r1 = nccl->Send(src, n, ncclInt8, d, comms[s], streams[s]);
    ncclResult_t r2 = nccl->Recv(dst, n, ncclInt8, s, comms[d], streams[d]);
    ncclResult_t r3 = nccl->GroupEnd();
    absl::Status st;
    for (ncclResult_t r : {r1, r2, r3}) {
      if (r != ncclSuccess && r != ncclInProgress && st.ok()) {
        st = absl::UnavailableError(absl::StrCat("NCCL send/recv: ", NcclError(r)));
      }
    }
    if (st.ok()) st = WaitComms(deadline, "NCCL send/recv");
    if (st.ok()) st = WaitStream(streams[s], deadline, "NCCL send");
    if (st.ok()) st = WaitStream(streams[d], deadline, "NCCL recv");
    if (st.ok()) return st;
    // An NCCL error or a stuck peer: abort the communicator so its kernels stop, and go on
    // without NCCL. Whether the receive has stopped writing is unknown until the streams drain.
    nccl_why = absl::StrCat("NCCL off after an error: ", st.message());
    Abort();
    const absl::Time grace = std::min(deadline, absl::Now() + absl::Seconds(1));
    if (!WaitStream(streams[d], grace, "NCCL recv after abort").ok()) {
      return absl::DeadlineExceededError(st.message());
    }
    return st;
  }
#endif

  absl::Status Run(GpuTransferPath path, int s, int d, void* dst, const void* src, size_t n,
                   absl::Time deadline) {
    switch (path) {
      case GpuTransferPath::kPeer:
        return CopyPeer(s, d, dst, src, n, deadline);
      case GpuTransferPath::kNccl:
#ifdef VQKV_HAVE_NCCL
        if (nccl_on) return CopyNccl(s, d, dst, src, n, deadline);
#endif
        return absl::UnavailableError("NCCL is off: " + nccl_why);
      case GpuTransferPath::kHost:
        return CopyHost(s, d, dst, src, n, deadline);
    }
    return absl::InternalError("unknown transfer path");
  }
};

GpuTransport::GpuTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

GpuTransport::~GpuTransport() {
  Impl& m = *impl_;
#ifdef VQKV_HAVE_NCCL
  if (m.nccl.has_value()) {
    // Clean teardown: nothing is in flight (copies are synchronous). ncclCommDestroy of a
    // non-blocking communicator returns at once; errors at exit are not worth a hang.
    for (ncclComm_t c : m.comms) {
      if (c != nullptr) m.nccl->CommDestroy(c);
    }
    m.comms.clear();
    dlclose(m.nccl->lib);
  }
#endif
  for (size_t r = 0; r < m.streams.size(); ++r) {
    DeviceScope scope(m.devices[r]);
    if (m.streams[r] != nullptr) (void)cudaStreamDestroy(m.streams[r]);
  }
  if (m.staging != nullptr) (void)cudaFreeHost(m.staging);
}

absl::StatusOr<std::shared_ptr<GpuTransport>> GpuTransport::Create(const GpuTransportOptions& o) {
  const std::string& mode = o.mode;
  if (mode != "auto" && mode != "peer" && mode != "nccl" && mode != "host") {
    return absl::InvalidArgumentError(
        absl::StrCat("gpu transfer mode '", mode, "': expected auto|peer|nccl|host"));
  }
  if (o.devices.empty()) return absl::InvalidArgumentError("gpu transport: no devices");
  if (o.staging_bytes <= 0 || o.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("gpu transport: staging size and timeout must be positive");
  }
  int visible = 0;
  if (cudaGetDeviceCount(&visible) != cudaSuccess || visible == 0) {
    (void)cudaGetLastError();
    return absl::UnavailableError("gpu transport: no usable CUDA device");
  }
  auto m = std::make_unique<Impl>();
  m->options = o;
  m->devices = o.devices;
  for (size_t k = 0; k < o.devices.size(); ++k) {
    const int d = o.devices[k];
    if (d < 0 || d >= visible ||
        std::find(o.devices.begin(), o.devices.begin() + k, d) != o.devices.begin() + k) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gpu transport: device ", d, " is out of range (", visible, " visible) or repeated"));
    }
  }
  const size_t n = o.devices.size();
  m->failed = std::make_unique<std::atomic<bool>[]>(n);
  for (size_t k = 0; k < n; ++k) m->failed[k] = false;
  m->peer.assign(n, std::vector<bool>(n, false));
  m->streams.assign(n, nullptr);
  // The transport owns its streams from here: the destructor releases what was made.
  auto t = std::shared_ptr<GpuTransport>(new GpuTransport(std::move(m)));
  Impl& im = *t->impl_;
  for (size_t a = 0; a < n; ++a) {
    DeviceScope scope(im.devices[a]);
    if (!scope.ok()) return absl::UnavailableError(absl::StrCat("device ", im.devices[a]));
    VQKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&im.streams[a], cudaStreamNonBlocking),
                              "gpu transport: stream");
    for (size_t b = 0; b < n; ++b) {
      if (a == b) {
        im.peer[a][b] = true;
        continue;
      }
      int can = 0;
      if (cudaDeviceCanAccessPeer(&can, im.devices[a], im.devices[b]) != cudaSuccess) can = 0;
      if (can != 0) {
        const cudaError_t e = cudaDeviceEnablePeerAccess(im.devices[b], 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) can = 0;
        (void)cudaGetLastError();
      }
      im.peer[a][b] = can != 0;
    }
  }
  for (size_t a = 0; a < n; ++a) {
    for (size_t b = 0; b < n; ++b) im.peer[a][b] = im.peer[a][b] && im.peer[b][a];
  }
  VQKV_CUDA_RETURN_IF_ERROR(
      cudaHostAlloc(reinterpret_cast<void**>(&im.staging), static_cast<size_t>(o.staging_bytes),
                    cudaHostAllocPortable),
      "gpu transport: pinned staging");
  bool need_nccl = mode == "nccl";
  for (size_t a = 0; a < n && mode == "auto"; ++a) {
    for (size_t b = 0; b < n; ++b) need_nccl = need_nccl || !im.peer[a][b];
  }
  if (need_nccl && n > 1) {
#ifdef VQKV_HAVE_NCCL
    if (absl::Status s = im.InitNccl(); !s.ok()) {
      if (mode == "nccl") return s;
      im.nccl_why = absl::StrCat("NCCL unusable, host staging instead: ", s.message());
    }
#else
    if (mode == "nccl") return absl::FailedPreconditionError(im.nccl_why);
#endif
  } else if (n > 1) {
    im.nccl_why = mode == "auto" ? "not needed: every pair has peer access"
                                 : absl::StrCat("not used in mode ", mode);
  } else {
    im.nccl_why = "one device";
  }
  return t;
}

absl::Status GpuTransport::Copy(int dst_device, void* dst, int src_device, const void* src,
                                int64_t bytes, absl::Time deadline, GpuTransferPath* used) {
  Impl& m = *impl_;
  const int s = m.Rank(src_device), d = m.Rank(dst_device);
  if (s < 0 || d < 0 || bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("gpu transport: copy from device ", src_device,
                                                   " to ", dst_device, " of ", bytes, " bytes"));
  }
  for (int r : {s, d}) {
    if (m.failed[r]) {
      return absl::UnavailableError(
          absl::StrCat("gpu transport: device ", m.devices[r], " is out of service"));
    }
  }
  const absl::Time until = std::min(deadline, absl::Now() + m.options.timeout);
  std::lock_guard<std::mutex> lock(m.mu);
  std::vector<GpuTransferPath> order = {m.Choose(s, d)};
  for (GpuTransferPath p : {GpuTransferPath::kPeer, GpuTransferPath::kHost}) {
    if (p != order[0] && (p != GpuTransferPath::kPeer || m.peer[s][d])) order.push_back(p);
  }
  absl::Status st;
  for (GpuTransferPath p : order) {
    if (bytes == 0) {
      if (used != nullptr) *used = p;
      return absl::OkStatus();
    }
    const absl::Time start = absl::Now();
    st = m.Run(p, s, d, dst, src, static_cast<size_t>(bytes), until);
    GpuTransferCounters& c = m.counters[static_cast<int>(p)];
    if (st.ok()) {
      ++c.copies;
      c.bytes += bytes;
      c.seconds += absl::ToDoubleSeconds(absl::Now() - start);
      if (used != nullptr) *used = p;
      return st;
    }
    ++c.failures;
    // A copy that may still be running cannot be retried into the same range.
    if (absl::IsDeadlineExceeded(st)) return st;
  }
  return absl::UnavailableError(absl::StrCat("gpu transport: copy from device ", src_device, " to ",
                                             dst_device, " failed: ", st.message()));
}

GpuTransferPath GpuTransport::PathFor(int src_device, int dst_device) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const int s = impl_->Rank(src_device), d = impl_->Rank(dst_device);
  if (s < 0 || d < 0) return GpuTransferPath::kHost;
  return impl_->Choose(s, d);
}

absl::Status GpuTransport::ForcePath(std::optional<GpuTransferPath> path) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  if (path == GpuTransferPath::kNccl && !m.nccl_on) {
    return absl::FailedPreconditionError("NCCL is off: " + m.nccl_why);
  }
  if (path == GpuTransferPath::kPeer) {
    for (const auto& row : m.peer) {
      if (std::find(row.begin(), row.end(), false) != row.end()) {
        return absl::FailedPreconditionError("some pair of devices has no peer access");
      }
    }
  }
  m.forced = path;
  return absl::OkStatus();
}

void GpuTransport::MarkFailed(int device) {
  const int r = impl_->Rank(device);
  if (r >= 0) impl_->failed[r] = true;
}

bool GpuTransport::Failed(int device) const {
  const int r = impl_->Rank(device);
  return r >= 0 && impl_->failed[r];
}

void GpuTransport::AbortNccl(const std::string& why) {
  std::lock_guard<std::mutex> lock(impl_->mu);
#ifdef VQKV_HAVE_NCCL
  if (impl_->nccl_on) {
    impl_->Abort();
    impl_->nccl_why = absl::StrCat("NCCL off: ", why);
  }
#else
  (void)why;
#endif
}

bool GpuTransport::nccl_active() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->nccl_on;
}

std::string GpuTransport::nccl_status() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->nccl_why;
}

const std::vector<int>& GpuTransport::devices() const { return impl_->devices; }

GpuTransferCounters GpuTransport::Counters(GpuTransferPath path) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->counters[static_cast<int>(path)];
}

std::string GpuTransport::Describe() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  std::vector<std::string> pairs;
  for (size_t a = 0; a < m.devices.size(); ++a) {
    for (size_t b = 0; b < m.devices.size(); ++b) {
      if (a == b) continue;
      pairs.push_back(
          absl::StrCat(m.devices[a], "->", m.devices[b], ":",
                       GpuTransferPathName(m.Choose(static_cast<int>(a), static_cast<int>(b)))));
    }
  }
  return absl::StrCat("GPU transfers (mode ", m.options.mode,
                      "): ", pairs.empty() ? "none" : absl::StrJoin(pairs, " "), "; ", m.nccl_why);
}

}  // namespace vqkv::store
