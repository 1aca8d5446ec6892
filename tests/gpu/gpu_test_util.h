// Helpers for the GPU tests: device detection (tests skip without one), device buffers with
// sentinel guard bands on both sides (poisoned before each run, checked after), NMSE and random
// codebooks.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/codebook.h"
#include "kernels/cuda/cuda_status.h"

namespace vqkv::kernels::cuda::gputest {

#define VQKV_REQUIRE_GPU()                               \
  do {                                                   \
    if (!::vqkv::kernels::cuda::CudaDeviceAvailable()) { \
      GTEST_SKIP() << "no CUDA device";                  \
    }                                                    \
  } while (0)

#define VQKV_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// Device bytes with `guard` bytes of sentinel on each side. The body is poisoned with `poison`
// (0xFF: fp16/bf16/fp32 NaN patterns) so unwritten outputs are caught.
class GuardedBuffer {
 public:
  static constexpr uint8_t kSentinel = 0xA5;
  explicit GuardedBuffer(size_t bytes, size_t guard = 4096) : bytes_(bytes), guard_(guard) {
    if (cudaMalloc(&base_, bytes_ + 2 * guard_) != cudaSuccess) base_ = nullptr;
    Poison(0xFF);
  }
  ~GuardedBuffer() {
    if (base_ != nullptr) (void)cudaFree(base_);
  }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;

  bool ok() const { return base_ != nullptr; }
  void* get() const { return static_cast<uint8_t*>(base_) + guard_; }
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(get());
  }
  size_t bytes() const { return bytes_; }

  void Poison(uint8_t body) {
    if (base_ == nullptr) return;
    (void)cudaMemset(base_, kSentinel, guard_);
    (void)cudaMemset(static_cast<uint8_t*>(base_) + guard_, body, bytes_);
    (void)cudaMemset(static_cast<uint8_t*>(base_) + guard_ + bytes_, kSentinel, guard_);
  }
  void Upload(const void* src, size_t n) {
    (void)cudaMemcpy(get(), src, n, cudaMemcpyHostToDevice);
  }
  template <typename T>
  std::vector<T> Download() const {
    std::vector<T> v(bytes_ / sizeof(T));
    (void)cudaMemcpy(v.data(), get(), v.size() * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  // Number of guard bytes that changed.
  size_t GuardDamage() const {
    std::vector<uint8_t> g(guard_);
    size_t bad = 0;
    for (int side = 0; side < 2; ++side) {
      const uint8_t* p = static_cast<uint8_t*>(base_) + (side == 0 ? 0 : guard_ + bytes_);
      (void)cudaMemcpy(g.data(), p, guard_, cudaMemcpyDeviceToHost);
      for (uint8_t b : g) bad += b != kSentinel;
    }
    return bad;
  }

 private:
  void* base_ = nullptr;
  size_t bytes_, guard_;
};

inline double Nmse(const float* ref, const float* got, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = double(ref[i]) - got[i];
    num += std::isfinite(d) ? d * d : 1e300;
    den += double(ref[i]) * ref[i];
  }
  return den > 0 ? num / den : num;
}

// A random codebook whose stage s has codewords ~ N(0, scale_s^2) with geometric decay, the
// first stage centred like the test data. Not fitted, but with the statistics of one: every
// stage reduces the residual somewhat.
inline Codebook RandomCodebook(const RvqConfig& cfg, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  const int heads = cfg.per_head ? cfg.kv_heads : 1;
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < cfg.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const StageConfig& s = cfg.at(l, c);
      for (int h = 0; h < heads; ++h) {
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
  }
  auto cb = Codebook::Create(cfg, std::move(tables));
  return *std::move(cb);
}

}  // namespace vqkv::kernels::cuda::gputest
