// rvq encode kernels: the fused tensor-core kernel (scores, top-2, exact rescore, residual update
// for every stage of a tile without leaving the SM) and an exact fp32 fallback.
//
// Tensor-core kernel, one CTA per tile of BM rows of one table:
//   shared  res   [BM, D + 8] fp32      the rows' residuals, exact (as the CPU keeps them)
//           cbuf  [NBUF, 64, D + 8]     fp16 codeword chunks, cp.async multi-buffered
//           cibuf [NBUF, 64]            -0.5 * scale^2 * ||c||^2 of those codewords
//   Warp (wm, wn) owns rows [wm*MT*16, +MT*16) and half wn of every chunk's columns; its rows'
//   fp16 A fragments (scale * residual) stay in registers for the whole stage. mma.sync
//   m16n8k16 starts from cinit, so the accumulator is the score r.c - |c|^2/2 (argmax = nearest).
//   Each score has its column index written into its low mantissa bits, so fmaxf keeps
//   (score, index) pairs together: a running top-2 costs three min/max per score.
//   After a stage's last chunk the two best candidates of each row are rescored in fp32 against
//   cb32 exactly as the CPU reference does (||c||^2 - 2 r.c, ties to the lower index), the
//   residual is updated in fp32 and the code written. fp16 only decides which two candidates
//   are rescored, so the GPU and CPU codes differ only where the CPU's best codeword was not
//   among the GPU's two best approximate scores (a near-tie at fp16 precision) or where two
//   exact fp32 distances differ by rounding.
#include <cfloat>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

using detail::CpAsync16;
using detail::CpAsyncCommit;
using detail::CpAsyncWait;
using detail::Ldmatrix4;
using detail::LoadElem;
using detail::Mma16816;
using detail::PackHalf2;
using detail::WarpSum;

template <int D>
struct Cfg {
  static constexpr int kMT = D <= 128 ? 4 : 2;  // m16 tiles per warp (A fragments: MT*D/4 regs)
  static constexpr int kWM = 4;                 // warps along rows
  static constexpr int kWN = 2;                 // warps along a chunk's columns
  static constexpr int kBM = kWM * kMT * 16;    // rows per tile
  static constexpr int kBN = kRvqChunk;         // codewords per chunk
  static constexpr int kNBUF = D <= 128 ? 3 : 2;
  static constexpr int kThreads = kWM * kWN * 32;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kKS = D / 16;              // k16 steps
  static constexpr int kNT = kBN / kWN / 8;       // n8 tiles per warp per chunk
  static constexpr int kRS = D + 8;               // floats per residual row (bank spread)
  static constexpr int kCS = D + 8;               // halves per codeword row (ldmatrix conflict-free)
  static constexpr int kEPL = D / 32;             // elements per lane in the rescore phase
  static constexpr int kR = 4;                    // rows rescored together per warp
  static_assert(D % 32 == 0 && kKS % 2 == 0, "head_dim must be a multiple of 32");

  static constexpr size_t kResBytes = size_t(kBM) * kRS * 4;
  static constexpr size_t kCbufBytes = size_t(kNBUF) * kBN * kCS * 2;
  static constexpr size_t kCiBytes = size_t(kNBUF) * kBN * 4;
  static constexpr size_t kCandBytes = size_t(kBM) * kWN * 2 * 4;
  static constexpr size_t kRowBytes = size_t(kBM) * (8 + 8);  // code base + (segment, row)
  static constexpr size_t kSmem = kResBytes + kCbufBytes + kCiBytes + kCandBytes + kRowBytes;
};

__device__ __forceinline__ void Top2(float& t1, float& t2, float v) {
  const float hi = fmaxf(t1, v);
  const float lo = fminf(t1, v);
  t1 = hi;
  t2 = fmaxf(t2, lo);
}

__device__ __forceinline__ void Top2Merge(float& t1, float& t2, float o1, float o2) {
  const float hi = fmaxf(t1, o1);
  const float lo = fminf(t1, o1);
  t1 = hi;
  t2 = fmaxf(lo, fmaxf(t2, o2));
}

__device__ __forceinline__ float ClampHalf(float v) { return fminf(fmaxf(v, -65504.f), 65504.f); }

template <int D>
__global__ void __launch_bounds__(Cfg<D>::kThreads, 1) RvqEncodeTcKernel(const RvqEncodeParams p) {
  using C = Cfg<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  float* res = reinterpret_cast<float*>(smem);
  __half* cbuf = reinterpret_cast<__half*>(smem + C::kResBytes);
  float* cibuf = reinterpret_cast<float*>(smem + C::kResBytes + C::kCbufBytes);
  float* cand = reinterpret_cast<float*>(smem + C::kResBytes + C::kCbufBytes + C::kCiBytes);
  int64_t* row_code =
      reinterpret_cast<int64_t*>(smem + C::kResBytes + C::kCbufBytes + C::kCiBytes + C::kCandBytes);
  int2* row_map = reinterpret_cast<int2*>(row_code + C::kBM);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % C::kWM;
  const int wn = warp / C::kWM;
  const int g = lane >> 2;  // fragment row group
  const int q = lane & 3;   // fragment column pair

  const RvqTile tile = p.tiles[blockIdx.x];
  const RvqDeviceTable tab = p.tables[tile.table];
  const int cps = tab.size_pad / C::kBN;  // chunks per stage
  const int total_chunks = tab.stages * cps;
  const uint32_t idx_mask = static_cast<uint32_t>(tab.size_pad - 1);

  auto issue = [&](int chunk) {
    if (chunk < total_chunks) {
      const int buf = chunk % C::kNBUF;
      const int s = chunk / cps;
      const int col0 = (chunk - s * cps) * C::kBN;
      const uint16_t* src = tab.cb16 + (int64_t(s) * tab.size_pad + col0) * D;
      __half* dst = cbuf + buf * C::kBN * C::kCS;
      constexpr int kVecPerRow = D / 8;
      for (int i = tid; i < C::kBN * kVecPerRow; i += C::kThreads) {
        const int r = i / kVecPerRow, v = i - r * kVecPerRow;
        CpAsync16(dst + r * C::kCS + v * 8, src + int64_t(r) * D + v * 8);
      }
      if (tid < C::kBN / 4) {
        CpAsync16(cibuf + buf * C::kBN + tid * 4,
                  tab.cinit + int64_t(s) * tab.size_pad + col0 + tid * 4);
      }
    }
    CpAsyncCommit();
  };

  // Codebook chunks start streaming while the rows are gathered.
#pragma unroll
  for (int i = 0; i < C::kNBUF - 1; ++i) issue(i);

  // Map tile rows to (segment, row) and their code base.
  for (int i = tid; i < C::kBM; i += C::kThreads) {
    int2 m = make_int2(-1, 0);
    int64_t code = 0;
    if (i < tile.rows) {
      int s = tile.segment;
      int r = tile.row + i;
      while (r >= p.segments[s].rows) {
        r -= p.segments[s].rows;
        ++s;
      }
      m = make_int2(s, r);
      code = p.segments[s].code_offset + int64_t(r) * p.segments[s].code_row_stride;
    }
    row_map[i] = m;
    row_code[i] = code;
  }
  __syncthreads();

  // Gather the rows into fp32 residuals (zeros past the tile's rows).
  for (int row = warp; row < C::kBM; row += C::kWarps) {
    const int2 m = row_map[row];
    float* dst = res + row * C::kRS;
    if (m.x < 0) {
      for (int d = lane; d < D; d += 32) dst[d] = 0.f;
      continue;
    }
    const RvqSegment& sg = p.segments[m.x];
    const int64_t base = int64_t(m.y) * sg.in_row_stride;
    bool bad = false;
    for (int d = lane; d < D; d += 32) {
      float v = LoadElem(sg.in, base + d, p.in_type);
      if (!isfinite(v)) {
        bad = true;
        v = 0.f;
      }
      dst[d] = v;
    }
    if (bad && p.error_flag != nullptr) *p.error_flag = 1;
  }
  __syncthreads();

  uint32_t a[C::kMT][C::kKS][4];
  const int wrow = wm * C::kMT * 16;
  auto build_a = [&](int stage) {
    const float sc = tab.scale[stage];
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt) {
      const float* r0 = res + (wrow + mt * 16 + g) * C::kRS;
      const float* r1 = r0 + 8 * C::kRS;
#pragma unroll
      for (int ks = 0; ks < C::kKS; ++ks) {
        const int k0 = ks * 16 + 2 * q;
        const float2 v00 = *reinterpret_cast<const float2*>(r0 + k0);
        const float2 v10 = *reinterpret_cast<const float2*>(r1 + k0);
        const float2 v01 = *reinterpret_cast<const float2*>(r0 + k0 + 8);
        const float2 v11 = *reinterpret_cast<const float2*>(r1 + k0 + 8);
        a[mt][ks][0] = PackHalf2(ClampHalf(sc * v00.x), ClampHalf(sc * v00.y));
        a[mt][ks][1] = PackHalf2(ClampHalf(sc * v10.x), ClampHalf(sc * v10.y));
        a[mt][ks][2] = PackHalf2(ClampHalf(sc * v01.x), ClampHalf(sc * v01.y));
        a[mt][ks][3] = PackHalf2(ClampHalf(sc * v11.x), ClampHalf(sc * v11.y));
      }
    }
  };
  build_a(0);

  float t1[C::kMT * 2], t2[C::kMT * 2];
#pragma unroll
  for (int i = 0; i < C::kMT * 2; ++i) t1[i] = t2[i] = -FLT_MAX;

  // ldmatrix.x4 lane address: matrix lane/8 holds k [8*(lane/8), +8) of codeword lane%8.
  const int ld_row = lane & 7;
  const int ld_k = (lane >> 3) * 8;

  for (int chunk = 0; chunk < total_chunks; ++chunk) {
    CpAsyncWait<C::kNBUF - 2>();
    __syncthreads();
    issue(chunk + C::kNBUF - 1);

    const int buf = chunk % C::kNBUF;
    const int stage = chunk / cps;
    const int col0 = (chunk - stage * cps) * C::kBN;
    const __half* bsm = cbuf + buf * C::kBN * C::kCS;
    const float* csm = cibuf + buf * C::kBN;

#pragma unroll 1
    for (int nt = 0; nt < C::kNT; ++nt) {
      const int ncol = wn * (C::kBN / C::kWN) + nt * 8;
      const float2 ci = *reinterpret_cast<const float2*>(csm + ncol + 2 * q);
      float acc[C::kMT][4];
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt) {
        acc[mt][0] = ci.x;
        acc[mt][1] = ci.y;
        acc[mt][2] = ci.x;
        acc[mt][3] = ci.y;
      }
      const __half* brow = bsm + (ncol + ld_row) * C::kCS + ld_k;
#pragma unroll
      for (int kk = 0; kk < C::kKS / 2; ++kk) {
        uint32_t b0, b1, b2, b3;
        Ldmatrix4(b0, b1, b2, b3, brow + kk * 32);
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt) {
          Mma16816(acc[mt], a[mt][2 * kk], b0, b1);
          Mma16816(acc[mt], a[mt][2 * kk + 1], b2, b3);
        }
      }
      const uint32_t j0 = static_cast<uint32_t>(col0 + ncol + 2 * q);
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v =
              __uint_as_float((__float_as_uint(acc[mt][e]) & ~idx_mask) | (j0 + (e & 1)));
          Top2(t1[mt * 2 + (e >> 1)], t2[mt * 2 + (e >> 1)], v);
        }
      }
    }

    if (chunk - stage * cps != cps - 1) continue;

    // ---- end of a stage: gather candidates, rescore exactly, update residuals ----
#pragma unroll
    for (int i = 0; i < C::kMT * 2; ++i) {
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, t1[i], o);
        const float o2 = __shfl_xor_sync(0xffffffffu, t2[i], o);
        Top2Merge(t1[i], t2[i], o1, o2);
      }
      if (q == 0) {
        const int row = wrow + (i >> 1) * 16 + g + (i & 1) * 8;
        cand[(row * C::kWN + wn) * 2 + 0] = t1[i];
        cand[(row * C::kWN + wn) * 2 + 1] = t2[i];
      }
      t1[i] = t2[i] = -FLT_MAX;
    }
    __syncthreads();

    const bool last = stage == tab.stages - 1;
    const float* cb32 = tab.cb32 + int64_t(stage) * tab.size * D;
    const float* norms = tab.norms + int64_t(stage) * tab.size;
    for (int base = warp; base < tile.rows; base += C::kWarps * C::kR) {
      float rv[C::kR][C::kEPL], c1[C::kR][C::kEPL], c2[C::kR][C::kEPL];
      int j1[C::kR], j2[C::kR];
      float p1[C::kR], p2[C::kR], pr[C::kR];
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int row = base + r * C::kWarps;
        j1[r] = j2[r] = -1;
        if (row < tile.rows) {
          float a1 = cand[(row * C::kWN) * 2 + 0], a2 = cand[(row * C::kWN) * 2 + 1];
#pragma unroll
          for (int w = 1; w < C::kWN; ++w) {
            Top2Merge(a1, a2, cand[(row * C::kWN + w) * 2 + 0], cand[(row * C::kWN + w) * 2 + 1]);
          }
          j1[r] = static_cast<int>(__float_as_uint(a1) & idx_mask);
          j2[r] = static_cast<int>(__float_as_uint(a2) & idx_mask);
          if (j1[r] >= tab.size) j1[r] = 0;  // cannot happen for real scores; stay in bounds
          if (j2[r] >= tab.size || j2[r] == j1[r]) j2[r] = -1;
          const float* rr = res + row * C::kRS;
          const float* cc1 = cb32 + int64_t(j1[r]) * D;
          const float* cc2 = cb32 + int64_t(j2[r] < 0 ? j1[r] : j2[r]) * D;
#pragma unroll
          for (int e = 0; e < C::kEPL; ++e) {
            rv[r][e] = rr[lane + 32 * e];
            c1[r][e] = __ldg(cc1 + lane + 32 * e);
            c2[r][e] = __ldg(cc2 + lane + 32 * e);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        float s1 = 0.f, s2 = 0.f, sr = 0.f;
        if (j1[r] >= 0) {
#pragma unroll
          for (int e = 0; e < C::kEPL; ++e) {
            s1 = fmaf(rv[r][e], c1[r][e], s1);
            s2 = fmaf(rv[r][e], c2[r][e], s2);
            sr = fmaf(rv[r][e], rv[r][e], sr);
          }
        }
        p1[r] = WarpSum(s1);
        p2[r] = WarpSum(s2);
        pr[r] = last ? WarpSum(sr) : 0.f;
      }
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int row = base + r * C::kWarps;
        if (row >= tile.rows) continue;
        const float d1 = norms[j1[r]] - 2.f * p1[r];
        bool take2 = false;
        if (j2[r] >= 0) {
          const float d2 = norms[j2[r]] - 2.f * p2[r];
          take2 = d2 < d1 || (d2 == d1 && j2[r] < j1[r]);
        }
        const int j = take2 ? j2[r] : j1[r];
        const float dbest = take2 ? norms[j2[r]] - 2.f * p2[r] : d1;
        float* rr = res + row * C::kRS;
#pragma unroll
        for (int e = 0; e < C::kEPL; ++e) {
          rv[r][e] -= take2 ? c2[r][e] : c1[r][e];
          rr[lane + 32 * e] = rv[r][e];
        }
        if (lane == 0) p.codes[row_code[row] + stage] = static_cast<uint16_t>(j);
        if (last) {
          const RvqSegment& sg = p.segments[row_map[row].x];
          if (sg.aux_offset >= 0) {
            const int64_t aux = sg.aux_offset + row_map[row].y;
            if (p.dist_out != nullptr && lane == 0) p.dist_out[aux] = fmaxf(0.f, dbest + pr[r]);
            if (p.residual_out != nullptr) {
#pragma unroll
              for (int e = 0; e < C::kEPL; ++e) p.residual_out[aux * D + lane + 32 * e] = rv[r][e];
            }
          }
        }
      }
    }
    __syncthreads();
    // Unconditional so that the compiler sees `a` dead during the rescore (no spills); after
    // the last stage the rebuilt fragments are simply unused.
    build_a(last ? stage : stage + 1);
  }
  CpAsyncWait<0>();
}

// ---------------------------------------------------------------------------------------------
// Exact fallback: one CTA per tile, rows one after another; each thread scans a strided subset
// of codewords with a sequential fp32 dot (the CPU reference's order), then a block argmin.
constexpr int kExactThreads = 256;
constexpr int kExactTileRows = 64;
constexpr int kExactMaxDim = 1024;

__global__ void __launch_bounds__(kExactThreads) RvqEncodeExactKernel(const RvqEncodeParams p) {
  __shared__ float r[kExactMaxDim];
  __shared__ float best_d[kExactThreads];
  __shared__ int best_j[kExactThreads];
  const int tid = threadIdx.x;
  const int D = p.dim;
  const RvqTile tile = p.tiles[blockIdx.x];
  const RvqDeviceTable tab = p.tables[tile.table];
  int s = tile.segment;
  int rr = tile.row;
  for (int i = 0; i < tile.rows; ++i, ++rr) {
    while (rr >= p.segments[s].rows) {
      rr -= p.segments[s].rows;
      ++s;
    }
    const RvqSegment& sg = p.segments[s];
    bool bad = false;
    for (int d = tid; d < D; d += kExactThreads) {
      float v = LoadElem(sg.in, int64_t(rr) * sg.in_row_stride + d, p.in_type);
      if (!isfinite(v)) {
        bad = true;
        v = 0.f;
      }
      r[d] = v;
    }
    if (bad && p.error_flag != nullptr) *p.error_flag = 1;
    __syncthreads();
    const int64_t code = sg.code_offset + int64_t(rr) * sg.code_row_stride;
    for (int stage = 0; stage < tab.stages; ++stage) {
      const float* cb = tab.cb32 + int64_t(stage) * tab.size * D;
      const float* nm = tab.norms + int64_t(stage) * tab.size;
      float bd = FLT_MAX;
      int bj = 0x7fffffff;
      for (int j = tid; j < tab.size; j += kExactThreads) {
        const float* c = cb + int64_t(j) * D;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += r[d] * c[d];
        const float dd = nm[j] - 2.f * dot;
        if (dd < bd) {
          bd = dd;
          bj = j;
        }
      }
      best_d[tid] = bd;
      best_j[tid] = bj;
      __syncthreads();
      for (int o = kExactThreads / 2; o > 0; o >>= 1) {
        if (tid < o) {
          const float od = best_d[tid + o];
          const int oj = best_j[tid + o];
          if (od < best_d[tid] || (od == best_d[tid] && oj < best_j[tid])) {
            best_d[tid] = od;
            best_j[tid] = oj;
          }
        }
        __syncthreads();
      }
      const int j = best_j[0];
      const float dbest = best_d[0];
      const bool last = stage == tab.stages - 1;
      float rsq = 0.f;
      if (last && p.dist_out != nullptr && sg.aux_offset >= 0 && tid == 0) {
        for (int d = 0; d < D; ++d) rsq += r[d] * r[d];
        p.dist_out[sg.aux_offset + rr] = fmaxf(0.f, dbest + rsq);
      }
      __syncthreads();
      const float* c = cb + int64_t(j) * D;
      for (int d = tid; d < D; d += kExactThreads) r[d] -= c[d];
      if (tid == 0) p.codes[code + stage] = static_cast<uint16_t>(j);
      __syncthreads();
    }
    if (p.residual_out != nullptr && sg.aux_offset >= 0) {
      for (int d = tid; d < D; d += kExactThreads) {
        p.residual_out[(sg.aux_offset + rr) * D + d] = r[d];
      }
    }
    __syncthreads();
  }
}

template <int D>
cudaError_t LaunchTc(const RvqEncodeParams& p, cudaStream_t stream) {
  using C = Cfg<D>;
  cudaError_t e = cudaFuncSetAttribute(RvqEncodeTcKernel<D>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmem));
  if (e != cudaSuccess) return e;
  RvqEncodeTcKernel<D><<<p.num_tiles, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool RvqEncodeHasTensorCorePath(int dim) {
  return dim == 64 || dim == 96 || dim == 128 || dim == 256;
}

int RvqEncodeTileRows(int dim) {
  switch (dim) {
    case 64:
      return Cfg<64>::kBM;
    case 96:
      return Cfg<96>::kBM;
    case 128:
      return Cfg<128>::kBM;
    case 256:
      return Cfg<256>::kBM;
    default:
      return kExactTileRows;
  }
}

cudaError_t LaunchRvqEncode(const RvqEncodeParams& p, cudaStream_t stream) {
  if (p.num_tiles == 0) return cudaSuccess;
  switch (p.dim) {
    case 64:
      return LaunchTc<64>(p, stream);
    case 96:
      return LaunchTc<96>(p, stream);
    case 128:
      return LaunchTc<128>(p, stream);
    case 256:
      return LaunchTc<256>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchRvqEncodeExact(const RvqEncodeParams& p, cudaStream_t stream) {
  if (p.num_tiles == 0) return cudaSuccess;
  if (p.dim <= 0 || p.dim > kExactMaxDim) return cudaErrorInvalidValue;
  RvqEncodeExactKernel<<<p.num_tiles, kExactThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vqkv::kernels::cuda
