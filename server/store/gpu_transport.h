// Device-to-device copies between the GPUs one vqkvd manages (the GPU tiers' CopyFrom): peer
// copies (cudaMemcpyPeerAsync over NVLink or PCIe where peer access works), NCCL send/recv over
// one communicator made for the daemon's devices at start, or copies staged through pinned
// host memory. Built only with CUDA (target vqkv::store_gpu); NCCL only with VQKV_NCCL=ON, and
// then loaded at run time (dlopen of libnccl.so.2), so a binary built with NCCL still runs, on
// peer copies, where the library is missing. This header includes no CUDA header.
//
// Nothing waits past a deadline: every copy polls its streams until it is done or the
// deadline (or the transport's timeout) passes. An NCCL error or timeout aborts the
// communicator (ncclCommAbort) and turns NCCL off for the life of the transport; later copies
// take the peer or host path. NCCL_NVLS_ENABLE is set to 0 (NVLink multicast off) before the
// communicator is made.
//
// Thread-safety: thread-safe; copies are serialised (one at a time: they are bandwidth-bound).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace vqkv::store {

enum class GpuTransferPath : uint8_t { kPeer = 0, kNccl = 1, kHost = 2 };
// "peer", "nccl", "host".
const char* GpuTransferPathName(GpuTransferPath path);

struct GpuTransportOptions {
  // The devices copies run between (distinct, at least one).
  std::vector<int> devices;
  // "auto": peer copies between devices with peer access, NCCL for the other pairs (the
  // communicator is made only when some pair lacks peer access), host staging without either.
  // "peer": peer copies, host staging where peer access is missing. "nccl": NCCL for every
  // pair (communicator required). "host": host staging only.
  std::string mode = "auto";
  // Longest wait of one copy (and of the communicator's set-up) when the caller's deadline is
  // later.
  absl::Duration timeout = absl::Seconds(10);
  // Pinned staging buffer of the host path.
  int64_t staging_bytes = int64_t{16} << 20;
};

struct GpuTransferCounters {
  int64_t copies = 0, bytes = 0, failures = 0;
  double seconds = 0;  // wall time of the successful copies
};

class GpuTransport {
 public:
  // InvalidArgument for a bad mode or device list (a device out of range, repeated);
  // Unavailable without a usable device; FailedPrecondition for mode "nccl" when the build has
  // no NCCL, libnccl.so.2 cannot be loaded, or the communicator cannot be made in time. In mode
  // "auto" an NCCL that cannot be used is not an error (see nccl_status()).
  static absl::StatusOr<std::shared_ptr<GpuTransport>> Create(const GpuTransportOptions& options);
  ~GpuTransport();
  GpuTransport(const GpuTransport&) = delete;
  GpuTransport& operator=(const GpuTransport&) = delete;

  // Copies `bytes` bytes from device memory `src` on `src_device` to device memory `dst` on
  // `dst_device` and waits for them, at most until min(deadline, now + timeout). Takes the
  // pair's path; when it fails (other than by time), the next one (NCCL -> peer -> host).
  // `used`, when given, receives the path that completed the copy. Errors: InvalidArgument for
  // a device the transport does not manage or a negative size; Unavailable when a device was
  // marked failed or every path failed; DeadlineExceeded when the copy did not finish in time:
  // then the copy may still be running, and the destination range must not be reused.
  absl::Status Copy(int dst_device, void* dst, int src_device, const void* src, int64_t bytes,
                    absl::Time deadline, GpuTransferPath* used = nullptr);

  // The path a copy from `src_device` to `dst_device` takes first.
  GpuTransferPath PathFor(int src_device, int dst_device) const;
  // Makes every copy take `path` first (nullopt: back to the mode's choice). For benchmarks and
  // tests. FailedPrecondition when the path cannot be used (no communicator; no peer access
  // between some pair).
  absl::Status ForcePath(std::optional<GpuTransferPath> path);

  // Takes a device out of service: copies from or to it, and the GPU tier's reads and writes
  // on it, answer Unavailable (its blocks read as misses). For a device that failed or is being
  // drained; tests use it to fail one rank.
  void MarkFailed(int device);
  bool Failed(int device) const;

  // Aborts the NCCL communicator now (as after an NCCL error): later copies take the peer or
  // host path. No-op without one.
  void AbortNccl(const std::string& why);
  // Whether copies can use NCCL now, and a line saying why or why not.
  bool nccl_active() const;
  std::string nccl_status() const;

  const std::vector<int>& devices() const;
  GpuTransferCounters Counters(GpuTransferPath path) const;
  // For the start-up log: the devices, the path of each pair, NCCL's state.
  std::string Describe() const;

 private:
  struct Impl;
  explicit GpuTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vqkv::store
