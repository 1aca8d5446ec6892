#include "kernels/vq_search.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/parallel.h"
#include "common/simd.h"

namespace vqkv::kernels {
namespace {

inline float Dot(const float* a, const float* b, int dim) {
  float s = 0.f;
  for (int d = 0; d < dim; ++d) s += a[d] * b[d];
  return s;
}

// Four rows at a time share each codeword load.
void NearestRange(const float* r, int64_t begin, int64_t end, int dim, const float* table,
                  const float* norms, int size, int32_t* idx, float* dist) {
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    const float* r0 = r + i * dim;
    const float* r1 = r0 + dim;
    const float* r2 = r1 + dim;
    const float* r3 = r2 + dim;
    float best[4] = {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity(),
                     std::numeric_limits<float>::infinity(),
                     std::numeric_limits<float>::infinity()};
    int32_t arg[4] = {0, 0, 0, 0};
    for (int j = 0; j < size; ++j) {
      const float* c = table + int64_t{j} * dim;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int d = 0; d < dim; ++d) {
        const float cd = c[d];
        s0 += r0[d] * cd;
        s1 += r1[d] * cd;
        s2 += r2[d] * cd;
        s3 += r3[d] * cd;
      }
      const float n = norms[j];
      const float d0 = n - 2 * s0, d1 = n - 2 * s1, d2 = n - 2 * s2, d3 = n - 2 * s3;
      if (d0 < best[0]) {
        best[0] = d0;
        arg[0] = j;
      }
      if (d1 < best[1]) {
        best[1] = d1;
        arg[1] = j;
      }
      if (d2 < best[2]) {
        best[2] = d2;
        arg[2] = j;
      }
      if (d3 < best[3]) {
        best[3] = d3;
        arg[3] = j;
      }
    }
    for (int k = 0; k < 4; ++k) {
      idx[i + k] = arg[k];
      if (dist) {
        const float* rk = r + (i + k) * dim;
        dist[i + k] = std::max(0.f, best[k] + Dot(rk, rk, dim));
      }
    }
  }
  for (; i < end; ++i) {
    const float* ri = r + i * dim;
    float best = std::numeric_limits<float>::infinity();
    int32_t arg = 0;
    for (int j = 0; j < size; ++j) {
      const float d = norms[j] - 2 * Dot(ri, table + int64_t{j} * dim, dim);
      if (d < best) {
        best = d;
        arg = j;
      }
    }
    idx[i] = arg;
    if (dist) dist[i] = std::max(0.f, best + Dot(ri, ri, dim));
  }
}

// Codewords per tile of the transposed search: 3 vectors of 8.
constexpr int kCodeTile = 24;

// Nearest codeword of R rows using the table transposed to [dim][ldc] (zero padded) and norms
// padded with +inf to ldc: each step broadcasts one residual value against 24 codewords, so
// 4 rows x 3 vectors of accumulators plus 3 loads and a broadcast fill AVX2's 16 registers and
// no horizontal sums are needed. Per lane, strict < keeps the lowest index among equal
// distances; the final lane reduction does the same.
template <int R>
void NearestTileRows(const float* const* rows, int dim, const float* table_t, const float* norms,
                     int64_t ldc, int32_t* idx, float* best_out) {
  using simd::I8;
  using simd::V8;
  V8 best[R];
  I8 arg[R];
  for (int r = 0; r < R; ++r) {
    best[r] = V8{} + std::numeric_limits<float>::infinity();
    arg[r] = I8{};
  }
  const I8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t j0 = 0; j0 < ldc; j0 += kCodeTile) {
    V8 acc[R][3] = {};
    for (int d = 0; d < dim; ++d) {
      const float* ct = table_t + d * ldc + j0;
      const V8 c0 = simd::Load8(ct), c1 = simd::Load8(ct + 8), c2 = simd::Load8(ct + 16);
      for (int r = 0; r < R; ++r) {
        const float rv = rows[r][d];
        acc[r][0] += rv * c0;
        acc[r][1] += rv * c1;
        acc[r][2] += rv * c2;
      }
    }
    for (int c = 0; c < 3; ++c) {
      const V8 n = simd::Load8(norms + j0 + 8 * c);
      const I8 j = lane + static_cast<int32_t>(j0 + 8 * c);
      for (int r = 0; r < R; ++r) {
        const V8 dv = n - 2.0f * acc[r][c];
        const I8 better = dv < best[r];
        best[r] = simd::Select(better, dv, best[r]);
        arg[r] = simd::Select(better, j, arg[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float b = best[r][0];
    int32_t a = arg[r][0];
    for (int l = 1; l < 8; ++l) {
      if (best[r][l] < b || (best[r][l] == b && arg[r][l] < a)) {
        b = best[r][l];
        a = arg[r][l];
      }
    }
    idx[r] = a;
    best_out[r] = b;
  }
}

void NearestRangeTransposed(const float* r, int64_t begin, int64_t end, int dim,
                            const float* table_t, const float* norms, int64_t ldc, int32_t* idx,
                            float* dist) {
  auto run = [&](int64_t i, auto rn) {
    constexpr int R = decltype(rn)::value;
    const float* rows[R];
    for (int k = 0; k < R; ++k) rows[k] = r + (i + k) * dim;
    float best[R];
    NearestTileRows<R>(rows, dim, table_t, norms, ldc, idx + i, best);
    if (dist) {
      for (int k = 0; k < R; ++k) dist[i + k] = std::max(0.f, best[k] + Dot(rows[k], rows[k], dim));
    }
  };
  simd::ForRowGroups(begin, end, run);
}

}  // namespace

void NearestCodewords(const float* r, int64_t n, int dim, const float* table, const float* norms,
                      int size, int32_t* idx, float* dist, bool parallel) {
  if (n < 8) {  // too few rows to pay for the transpose
    NearestRange(r, 0, n, dim, table, norms, size, idx, dist);
    return;
  }
  const int64_t ldc = (int64_t{size} + kCodeTile - 1) / kCodeTile * kCodeTile;
  std::vector<float> table_t(static_cast<size_t>(dim) * ldc, 0.0f);
  std::vector<float> norms_pad(ldc, std::numeric_limits<float>::infinity());
  for (int j = 0; j < size; ++j) {
    for (int d = 0; d < dim; ++d) table_t[d * ldc + j] = table[int64_t{j} * dim + d];
    norms_pad[j] = norms[j];
  }
  if (!parallel) {
    NearestRangeTransposed(r, 0, n, dim, table_t.data(), norms_pad.data(), ldc, idx, dist);
    return;
  }
  // Aim for chunks of at least ~4 MFLOP so thread start-up stays negligible.
  const int64_t per_row = int64_t{size} * dim * 2;
  const int64_t min_chunk =
      std::max<int64_t>(4, (int64_t{4} << 20) / std::max<int64_t>(1, per_row));
  ParallelFor(n, min_chunk, [&](int64_t b, int64_t e) {
    NearestRangeTransposed(r, b, e, dim, table_t.data(), norms_pad.data(), ldc, idx, dist);
  });
}

float EncodeVector(const float* x, int dim, const std::vector<const float*>& tables,
                   const std::vector<const float*>& norms, const std::vector<int>& sizes, int beam,
                   int32_t* codes) {
  const int stages = static_cast<int>(tables.size());
  // Greedy path.
  std::vector<float> r(x, x + dim);
  for (int i = 0; i < stages; ++i) {
    float d;
    NearestRange(r.data(), 0, 1, dim, tables[i], norms[i], sizes[i], codes + i, &d);
    const float* c = tables[i] + int64_t{codes[i]} * dim;
    for (int k = 0; k < dim; ++k) r[k] -= c[k];
  }
  float greedy_err = Dot(r.data(), r.data(), dim);
  if (beam <= 1 || stages == 0) return greedy_err;

  struct Hyp {
    std::vector<float> r;
    std::vector<int32_t> codes;
    float err;
  };
  std::vector<Hyp> beams{{std::vector<float>(x, x + dim), {}, Dot(x, x, dim)}};
  struct Cand {
    float err;
    int b;
    int32_t j;
  };
  std::vector<Cand> cands;
  for (int i = 0; i < stages; ++i) {
    cands.clear();
    for (int b = 0; b < int(beams.size()); ++b) {
      const Hyp& h = beams[b];
      for (int j = 0; j < sizes[i]; ++j) {
        const float e =
            h.err + norms[i][j] - 2 * Dot(h.r.data(), tables[i] + int64_t{j} * dim, dim);
        cands.push_back({e, b, j});
      }
    }
    const size_t keep = std::min<size_t>(beam, cands.size());
    std::partial_sort(
        cands.begin(), cands.begin() + keep, cands.end(), [](const Cand& a, const Cand& b) {
          return a.err < b.err || (a.err == b.err && (a.b < b.b || (a.b == b.b && a.j < b.j)));
        });
    std::vector<Hyp> next;
    for (size_t k = 0; k < keep; ++k) {
      Hyp h = beams[cands[k].b];
      const float* c = tables[i] + int64_t{cands[k].j} * dim;
      for (int d = 0; d < dim; ++d) h.r[d] -= c[d];
      h.codes.push_back(cands[k].j);
      h.err = Dot(h.r.data(), h.r.data(), dim);  // exact, avoids drift of the running estimate
      next.push_back(std::move(h));
    }
    beams = std::move(next);
  }
  const Hyp& best = *std::min_element(beams.begin(), beams.end(),
                                      [](const Hyp& a, const Hyp& b) { return a.err < b.err; });
  if (best.err < greedy_err) {
    std::copy(best.codes.begin(), best.codes.end(), codes);
    return best.err;
  }
  return greedy_err;
}

}  // namespace vqkv::kernels
