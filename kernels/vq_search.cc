#include "kernels/vq_search.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "common/parallel.h"

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

}  // namespace

void NearestCodewords(const float* r, int64_t n, int dim, const float* table, const float* norms,
                      int size, int32_t* idx, float* dist, bool parallel) {
  if (!parallel) {
    NearestRange(r, 0, n, dim, table, norms, size, idx, dist);
    return;
  }
  // Aim for chunks of at least ~4 MFLOP so thread start-up stays negligible.
  const int64_t per_row = int64_t{size} * dim * 2;
  const int64_t min_chunk =
      std::max<int64_t>(4, (int64_t{4} << 20) / std::max<int64_t>(1, per_row));
  ParallelFor(n, min_chunk, [&](int64_t b, int64_t e) {
    NearestRange(r, b, e, dim, table, norms, size, idx, dist);
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
