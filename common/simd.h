// Eight-float vectors (GCC/Clang vector extensions) for the CPU hot loops: the compiler maps
// them to AVX2 registers under -march=x86-64-v3 and to pairs of SSE registers otherwise, so
// no intrinsics (and no per-target code) are needed.
// Thread-safety: pure inline functions.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace vqkv::simd {

using V8 = float __attribute__((vector_size(32)));
using I8 = int32_t __attribute__((vector_size(32)));

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store8(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }

// Sum of the lanes in a fixed order.
inline float Sum8(V8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// mask ? a : b, lane by lane (mask lanes are all ones or zero, as comparisons produce).
inline V8 Select(I8 mask, V8 a, V8 b) {
  I8 ai, bi;
  std::memcpy(&ai, &a, sizeof(ai));
  std::memcpy(&bi, &b, sizeof(bi));
  const I8 r = (ai & mask) | (bi & ~mask);
  V8 o;
  std::memcpy(&o, &r, sizeof(o));
  return o;
}
inline I8 Select(I8 mask, I8 a, I8 b) { return (a & mask) | (b & ~mask); }

// exp(x) lane by lane for x <= ~88 (Cephes expf: x = n ln2 + r, degree-6 polynomial in r,
// scaled by 2^n through the exponent bits); relative error ~2 ulp; 0 at and below -87.
inline V8 Exp8(V8 x) {
  const V8 lo = V8{} - 87.0f;
  x = Select(x < lo, lo, x);
  const V8 round = V8{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V8 n = (x * 1.44269504088896341f + round) - round;
  const V8 r = x - n * 0.693359375f - n * -2.12194440e-4f;
  V8 y = V8{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const I8 e = (__builtin_convertvector(n, I8) + 127) << 23;
  V8 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return Select(x <= lo, V8{}, y * scale);
}

// Register-tiled kernels handle up to 4 rows at once with the row count as a template
// parameter: calls f(first_row, std::integral_constant<int, R>()) over [begin, end) in groups
// of 4, then once with the 1..3 rows left.
template <typename F>
void ForRowGroups(int64_t begin, int64_t end, F&& f) {
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) f(r, std::integral_constant<int, 4>());
  switch (end - r) {
    case 3:
      f(r, std::integral_constant<int, 3>());
      break;
    case 2:
      f(r, std::integral_constant<int, 2>());
      break;
    case 1:
      f(r, std::integral_constant<int, 1>());
      break;
    default:
      break;
  }
}

}  // namespace vqkv::simd
