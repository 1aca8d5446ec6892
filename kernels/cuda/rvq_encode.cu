// rvq encode kernels: the fused tensor-core kernel (scores, top-2, exact rescore, residual update
// for every stage of a tile without leaving the SM) and an exact fp32 fallback. On compute
// capability 9.0 the default configuration is the wgmma version of the same kernel
// (rvq_encode_sm90.cu, built for sm_90a only); the variant resolution below picks it.
//
// Tensor-core kernel, one CTA per tile of BM rows of one table:
//   shared  res   [BM, D + 8] fp32      the rows' residuals, exact (as the CPU keeps them)
//           cbuf  [NBUF, 64, D + 8]     fp16 codeword chunks, cp.async multi-buffered
//           cibuf [NBUF, 64]            -0.5 * scale^2 * ||c||^2 of those codewords
//   Warp (wm, wn) owns rows [wm*MT*16, +MT*16) and half wn of every chunk's columns; its rows'
//   fp16 A fragments (scale * residual) stay in registers for the whole stage. mma.sync
//   m16n8k16 starts from cinit, so the accumulator is the score r.c - |c|^2/2 (argmax = nearest).
//   Each score has its column index written into its low mantissa bits, so fmaxf keeps
//   (score, index) pairs together: a running maximum costs one min/max per score (a top-2,
//   kept by some variants, three).
//   After a stage's last chunk the two best candidates of each row are rescored in fp32 against
//   cb32 exactly as the CPU reference does (||c||^2 - 2 r.c, ties to the lower index), the
//   residual is updated in fp32 and the code written. fp16 only decides which two candidates
//   are rescored, so the GPU and CPU codes differ only where the CPU's best codeword was not
//   among the GPU's candidates (a near-tie at fp16 precision) or where two exact fp32 distances
//   differ by rounding.
#include <cfloat>
#include <type_traits>

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

// Tile configuration: MT m16 tiles per warp, WM x WN warps, NTP n8 tiles in flight per warp,
// NBUF codeword chunks buffered, MINB CTAs per SM, TOP2: each lane keeps its two best scores per
// row (else its best one; the candidates rescored exactly are then the best two of the lanes'
// winners, so a codeword can only be missed when another codeword of the same lane's column
// class scores higher at fp16 precision as well).
template <int D, int MT_, int WM_, int WN_, int NTP_, int NBUF_, int MINB_, bool TOP2_>
struct Cfg {
  static constexpr int kD = D;
  static constexpr int kMT = MT_;
  static constexpr int kWM = WM_;
  static constexpr int kWN = WN_;
  static constexpr int kNTP = NTP_;
  static constexpr bool kTop2 = TOP2_;
  static constexpr int kBM = kWM * kMT * 16;  // rows per tile
  static constexpr int kBN = kRvqChunk;       // codewords per chunk
  static constexpr int kNBUF = NBUF_;
  static constexpr int kMinBlocks = MINB_;
  static constexpr int kThreads = kWM * kWN * 32;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kKS = D / 16;           // k16 steps
  static constexpr int kNT = kBN / kWN / 8;    // n8 tiles per warp per chunk
  static constexpr int kRS = D + 8;            // floats per residual row (bank spread)
  static constexpr int kCS = D + 8;            // halves per codeword row (ldmatrix conflict-free)
  static constexpr bool kVec4 = D % 128 == 0;  // rescore with float4 per lane
  static constexpr int kEPL = kVec4 ? D / 128 : D / 32;  // float4s or floats per lane
  static constexpr int kR = MINB_ > 1 ? 2 : 4;           // rows rescored together per warp
  static constexpr int kIters = kBM / (kWarps * kR);     // rescore iterations per warp
  static_assert(D % 32 == 0 && kKS % 2 == 0, "head_dim must be a multiple of 32");
  static_assert(kNT % kNTP == 0, "n tiles per warp must be a multiple of NTP");
  static_assert(kThreads >= kBM, "one thread per row in the row map");
  static_assert(kBM % (kWarps * kR) == 0, "rescore rows must divide evenly");
  static constexpr size_t kResBytes = size_t(kBM) * kRS * 4;
  static constexpr size_t kCbufBytes = size_t(kNBUF) * kBN * kCS * 2;
  static constexpr size_t kCiBytes = size_t(kNBUF) * kBN * 4;
  static constexpr size_t kCandBytes = size_t(kBM) * kWN * 2 * 4;
  static constexpr size_t kRowBytes = size_t(kBM) * (8 + 8);  // code base + (segment, row)
  static constexpr size_t kSmem = kResBytes + kCbufBytes + kCiBytes + kCandBytes + kRowBytes;
};

// Variant 0 (default, see docs/gpu.md for the measurements): 128-row tiles, 2 CTAs per SM (one
// CTA's rescore overlaps the other's MMAs), two n8 tiles in flight, top-1 per lane.
// head_dim 256 needs 128 registers of A fragments for 32 rows: one CTA per SM there.
template <int D>
using Cfg0 = std::conditional_t<(D <= 128), Cfg<D, 2, 4, 2, 2, 2, 2, false>,
                                Cfg<D, 2, 4, 2, 1, 2, 1, false>>;
// Variant 1: as 0 with top-2 per lane (more candidates, 2 more min/max per score).
template <int D>
using Cfg1 = Cfg<D, 2, 4, 2, 2, 2, 2, true>;
// Variant 2: 256-row tiles (A fragments of 64 rows per warp), 1 CTA per SM, top-2 per lane.
template <int D>
using Cfg2 = Cfg<D, (D <= 128 ? 4 : 2), 4, 2, 1, (D <= 128 ? 3 : 2), 1, true>;
// Variant 3: as 2 with top-1 per lane.
template <int D>
using Cfg3 = Cfg<D, (D <= 128 ? 4 : 2), 4, 2, 1, (D <= 128 ? 3 : 2), 1, false>;

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

// d = a * b + c with c in separate registers (the score offsets), fp32 accumulation.
__device__ __forceinline__ void Mma16816C(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1, float c0, float c1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %10, %11};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c0), "f"(c1));
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    RvqEncodeTcKernel(const RvqEncodeParams p) {
  constexpr int D = C::kD;
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
  const uint32_t idx_mask = static_cast<uint32_t>(tab.size_pad - 1);

  // Chunks are issued in order; counters avoid a runtime division per chunk.
  int iss_stage = 0, iss_col = 0, iss_buf = 0;
  auto issue = [&]() {
    if (iss_stage < tab.stages) {
      const uint16_t* src = tab.cb16 + (int64_t(iss_stage) * tab.size_pad + iss_col) * D;
      __half* dst = cbuf + iss_buf * C::kBN * C::kCS;
      constexpr int kVecPerRow = D / 8;
#pragma unroll
      for (int i = tid; i < C::kBN * kVecPerRow; i += C::kThreads) {
        const int r = i / kVecPerRow, v = i - r * kVecPerRow;
        CpAsync16(dst + r * C::kCS + v * 8, src + int64_t(r) * D + v * 8);
      }
      if (tid < C::kBN / 4) {
        CpAsync16(cibuf + iss_buf * C::kBN + tid * 4,
                  tab.cinit + int64_t(iss_stage) * tab.size_pad + iss_col + tid * 4);
      }
      iss_col += C::kBN;
      if (iss_col == tab.size_pad) {
        iss_col = 0;
        ++iss_stage;
      }
      iss_buf = iss_buf + 1 == C::kNBUF ? 0 : iss_buf + 1;
    }
    CpAsyncCommit();
  };

  // Codebook chunks start streaming while the rows are gathered.
#pragma unroll
  for (int i = 0; i < C::kNBUF - 1; ++i) issue();

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

  int stage = 0, col0 = 0, buf = 0;
  for (;;) {
    CpAsyncWait<C::kNBUF - 2>();
    __syncthreads();
    issue();

    const __half* bsm = cbuf + buf * C::kBN * C::kCS;
    const float* csm = cibuf + buf * C::kBN;

#pragma unroll 1
    for (int nt0 = 0; nt0 < C::kNT; nt0 += C::kNTP) {
      float acc[C::kNTP][C::kMT][4];
      float2 ci[C::kNTP];
#pragma unroll
      for (int u = 0; u < C::kNTP; ++u) {
        const int ncol = wn * (C::kBN / C::kWN) + (nt0 + u) * 8;
        ci[u] = *reinterpret_cast<const float2*>(csm + ncol + 2 * q);
      }
#pragma unroll
      for (int kk = 0; kk < C::kKS / 2; ++kk) {
#pragma unroll
        for (int u = 0; u < C::kNTP; ++u) {
          const int ncol = wn * (C::kBN / C::kWN) + (nt0 + u) * 8;
          uint32_t b0, b1, b2, b3;
          Ldmatrix4(b0, b1, b2, b3, bsm + (ncol + ld_row) * C::kCS + ld_k + kk * 32);
#pragma unroll
          for (int mt = 0; mt < C::kMT; ++mt) {
            if (kk == 0) {
              Mma16816C(acc[u][mt], a[mt][0], b0, b1, ci[u].x, ci[u].y);
            } else {
              Mma16816(acc[u][mt], a[mt][2 * kk], b0, b1);
            }
            Mma16816(acc[u][mt], a[mt][2 * kk + 1], b2, b3);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < C::kNTP; ++u) {
        const int ncol = wn * (C::kBN / C::kWN) + (nt0 + u) * 8;
        // Index stored reversed (mask - j = mask ^ j): among equal scores >= 0 the lower index
        // wins, as on the CPU (duplicate codewords, e.g. zeros against a zero residual).
        const uint32_t j0 = static_cast<uint32_t>(col0 + ncol + 2 * q);
        const uint32_t jx[2] = {j0 ^ idx_mask, (j0 + 1) ^ idx_mask};
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float v =
                __uint_as_float((__float_as_uint(acc[u][mt][e]) & ~idx_mask) | jx[e & 1]);
            if constexpr (C::kTop2) {
              Top2(t1[mt * 2 + (e >> 1)], t2[mt * 2 + (e >> 1)], v);
            } else {
              t1[mt * 2 + (e >> 1)] = fmaxf(t1[mt * 2 + (e >> 1)], v);
            }
          }
        }
      }
    }

    buf = buf + 1 == C::kNBUF ? 0 : buf + 1;
    col0 += C::kBN;
    if (col0 < tab.size_pad) continue;
    col0 = 0;

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
    // A fixed trip count and no branch around the shuffles: the warp stays converged.
#pragma unroll 1
    for (int it = 0; it < C::kIters; ++it) {
      const int base = warp + it * C::kWarps * C::kR;
      using V = typename std::conditional<C::kVec4, float4, float>::type;
      V rv[C::kR][C::kEPL], c1[C::kR][C::kEPL], c2[C::kR][C::kEPL];
      int j1[C::kR], j2[C::kR];
      bool valid[C::kR], two[C::kR];
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int row = base + r * C::kWarps;
        valid[r] = row < tile.rows;
        float a1 = cand[(row * C::kWN) * 2 + 0], a2 = cand[(row * C::kWN) * 2 + 1];
#pragma unroll
        for (int w = 1; w < C::kWN; ++w) {
          Top2Merge(a1, a2, cand[(row * C::kWN + w) * 2 + 0], cand[(row * C::kWN + w) * 2 + 1]);
        }
        j1[r] = static_cast<int>((__float_as_uint(a1) & idx_mask) ^ idx_mask);
        j2[r] = static_cast<int>((__float_as_uint(a2) & idx_mask) ^ idx_mask);
        // Rows past the tile and impossible indices stay in bounds and are never stored.
        if (!valid[r] || j1[r] >= tab.size) j1[r] = 0;
        two[r] = valid[r] && j2[r] < tab.size && j2[r] != j1[r];
        if (!two[r]) j2[r] = j1[r];
        const V* rr = reinterpret_cast<const V*>(res + row * C::kRS);
        const V* cc1 = reinterpret_cast<const V*>(cb32 + int64_t(j1[r]) * D);
        const V* cc2 = reinterpret_cast<const V*>(cb32 + int64_t(j2[r]) * D);
#pragma unroll
        for (int e = 0; e < C::kEPL; ++e) {
          rv[r][e] = rr[lane + 32 * e];
          c1[r][e] = __ldg(cc1 + lane + 32 * e);
          c2[r][e] = __ldg(cc2 + lane + 32 * e);
        }
      }
      float p1[C::kR], p2[C::kR], pr[C::kR];
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        float s1 = 0.f, s2 = 0.f, sr = 0.f;
#pragma unroll
        for (int e = 0; e < C::kEPL; ++e) {
          if constexpr (C::kVec4) {
            s1 = fmaf(rv[r][e].x, c1[r][e].x, s1);
            s1 = fmaf(rv[r][e].y, c1[r][e].y, s1);
            s1 = fmaf(rv[r][e].z, c1[r][e].z, s1);
            s1 = fmaf(rv[r][e].w, c1[r][e].w, s1);
            s2 = fmaf(rv[r][e].x, c2[r][e].x, s2);
            s2 = fmaf(rv[r][e].y, c2[r][e].y, s2);
            s2 = fmaf(rv[r][e].z, c2[r][e].z, s2);
            s2 = fmaf(rv[r][e].w, c2[r][e].w, s2);
            sr = fmaf(rv[r][e].x, rv[r][e].x, sr);
            sr = fmaf(rv[r][e].y, rv[r][e].y, sr);
            sr = fmaf(rv[r][e].z, rv[r][e].z, sr);
            sr = fmaf(rv[r][e].w, rv[r][e].w, sr);
          } else {
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
        const float n1 = norms[j1[r]];
        const float n2 = norms[j2[r]];
        const float d1 = n1 - 2.f * p1[r];
        const float d2 = n2 - 2.f * p2[r];
        const bool take2 = two[r] && (d2 < d1 || (d2 == d1 && j2[r] < j1[r]));
        const int j = take2 ? j2[r] : j1[r];
        const float dbest = take2 ? d2 : d1;
        if (valid[r]) {
          V* rr = reinterpret_cast<V*>(res + row * C::kRS);
#pragma unroll
          for (int e = 0; e < C::kEPL; ++e) {
            const V c = take2 ? c2[r][e] : c1[r][e];
            if constexpr (C::kVec4) {
              rv[r][e].x -= c.x;
              rv[r][e].y -= c.y;
              rv[r][e].z -= c.z;
              rv[r][e].w -= c.w;
            } else {
              rv[r][e] -= c;
            }
            rr[lane + 32 * e] = rv[r][e];
          }
          if (lane == 0) p.codes[row_code[row] + stage] = static_cast<uint16_t>(j);
          if (last) {
            const RvqSegment& sg = p.segments[row_map[row].x];
            if (sg.aux_offset >= 0) {
              const int64_t aux = sg.aux_offset + row_map[row].y;
              if (p.dist_out != nullptr && lane == 0) p.dist_out[aux] = fmaxf(0.f, dbest + pr[r]);
              if (p.residual_out != nullptr) {
                V* ro = reinterpret_cast<V*>(p.residual_out + aux * D);
#pragma unroll
                for (int e = 0; e < C::kEPL; ++e) ro[lane + 32 * e] = rv[r][e];
              }
            }
          }
        }
      }
    }
    __syncthreads();
    if (last) break;
    ++stage;
    build_a(stage);
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

template <class C>
cudaError_t LaunchTc(const RvqEncodeParams& p, cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(RvqEncodeTcKernel<C>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmem));
  if (e != cudaSuccess) return e;
  RvqEncodeTcKernel<C><<<p.num_tiles, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

// Internal: the wgmma kernels of rvq_encode_sm90.cu (built only for sm_90a).
#if defined(VQKV_ENCODE_SM90A)
int RvqEncodeSm90TileRows(int dim, int variant);
cudaError_t LaunchRvqEncodeSm90(const RvqEncodeParams& p, int variant, cudaStream_t stream);
int RvqEncodeSm90BlocksPerSm(int dim, int variant);
#endif

namespace {

// The wgmma kernels exist only as sm_90a machine code: usable on compute capability 9.0 alone.
bool Sm90Usable(int dim) {
#if defined(VQKV_ENCODE_SM90A)
  if (dim != 64 && dim != 128) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    return false;
  }
  return major == 9 && minor == 0;
#else
  (void)dim;
  return false;
#endif
}

// The wgmma configuration variant 0 runs on sm_90 (see rvq_kernels.h): 13, one CTA per SM of
// three independent, staggered consumer warpgroups fed by a TMA producer warp (ping-pong); 7%
// faster than 10 side by side (95.7k against 89.1k tokens/s; docs/benchmarks-gpu.md, note 6);
// 11% (100.0k against 90.1k, note 7) since its chunk step was trimmed and its consumers run at
// 160 registers (setmaxnreg, a producer warpgroup). Its ring slots are released by per-thread
// mbarrier arrivals, which compute-sanitizer's racecheck follows (0 hazards). Since 2026-12-07
// the default is 15: 13 whose stage ends skip the exact rescore of row batches that the
// tensor-core scores provably decide (ScoresDecide; codes identical to 13's): 103.2k against
// 13's 99.3k tokens/s side by side on the H200 (+3.9%; docs/benchmarks-gpu.md, note 8).
constexpr int kSm90Default = 15;
// Variants 5 .. kLastSm90Variant are the wgmma configurations of rvq_encode_sm90.cu.
constexpr int kLastSm90Variant = 16;
constexpr bool IsSm90Variant(int v) { return v >= 5 && v <= kLastSm90Variant; }

// Variant actually run for (dim, variant): 0 is the fastest measured configuration available
// (a wgmma configuration on sm_90, else the mma.sync default); unsupported variants fall back
// to 0.
int ResolveVariant(int dim, int variant) {
  if (IsSm90Variant(variant)) {
    if (Sm90Usable(dim)) return variant;
    variant = 0;
  }
  if (variant >= 1 && variant <= 3 && dim != 128) variant = 0;
  if (variant < 0 || variant > kLastSm90Variant) variant = 0;
  if (variant == 0) return Sm90Usable(dim) ? kSm90Default : 4;
  return variant;
}

}  // namespace

bool RvqEncodeHasTensorCorePath(int dim) {
  return dim == 64 || dim == 96 || dim == 128 || dim == 256;
}

bool RvqEncodeVariantSupported(int dim, int variant) {
  if (!RvqEncodeHasTensorCorePath(dim)) return false;
  if (variant == 0 || variant == 4) return true;
  if (variant >= 1 && variant <= 3) return dim == 128;
  if (IsSm90Variant(variant)) return Sm90Usable(dim);
  return false;
}

int RvqEncodeResolvedVariant(int dim, int variant) {
  return RvqEncodeHasTensorCorePath(dim) ? ResolveVariant(dim, variant) : -1;
}

int RvqEncodeTileRows(int dim, int variant) {
  if (!RvqEncodeHasTensorCorePath(dim)) return kExactTileRows;
  const int v = ResolveVariant(dim, variant);
#if defined(VQKV_ENCODE_SM90A)
  if (IsSm90Variant(v)) return RvqEncodeSm90TileRows(dim, v);
#endif
  switch (v) {
    case 1:
      return Cfg1<128>::kBM;
    case 2:
      return Cfg2<128>::kBM;
    case 3:
      return Cfg3<128>::kBM;
    default:
      break;
  }
  switch (dim) {
    case 64:
      return Cfg0<64>::kBM;
    case 96:
      return Cfg0<96>::kBM;
    case 128:
      return Cfg0<128>::kBM;
    default:
      return Cfg0<256>::kBM;
  }
}

int RvqEncodeBlocksPerSm(int dim, int variant) {
  if (!RvqEncodeHasTensorCorePath(dim)) return -1;
  const int v = ResolveVariant(dim, variant);
#if defined(VQKV_ENCODE_SM90A)
  if (IsSm90Variant(v)) return RvqEncodeSm90BlocksPerSm(dim, v);
#endif
  int n = -1;
  cudaError_t e = cudaErrorInvalidValue;
  auto occ = [&](auto kernel, int threads, size_t smem) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) ==
        cudaSuccess) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
    }
  };
  if (v == 1) occ(RvqEncodeTcKernel<Cfg1<128>>, Cfg1<128>::kThreads, Cfg1<128>::kSmem);
  if (v == 2) occ(RvqEncodeTcKernel<Cfg2<128>>, Cfg2<128>::kThreads, Cfg2<128>::kSmem);
  if (v == 3) occ(RvqEncodeTcKernel<Cfg3<128>>, Cfg3<128>::kThreads, Cfg3<128>::kSmem);
  if (v == 4 && dim == 128)
    occ(RvqEncodeTcKernel<Cfg0<128>>, Cfg0<128>::kThreads, Cfg0<128>::kSmem);
  return e == cudaSuccess ? n : -1;
}

cudaError_t LaunchRvqEncode(const RvqEncodeParams& p, cudaStream_t stream) {
  if (p.num_tiles == 0) return cudaSuccess;
  if (!RvqEncodeHasTensorCorePath(p.dim)) return cudaErrorInvalidValue;
  const int v = ResolveVariant(p.dim, p.variant);
#if defined(VQKV_ENCODE_SM90A)
  if (IsSm90Variant(v)) return LaunchRvqEncodeSm90(p, v, stream);
#endif
  switch (v) {
    case 1:
      return LaunchTc<Cfg1<128>>(p, stream);
    case 2:
      return LaunchTc<Cfg2<128>>(p, stream);
    case 3:
      return LaunchTc<Cfg3<128>>(p, stream);
    default:
      break;
  }
  switch (p.dim) {
    case 64:
      return LaunchTc<Cfg0<64>>(p, stream);
    case 96:
      return LaunchTc<Cfg0<96>>(p, stream);
    case 128:
      return LaunchTc<Cfg0<128>>(p, stream);
    default:
      return LaunchTc<Cfg0<256>>(p, stream);
  }
}

cudaError_t LaunchRvqEncodeExact(const RvqEncodeParams& p, cudaStream_t stream) {
  if (p.num_tiles == 0) return cudaSuccess;
  if (p.dim <= 0 || p.dim > kExactMaxDim) return cudaErrorInvalidValue;
  RvqEncodeExactKernel<<<p.num_tiles, kExactThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vqkv::kernels::cuda
