// Random KV data for codec tests (normal values with per-channel offsets, as real keys have).
#pragma once

#include <random>
#include <vector>

#include "kernels/kv.h"

namespace vqkv::kernels::testing {

inline std::vector<float> RandomKv(const KvShape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> x(s.elements());
  std::vector<float> offset(s.head_dim);
  for (auto& o : offset) o = 2 * nd(rng);
  for (size_t i = 0; i < x.size(); ++i) x[i] = nd(rng) + offset[i % s.head_dim];
  return x;
}

inline KvSamples SamplesFrom(const KvShape& s, const std::vector<float>& x) {
  KvSamples out;
  out.layers = s.layers;
  out.kv_heads = s.kv_heads;
  out.head_dim = s.head_dim;
  const size_t plane = size_t(s.tokens) * s.kv_heads * s.head_dim;
  for (int l = 0; l < s.layers; ++l) {
    out.k.emplace_back(x.begin() + s.Offset(l, 0, 0, 0), x.begin() + s.Offset(l, 0, 0, 0) + plane);
    out.v.emplace_back(x.begin() + s.Offset(l, 1, 0, 0), x.begin() + s.Offset(l, 1, 0, 0) + plane);
  }
  return out;
}

}  // namespace vqkv::kernels::testing
