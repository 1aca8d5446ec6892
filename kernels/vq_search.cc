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

// Dot products of R rows with the 24 codewords j0.. of a table transposed to [dim][ldc]: each
// step broadcasts one residual value against 3 vectors of 8 codewords.
template <int R>
inline void DotTile(const float* const* rows, int dim, const float* table_t, int64_t ldc,
                    int64_t j0, simd::V8 (&acc)[R][3]) {
  using simd::V8;
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = V8{};
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
}

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
    simd::V8 acc[R][3];
    DotTile<R>(rows, dim, table_t, ldc, j0, acc);
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

// Scores norm_j - 2 r.c_j of R rows against every codeword of a transposed table (layout as in
// NearestTileRows), written to out[r * ldc + j].
template <int R>
void ScoreTileRows(const float* const* rows, int dim, const float* table_t, const float* norms,
                   int64_t ldc, float* out) {
  using simd::V8;
  for (int64_t j0 = 0; j0 < ldc; j0 += kCodeTile) {
    simd::V8 acc[R][3];
    DotTile<R>(rows, dim, table_t, ldc, j0, acc);
    for (int c = 0; c < 3; ++c) {
      const V8 n = simd::Load8(norms + j0 + 8 * c);
      for (int r = 0; r < R; ++r) simd::Store8(out + r * ldc + j0 + 8 * c, n - 2.0f * acc[r][c]);
    }
  }
}

// A stage table transposed to [dim][ldc] with norms padded by +inf (the tiled kernels' layout).
struct TransposedTable {
  int64_t ldc = 0;
  std::vector<float> t, norms;
  TransposedTable(const float* table, const float* n, int size, int dim)
      : ldc((int64_t{size} + kCodeTile - 1) / kCodeTile * kCodeTile),
        t(static_cast<size_t>(dim) * ldc, 0.0f),
        norms(ldc, std::numeric_limits<float>::infinity()) {
    for (int j = 0; j < size; ++j) {
      for (int d = 0; d < dim; ++d) t[d * ldc + j] = table[int64_t{j} * dim + d];
      norms[j] = n[j];
    }
  }
};

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
  const TransposedTable tt(table, norms, size, dim);
  const int64_t ldc = tt.ldc;
  const float* table_t = tt.t.data();
  const float* norms_pad = tt.norms.data();
  if (!parallel) {
    NearestRangeTransposed(r, 0, n, dim, table_t, norms_pad, ldc, idx, dist);
    return;
  }
  // Aim for chunks of at least ~4 MFLOP so thread start-up stays negligible.
  const int64_t per_row = int64_t{size} * dim * 2;
  const int64_t min_chunk =
      std::max<int64_t>(4, (int64_t{4} << 20) / std::max<int64_t>(1, per_row));
  ParallelFor(n, min_chunk, [&](int64_t b, int64_t e) {
    NearestRangeTransposed(r, b, e, dim, table_t, norms_pad, ldc, idx, dist);
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

void EncodeVectorsBeam(const float* x, int64_t n, int dim, const std::vector<const float*>& tables,
                       const std::vector<const float*>& norms, const std::vector<int>& sizes,
                       int beam, int32_t* codes) {
  const int stages = static_cast<int>(tables.size());
  if (n <= 0 || stages == 0) return;
  std::vector<TransposedTable> tt;
  tt.reserve(stages);
  for (int i = 0; i < stages; ++i) tt.emplace_back(tables[i], norms[i], sizes[i], dim);
  // Greedy codes and errors first: the beam result replaces them only where it is better.
  std::vector<float> r(x, x + n * dim);
  std::vector<int32_t> idx(n);
  for (int i = 0; i < stages; ++i) {
    NearestCodewords(r.data(), n, dim, tables[i], norms[i], sizes[i], idx.data(), nullptr);
    for (int64_t v = 0; v < n; ++v) {
      codes[v * stages + i] = idx[v];
      const float* c = tables[i] + int64_t{idx[v]} * dim;
      float* rv = r.data() + v * dim;
      for (int d = 0; d < dim; ++d) rv[d] -= c[d];
    }
  }
  if (beam <= 1) return;
  constexpr int64_t kChunk = 8;  // vectors searched together
  ParallelFor(n, kChunk, [&](int64_t b0, int64_t b1) {
    for (int64_t v0 = b0; v0 < b1; v0 += kChunk) {
      const int nv = int(std::min<int64_t>(kChunk, b1 - v0));
      // Hypotheses per vector: residual, error, code path; cur/next swap each stage.
      struct Hyps {
        std::vector<float> res, err;
        std::vector<int32_t> path;
        std::vector<int> count;
      };
      Hyps cur, next;
      for (Hyps* h : {&cur, &next}) {
        h->res.assign(size_t(nv) * beam * dim, 0.f);
        h->err.assign(size_t(nv) * beam, 0.f);
        h->path.assign(size_t(nv) * beam * stages, 0);
        h->count.assign(nv, 0);
      }
      for (int v = 0; v < nv; ++v) {
        std::copy(x + (v0 + v) * dim, x + (v0 + v + 1) * dim,
                  cur.res.begin() + size_t(v) * beam * dim);
        cur.err[size_t(v) * beam] = Dot(x + (v0 + v) * dim, x + (v0 + v) * dim, dim);
        cur.count[v] = 1;
      }
      std::vector<float> scores;
      std::vector<const float*> rows;
      std::vector<int> row_of;  // first row of each vector's hypotheses
      struct Cand {
        float e;
        int b;
        int32_t j;
      };
      std::vector<Cand> top(beam);
      for (int i = 0; i < stages; ++i) {
        const TransposedTable& t = tt[i];
        rows.clear();
        row_of.assign(nv, 0);
        for (int v = 0; v < nv; ++v) {
          row_of[v] = int(rows.size());
          for (int b = 0; b < cur.count[v]; ++b)
            rows.push_back(cur.res.data() + (size_t(v) * beam + b) * dim);
        }
        scores.resize(rows.size() * t.ldc);
        simd::ForRowGroups(0, int64_t(rows.size()), [&](int64_t r0, auto rn) {
          constexpr int R = decltype(rn)::value;
          ScoreTileRows<R>(rows.data() + r0, dim, t.t.data(), t.norms.data(), t.ldc,
                           scores.data() + r0 * t.ldc);
        });
        for (int v = 0; v < nv; ++v) {
          // The `beam` smallest err + score, ties to the lower (hypothesis, code): candidates
          // come in that order, so a later one enters only when strictly smaller.
          int kept = 0;
          for (int b = 0; b < cur.count[v]; ++b) {
            const float base = cur.err[size_t(v) * beam + b];
            const float* sc = scores.data() + (row_of[v] + b) * t.ldc;
            for (int j = 0; j < sizes[i]; ++j) {
              const float e = base + sc[j];
              if (kept == beam && !(e < top[beam - 1].e)) continue;
              int k = kept < beam ? kept++ : beam - 1;
              while (k > 0 && e < top[k - 1].e) {
                top[k] = top[k - 1];
                --k;
              }
              top[k] = {e, b, j};
            }
          }
          next.count[v] = kept;
          for (int k = 0; k < kept; ++k) {
            const size_t from = size_t(v) * beam + top[k].b, to = size_t(v) * beam + k;
            const float* pr = cur.res.data() + from * dim;
            float* nr = next.res.data() + to * dim;
            const float* c = tables[i] + int64_t{top[k].j} * dim;
            for (int d = 0; d < dim; ++d) nr[d] = pr[d] - c[d];
            next.err[to] = Dot(nr, nr, dim);  // exact, avoids drift of the running estimate
            std::copy(cur.path.begin() + from * stages, cur.path.begin() + from * stages + i,
                      next.path.begin() + to * stages);
            next.path[to * stages + i] = top[k].j;
          }
        }
        std::swap(cur, next);
      }
      for (int v = 0; v < nv; ++v) {
        int best = 0;
        for (int b = 1; b < cur.count[v]; ++b) {
          if (cur.err[size_t(v) * beam + b] < cur.err[size_t(v) * beam + best]) best = b;
        }
        const float* gr = r.data() + (v0 + v) * dim;
        if (cur.err[size_t(v) * beam + best] < Dot(gr, gr, dim)) {
          std::copy(cur.path.begin() + (size_t(v) * beam + best) * stages,
                    cur.path.begin() + (size_t(v) * beam + best + 1) * stages,
                    codes + (v0 + v) * stages);
        }
      }
    }
  });
}

}  // namespace vqkv::kernels
