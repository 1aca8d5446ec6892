// Nearest-codeword search, the inner loop of RVQ encoding and k-means fitting (CPU reference).
// Distances use ||r - c||^2 = ||r||^2 + ||c||^2 - 2 r.c; ties go to the lower index.
// Thread-safety: pure functions; NearestCodewords parallelises internally over vectors.
#pragma once

#include <cstdint>
#include <vector>

namespace vqkv::kernels {

// For each of the n rows of `r` ([n, dim]) writes the index of the nearest row of `table`
// ([size, dim], squared norms `norms`) to idx[i], and, if `dist` is non-null, the squared
// distance to dist[i].
void NearestCodewords(const float* r, int64_t n, int dim, const float* table, const float* norms,
                      int size, int32_t* idx, float* dist, bool parallel = true);

// Residual VQ of one vector through `stages` tables (tables[i]: [size_i, dim], norms[i]).
// Greedy when beam <= 1; otherwise beam search of width `beam`, whose result is never worse
// than greedy (the greedy path is kept as a candidate). Writes codes[stages]; returns the final
// squared error.
float EncodeVector(const float* x, int dim, const std::vector<const float*>& tables,
                   const std::vector<const float*>& norms, const std::vector<int>& sizes, int beam,
                   int32_t* codes);

// EncodeVector for the n rows of x ([n, dim]) at once, writing codes[n, stages]: greedy codes
// from the tiled search, then (beam > 1) a beam search whose candidates are scored with the
// same tiled kernel, eight vectors' hypotheses per tile pass; a row keeps its beam result only
// where that is better than greedy. Parallel over vectors. Results equal EncodeVector's except
// where rounding of the distance sums reorders near-equal candidates.
void EncodeVectorsBeam(const float* x, int64_t n, int dim, const std::vector<const float*>& tables,
                       const std::vector<const float*>& norms, const std::vector<int>& sizes,
                       int beam, int32_t* codes);

}  // namespace vqkv::kernels
