// rvq encode on Hopper: the fused kernel of rvq_encode.cu with warpgroup MMAs (wgmma, sm_90a).
// Built only for sm_90a (kernels/cuda/CMakeLists.txt compiles this file alone with
// -gencode=arch=compute_90a,code=sm_90a); rvq_encode.cu calls it on compute capability 9.0
// devices and keeps the mma.sync kernel for every other GPU (and its compute_90 PTX).
//
// One CTA per tile of 64 * WGS rows of one table, WGS warpgroups:
//   shared  cbuf  [NBUF][D/64][64 codewords][128 B]  fp16 codeword chunks in the wgmma K-major
//                                                      128-byte-swizzled layout, cp.async ring
//           res   [BM][D] fp32                         the rows' exact residuals (XOR-swizzled)
//           cibuf [NBUF][64]                           -0.5 * scale^2 * ||c||^2 of those codewords
//   Warpgroup w owns rows [64w, 64w + 64); warp i of it rows [16i, 16i + 16) of those, whose fp16
//   A fragments (scale * residual) stay in registers for the whole stage. Per 64-codeword chunk a
//   warpgroup issues D/16 wgmma.m64n64k16 (A from registers, B from shared memory), then adds
//   the score offsets and keeps per row and column parity a running maximum of (score, index)
//   pairs (the index in the low mantissa bits, as in rvq_encode.cu).
//   At a stage's end each warp merges its rows' candidates by shuffles (the best two of 8 lane
//   classes), rescores those two exactly in fp32 against cb32, updates its own rows' residuals and
//   writes the codes: no CTA-wide barrier per stage, only one per chunk for the ring.
#include <cfloat>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

using detail::CpAsync16;
using detail::CpAsyncCommit;
using detail::CpAsyncWait;
using detail::LoadElem;
using detail::PackHalf2;
using detail::SmemAddr;

template <int D_, int WGS_, int NBUF_, int MINB_, int R_, bool SPLIT_ = false>
struct Sm90Cfg {
  static constexpr int kD = D_;
  static constexpr int kBM = WGS_ * 64;  // rows per tile
  static constexpr int kBN = kRvqChunk;  // codewords per chunk (64)
  static constexpr int kNBUF = NBUF_;
  static constexpr int kMinBlocks = MINB_;
  static constexpr int kThreads = WGS_ * 128;
  static constexpr int kKS = D_ / 16;  // k16 steps
  static constexpr int kVW = D_ / 32;  // floats per lane in the rescore (2 or 4)
  static constexpr int kR = R_;        // rows rescored together per warp
  // SPLIT: each chunk as two n32 halves, pipelined so that one half's MMAs always run while the
  // warpgroup works on the previous half's scores (same 32 accumulator registers).
  static constexpr bool kSplit = SPLIT_;
  static constexpr int kAhead = SPLIT_ ? NBUF_ - 2 : NBUF_ - 1;  // chunks prefetched
  static constexpr int kCbBytes = kBN * D_ * 2;                  // one chunk
  static constexpr size_t kCbufBytes = size_t(NBUF_) * kCbBytes;
  static constexpr size_t kResBytes = size_t(kBM) * D_ * 4;
  static constexpr size_t kCiBytes = size_t(NBUF_) * kBN * 4;
  static constexpr size_t kSmem = kCbufBytes + kResBytes + kCiBytes;
  static_assert(D_ % 64 == 0 && D_ <= 128, "wgmma path: head_dim 64 or 128");
  static_assert(kBN == 64, "chunk of 64 codewords (one m64n64 accumulator)");
  static_assert(16 % R_ == 0, "rows per warp must be a multiple of R");
  static_assert(NBUF_ >= (SPLIT_ ? 3 : 2), "ring too short");
};

// Variant 5: 128-row tiles, 2 CTAs per SM (one CTA's rescore overlaps the other's MMAs).
template <int D>
using Sm90Small = Sm90Cfg<D, 2, (D == 128 ? 3 : 4), 2, (D == 128 ? 4 : 8)>;
// Variant 6: 256-row tiles, 1 CTA per SM, deeper ring.
template <int D>
using Sm90Big = Sm90Cfg<D, 4, 4, 1, (D == 128 ? 4 : 8)>;

// Variant 7: as 5 with split, pipelined chunks.
template <int D>
using Sm90Split = Sm90Cfg<D, 2, (D == 128 ? 3 : 4), 2, (D == 128 ? 4 : 8), true>;

// Residual element (row, k): rows of D floats, k XOR-swizzled so that the fragment loads
// (8 rows x 4 float2) and the rescore's row loads are free of bank conflicts.
template <int D>
__device__ __forceinline__ int ResIdx(int row, int k) {
  return row * D + (k ^ ((row & 3) << 3));
}

__device__ __forceinline__ float ClampHalf(float v) { return fminf(fmaxf(v, -65504.f), 65504.f); }

__device__ __forceinline__ void Top2Merge(float& t1, float& t2, float o1, float o2) {
  const float hi = fmaxf(t1, o1);
  const float lo = fminf(t1, o1);
  t1 = hi;
  t2 = fmaxf(lo, fmaxf(t2, o2));
}

// Sums over the 32 lanes of R per-lane values s[0..R) (R = 4 or 8), scattered: lane l returns
// the total of row l >> 3 (R = 4) or l >> 2 (R = 8): R - 1 + 5 - log2(R) shuffles (6 or 9)
// instead of 5 R for R separate warp sums.
template <int R>
__device__ __forceinline__ float ReduceScatter(const float (&s)[R], int lane) {
  constexpr int kSteps = R == 4 ? 2 : 3;
  float t[R];
#pragma unroll
  for (int j = 0; j < R; ++j) t[j] = s[j];
#pragma unroll
  for (int st = 0; st < kSteps; ++st) {
    const int bit = 16 >> st;
    const int half = R >> (st + 1);
    const bool hi = (lane & bit) != 0;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const float mine = hi ? t[half + j] : t[j];
      const float other = hi ? t[j] : t[half + j];
      t[j] = mine + __shfl_xor_sync(0xffffffffu, other, bit);
    }
  }
  float u = t[0];
#pragma unroll
  for (int bit = 16 >> kSteps; bit > 0; bit >>= 1) u += __shfl_xor_sync(0xffffffffu, u, bit);
  return u;
}

__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across the wgmma fence/wait.
__device__ __forceinline__ void FenceReg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Descriptor of a K-major, 128-byte-swizzled B tile: start address, LBO 16 B (unused), SBO
// 1024 B (8 rows of 128 B), layout type 1 (128B swizzle) in bits 62-63.
__device__ __forceinline__ uint64_t SmemDesc(uint32_t addr) {
  const uint32_t lo = ((addr & 0x3FFFFu) >> 4) | (1u << 16);
  const uint32_t hi = (1024u >> 4) | (1u << 30);
  return (uint64_t(hi) << 32) | lo;
}

#define VQKV_ACC32(X)                                                                            \
  X(0), X(1), X(2), X(3), X(4), X(5), X(6), X(7), X(8), X(9), X(10), X(11), X(12), X(13), X(14), \
      X(15), X(16), X(17), X(18), X(19), X(20), X(21), X(22), X(23), X(24), X(25), X(26), X(27), \
      X(28), X(29), X(30), X(31)

// d (64x64 fp32, this thread's 32) = a (64x16 fp16 from registers) * b (16x64 from shared) + d;
// the first k step (kFirst) ignores d.
template <bool kFirst>
__device__ __forceinline__ void Wgmma64x64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
#define VQKV_OUT(i) "+f"(d[i])
#define VQKV_OUT0(i) "=f"(d[i])
  if constexpr (kFirst) {
    // scale-d = 0: d is only written, so it is dead between chunks.
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, 0, 1, 1, 0;\n"
        "}\n"
        : VQKV_ACC32(VQKV_OUT0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    return;
  }
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : VQKV_ACC32(VQKV_OUT)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(kFirst ? 0 : 1));
#undef VQKV_OUT
#undef VQKV_OUT0
}
#undef VQKV_ACC32

#define VQKV_ACC16(X)                                                                            \
  X(0), X(1), X(2), X(3), X(4), X(5), X(6), X(7), X(8), X(9), X(10), X(11), X(12), X(13), X(14), \
      X(15)
template <bool kFirst>
__device__ __forceinline__ void Wgmma64x32(float (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
#define VQKV_OUT(i) "+f"(d[i])
#define VQKV_OUT0(i) "=f"(d[i])
  if constexpr (kFirst) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "{%16, %17, %18, %19}, %20, 0, 1, 1, 0;\n"
        "}\n"
        : VQKV_ACC16(VQKV_OUT0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    return;
  }
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, 1, 1, 1, 0;\n"
      "}\n"
      : VQKV_ACC16(VQKV_OUT)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
#undef VQKV_OUT
#undef VQKV_OUT0
}
#undef VQKV_ACC16

// Running maxima m[4] ([row g | g+8] x [even | odd column]) over NJ n8 column blocks of acc,
// whose first column is chunk column c0; csm: the chunk's score offsets.
template <int NJ>
__device__ __forceinline__ void ScoreMax(float (&m)[4], const float* acc, const float* csm, int c0,
                                         uint32_t jb, uint32_t idx_mask, int q) {
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    const float2 ci = *reinterpret_cast<const float2*>(csm + c0 + 8 * j + 2 * q);
    const uint32_t j0 = jb - static_cast<uint32_t>(c0 + 8 * j), j1 = j0 - 1u;
    const float v0 = acc[4 * j + 0] + ci.x, v1 = acc[4 * j + 1] + ci.y;
    const float v2 = acc[4 * j + 2] + ci.x, v3 = acc[4 * j + 3] + ci.y;
    m[0] = fmaxf(m[0], __uint_as_float((__float_as_uint(v0) & ~idx_mask) | j0));
    m[1] = fmaxf(m[1], __uint_as_float((__float_as_uint(v1) & ~idx_mask) | j1));
    m[2] = fmaxf(m[2], __uint_as_float((__float_as_uint(v2) & ~idx_mask) | j0));
    m[3] = fmaxf(m[3], __uint_as_float((__float_as_uint(v3) & ~idx_mask) | j1));
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    RvqEncodeWgmmaKernel(const RvqEncodeParams p) {
  constexpr int D = C::kD;
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* cbuf = smem;  // 1024-byte aligned: the swizzle pattern repeats every 1024 B
  float* res = reinterpret_cast<float*>(smem + C::kCbufBytes);
  float* cibuf = reinterpret_cast<float*>(smem + C::kCbufBytes + C::kResBytes);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;     // fragment row group
  const int q = lane & 3;      // fragment column pair
  const int wrow = warp * 16;  // this warp's 16 rows (warpgroup warp/4, its warp warp%4)

  const RvqTile tile = p.tiles[blockIdx.x];
  const RvqDeviceTable tab = p.tables[tile.table];
  const uint32_t idx_mask = static_cast<uint32_t>(tab.size_pad - 1);
  const uint32_t cb_base = SmemAddr(cbuf);
  if ((cb_base & 1023u) != 0) __trap();  // the descriptors assume the swizzle atom alignment

  // Chunks are issued in order and lie back to back in cb16 / cinit ([stages][size_pad][...]),
  // so a running pointer suffices. Each thread copies the same 16-byte piece of kPasses rows
  // of every chunk: its swizzled destination offset is computed once.
  constexpr int kVecPerRow = D / 8;  // 16-byte pieces per codeword
  constexpr int kRowsPerPass = C::kThreads / kVecPerRow;
  constexpr int kPasses = C::kBN / kRowsPerPass;
  static_assert(
      C::kThreads % kVecPerRow == 0 && kRowsPerPass % 8 == 0 && C::kBN % kRowsPerPass == 0,
      "copy passes must keep the swizzle phase");
  const int cp_n = tid / kVecPerRow, cp_v = tid % kVecPerRow;
  const uint32_t cp_dst =
      (cp_v >> 3) * (C::kBN * 128) + cp_n * 128 + (((cp_v & 7) ^ (cp_n & 7)) << 4);
  const uint16_t* iss_src = tab.cb16 + cp_n * D + cp_v * 8;
  const float* iss_ci = tab.cinit + tid * 4;
  int iss_left = tab.stages * (tab.size_pad / C::kBN);  // chunks still to issue
  int iss_buf = 0;
  auto issue = [&]() {
    if (iss_left > 0) {
      unsigned char* dst = cbuf + iss_buf * C::kCbBytes + cp_dst;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        CpAsync16(dst + i * kRowsPerPass * 128, iss_src + i * kRowsPerPass * D);
      }
      if (tid < C::kBN / 4) CpAsync16(cibuf + iss_buf * C::kBN + tid * 4, iss_ci);
      iss_src += C::kBN * D;
      iss_ci += C::kBN;
      --iss_left;
      iss_buf = iss_buf + 1 == C::kNBUF ? 0 : iss_buf + 1;
    }
    CpAsyncCommit();
  };

  // Codebook chunks start streaming while the rows are gathered.
#pragma unroll
  for (int i = 0; i < C::kAhead; ++i) issue();

  // Lane l holds (segment, row, code base) of the warp's row l & 15.
  const int my_row = wrow + (lane & 15);
  const bool my_valid = my_row < tile.rows;
  int my_seg = -1, my_r = 0;
  int64_t my_code = 0;
  if (my_valid) {
    int s = tile.segment;
    int r = tile.row + my_row;
    while (r >= p.segments[s].rows) {
      r -= p.segments[s].rows;
      ++s;
    }
    my_seg = s;
    my_r = r;
    my_code = p.segments[s].code_offset + int64_t(r) * p.segments[s].code_row_stride;
  }

  // Gather the warp's rows into fp32 residuals (zeros past the tile's rows).
  bool bad = false;
  for (int i = 0; i < 16; ++i) {
    const int row = wrow + i;
    const int seg = __shfl_sync(0xffffffffu, my_seg, i);
    const int r = __shfl_sync(0xffffffffu, my_r, i);
    if (seg < 0) {
      for (int d = lane; d < D; d += 32) res[ResIdx<D>(row, d)] = 0.f;
      continue;
    }
    const RvqSegment& sg = p.segments[seg];
    const int64_t base = int64_t(r) * sg.in_row_stride;
    for (int d = lane; d < D; d += 32) {
      float v = LoadElem(sg.in, base + d, p.in_type);
      if (!isfinite(v)) {
        bad = true;
        v = 0.f;
      }
      res[ResIdx<D>(row, d)] = v;
    }
  }
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
  __syncwarp();

  uint32_t a[C::kKS][4];
  auto build_a = [&](int stage) {
    const float sc = tab.scale[stage];
    const int r0 = wrow + g, r1 = r0 + 8;
#pragma unroll
    for (int ks = 0; ks < C::kKS; ++ks) {
      const int k0 = ks * 16 + 2 * q;
      const float2 v00 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r0, k0));
      const float2 v10 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r1, k0));
      const float2 v01 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r0, k0 + 8));
      const float2 v11 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r1, k0 + 8));
      a[ks][0] = PackHalf2(ClampHalf(sc * v00.x), ClampHalf(sc * v00.y));
      a[ks][1] = PackHalf2(ClampHalf(sc * v10.x), ClampHalf(sc * v10.y));
      a[ks][2] = PackHalf2(ClampHalf(sc * v01.x), ClampHalf(sc * v01.y));
      a[ks][3] = PackHalf2(ClampHalf(sc * v11.x), ClampHalf(sc * v11.y));
    }
  };
  build_a(0);

  // Running maxima: [row g, even col], [row g, odd], [row g+8, even], [row g+8, odd].
  float m[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) m[i] = -FLT_MAX;
  float acc[32];
  int stage = 0, col0 = 0, buf = 0;
  bool pending = false;  // kSplit: the previous chunk's second half is still in flight
  int pbuf = 0;
  uint32_t pjb = 0;
  for (;;) {
    CpAsyncWait<C::kAhead - 1>();
    FenceProxyAsync();  // this thread's cp.async writes, before the tensor cores read them
    __syncthreads();
    issue();  // into a buffer no warpgroup reads any more

    const uint32_t bbase = cb_base + buf * C::kCbBytes;
    const float* csm = cibuf + buf * C::kBN;
    // score + offset, column index (reversed: ties >= 0 to the lower index) in the low bits.
    const uint32_t jb = (idx_mask - static_cast<uint32_t>(col0)) - 2u * q;
    if constexpr (!C::kSplit) {
      // Scores of this warpgroup's 64 rows against the chunk's 64 codewords.
      WgmmaFence();
#pragma unroll
      for (int ks = 0; ks < C::kKS; ++ks) {
        const uint64_t desc = SmemDesc(bbase + (ks >> 2) * (C::kBN * 128) + (ks & 3) * 32);
        if (ks == 0) {
          Wgmma64x64<true>(acc, a[ks], desc);
        } else {
          Wgmma64x64<false>(acc, a[ks], desc);
        }
      }
      WgmmaCommit();
      WgmmaWait<0>();
#pragma unroll
      for (int i = 0; i < 32; ++i) FenceReg(acc[i]);
      ScoreMax<8>(m, acc, csm, 0, jb, idx_mask, q);
    } else {
      float(&h0)[16] = *reinterpret_cast<float(*)[16]>(acc);
      float(&h1)[16] = *reinterpret_cast<float(*)[16]>(acc + 16);
      WgmmaFence();
#pragma unroll
      for (int ks = 0; ks < C::kKS; ++ks) {
        const uint64_t desc = SmemDesc(bbase + (ks >> 2) * (C::kBN * 128) + (ks & 3) * 32);
        if (ks == 0) {
          Wgmma64x32<true>(h0, a[ks], desc);
        } else {
          Wgmma64x32<false>(h0, a[ks], desc);
        }
      }
      WgmmaCommit();
      if (pending) {
        WgmmaWait<1>();
#pragma unroll
        for (int i = 0; i < 16; ++i) FenceReg(h1[i]);
        ScoreMax<4>(m, h1, cibuf + pbuf * C::kBN, 32, pjb, idx_mask, q);
        WgmmaFence();
      }
#pragma unroll
      for (int ks = 0; ks < C::kKS; ++ks) {
        const uint64_t desc =
            SmemDesc(bbase + 32 * 128 + (ks >> 2) * (C::kBN * 128) + (ks & 3) * 32);
        if (ks == 0) {
          Wgmma64x32<true>(h1, a[ks], desc);
        } else {
          Wgmma64x32<false>(h1, a[ks], desc);
        }
      }
      WgmmaCommit();
      WgmmaWait<1>();
#pragma unroll
      for (int i = 0; i < 16; ++i) FenceReg(h0[i]);
      ScoreMax<4>(m, h0, csm, 0, jb, idx_mask, q);
      pending = true;
      pbuf = buf;
      pjb = jb;
    }

    buf = buf + 1 == C::kNBUF ? 0 : buf + 1;
    col0 += C::kBN;
    if (col0 < tab.size_pad) continue;
    col0 = 0;
    if constexpr (C::kSplit) {
      float(&h1)[16] = *reinterpret_cast<float(*)[16]>(acc + 16);
      WgmmaWait<0>();
#pragma unroll
      for (int i = 0; i < 16; ++i) FenceReg(h1[i]);
      ScoreMax<4>(m, h1, cibuf + pbuf * C::kBN, 32, pjb, idx_mask, q);
      pending = false;
    }

    // ---- end of a stage (per warp): best two candidates per row, exact rescore, update ----
    float c1[2], c2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      c1[h] = fmaxf(m[2 * h], m[2 * h + 1]);
      c2[h] = fminf(m[2 * h], m[2 * h + 1]);
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, c1[h], o);
        const float o2 = __shfl_xor_sync(0xffffffffu, c2[h], o);
        Top2Merge(c1[h], c2[h], o1, o2);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) m[i] = -FLT_MAX;

    const bool last = stage == tab.stages - 1;
    const float* cb32 = tab.cb32 + int64_t(stage) * tab.size * D;
    const float* norms = tab.norms + int64_t(stage) * tab.size;
    using V = typename std::conditional<C::kVW == 4, float4, float2>::type;
    // Lane l ends up with the sums of batch row l >> kShift (reduce-scatter over the lanes).
    constexpr int kShift = C::kR == 4 ? 3 : 2;
    const int myrow = lane >> kShift;
    const bool leader = (lane & ((1 << kShift) - 1)) == 0;
#pragma unroll
    for (int i0 = 0; i0 < 16; i0 += C::kR) {
      V rv[C::kR], v1[C::kR], v2[C::kR];
      int j1[C::kR], j2[C::kR];
      bool valid[C::kR], two[C::kR];
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int i = i0 + r;  // warp row
        const int src = (i & 7) * 4;
        const float a1 = __shfl_sync(0xffffffffu, i < 8 ? c1[0] : c1[1], src);
        const float a2 = __shfl_sync(0xffffffffu, i < 8 ? c2[0] : c2[1], src);
        valid[r] = wrow + i < tile.rows;
        j1[r] = static_cast<int>((__float_as_uint(a1) & idx_mask) ^ idx_mask);
        j2[r] = static_cast<int>((__float_as_uint(a2) & idx_mask) ^ idx_mask);
        // Rows past the tile and impossible indices stay in bounds and are never stored.
        if (!valid[r] || j1[r] >= tab.size) j1[r] = 0;
        two[r] = valid[r] && j2[r] < tab.size && j2[r] != j1[r];
        if (!two[r]) j2[r] = j1[r];
        rv[r] = *reinterpret_cast<const V*>(res + ResIdx<D>(wrow + i, lane * C::kVW));
        v1[r] = __ldg(reinterpret_cast<const V*>(cb32 + int64_t(j1[r]) * D) + lane);
        v2[r] = __ldg(reinterpret_cast<const V*>(cb32 + int64_t(j2[r]) * D) + lane);
      }
      float s1[C::kR], s2[C::kR], sr[C::kR];
      int mj1 = j1[0], mj2 = j2[0];
      bool mvalid = valid[0], mtwo = two[0];
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        if constexpr (C::kVW == 4) {
          s1[r] = fmaf(rv[r].x, v1[r].x, 0.f);
          s1[r] = fmaf(rv[r].y, v1[r].y, s1[r]);
          s1[r] = fmaf(rv[r].z, v1[r].z, s1[r]);
          s1[r] = fmaf(rv[r].w, v1[r].w, s1[r]);
          s2[r] = fmaf(rv[r].x, v2[r].x, 0.f);
          s2[r] = fmaf(rv[r].y, v2[r].y, s2[r]);
          s2[r] = fmaf(rv[r].z, v2[r].z, s2[r]);
          s2[r] = fmaf(rv[r].w, v2[r].w, s2[r]);
          sr[r] = fmaf(rv[r].x, rv[r].x, 0.f);
          sr[r] = fmaf(rv[r].y, rv[r].y, sr[r]);
          sr[r] = fmaf(rv[r].z, rv[r].z, sr[r]);
          sr[r] = fmaf(rv[r].w, rv[r].w, sr[r]);
        } else {
          s1[r] = fmaf(rv[r].x, v1[r].x, 0.f);
          s1[r] = fmaf(rv[r].y, v1[r].y, s1[r]);
          s2[r] = fmaf(rv[r].x, v2[r].x, 0.f);
          s2[r] = fmaf(rv[r].y, v2[r].y, s2[r]);
          sr[r] = fmaf(rv[r].x, rv[r].x, 0.f);
          sr[r] = fmaf(rv[r].y, rv[r].y, sr[r]);
        }
        if (r > 0 && myrow == r) {
          mj1 = j1[r];
          mj2 = j2[r];
          mvalid = valid[r];
          mtwo = two[r];
        }
      }
      const float p1 = ReduceScatter<C::kR>(s1, lane);
      const float p2 = ReduceScatter<C::kR>(s2, lane);
      const float pr = last ? ReduceScatter<C::kR>(sr, lane) : 0.f;
      const float d1 = norms[mj1] - 2.f * p1;
      const float d2 = norms[mj2] - 2.f * p2;
      const bool take2 = mtwo && (d2 < d1 || (d2 == d1 && mj2 < mj1));
      const uint32_t take2_mask = __ballot_sync(0xffffffffu, take2);
      const int mi = i0 + myrow;  // this lane's batch row (warp row)
      const int64_t code = __shfl_sync(0xffffffffu, my_code, mi);
      if (leader && mvalid) p.codes[code + stage] = static_cast<uint16_t>(take2 ? mj2 : mj1);
      if (last) {
        const int seg = __shfl_sync(0xffffffffu, my_seg, mi);
        const int srow = __shfl_sync(0xffffffffu, my_r, mi);
        if (leader && mvalid && p.dist_out != nullptr) {
          const RvqSegment& sg = p.segments[seg];
          if (sg.aux_offset >= 0)
            p.dist_out[sg.aux_offset + srow] = fmaxf(0.f, (take2 ? d2 : d1) + pr);
        }
      }
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int i = i0 + r;
        const bool t2 = (take2_mask >> (r << kShift)) & 1u;
        int seg = 0, srow = 0;
        if (last) {
          seg = __shfl_sync(0xffffffffu, my_seg, i);
          srow = __shfl_sync(0xffffffffu, my_r, i);
        }
        if (valid[r]) {
          const V c = t2 ? v2[r] : v1[r];
          V nr = rv[r];
          nr.x -= c.x;
          nr.y -= c.y;
          if constexpr (C::kVW == 4) {
            nr.z -= c.z;
            nr.w -= c.w;
          }
          *reinterpret_cast<V*>(res + ResIdx<D>(wrow + i, lane * C::kVW)) = nr;
          if (last && p.residual_out != nullptr) {
            const RvqSegment& sg = p.segments[seg];
            if (sg.aux_offset >= 0) {
              reinterpret_cast<V*>(p.residual_out + (sg.aux_offset + srow) * D)[lane] = nr;
            }
          }
        }
      }
    }
    __syncwarp();
    if (last) break;
    ++stage;
    build_a(stage);
  }
  CpAsyncWait<0>();
}

template <class C>
cudaError_t Launch(const RvqEncodeParams& p, cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(RvqEncodeWgmmaKernel<C>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmem));
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(RvqEncodeWgmmaKernel<C>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           int(cudaSharedmemCarveoutMaxShared));
  if (e != cudaSuccess) return e;
  RvqEncodeWgmmaKernel<C><<<p.num_tiles, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <class C>
int BlocksPerSm() {
  if (cudaFuncSetAttribute(RvqEncodeWgmmaKernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           int(C::kSmem)) != cudaSuccess) {
    return -1;
  }
  cudaFuncSetAttribute(RvqEncodeWgmmaKernel<C>, cudaFuncAttributePreferredSharedMemoryCarveout,
                       int(cudaSharedmemCarveoutMaxShared));
  int n = -1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, RvqEncodeWgmmaKernel<C>, C::kThreads,
                                                    C::kSmem) != cudaSuccess) {
    return -1;
  }
  return n;
}

}  // namespace

// Internal to rvq_encode.cu (declared there). variant: 5 (128-row tiles), 6 (256-row tiles),
// 7 (128-row tiles, split pipelined chunks).
int RvqEncodeSm90TileRows(int dim, int variant) {
  (void)dim;
  return variant == 6 ? Sm90Big<128>::kBM : Sm90Small<128>::kBM;
}

cudaError_t LaunchRvqEncodeSm90(const RvqEncodeParams& p, int variant, cudaStream_t stream) {
  if (p.dim == 128) {
    return variant == 6   ? Launch<Sm90Big<128>>(p, stream)
           : variant == 7 ? Launch<Sm90Split<128>>(p, stream)
                          : Launch<Sm90Small<128>>(p, stream);
  }
  if (p.dim == 64) {
    return variant == 6   ? Launch<Sm90Big<64>>(p, stream)
           : variant == 7 ? Launch<Sm90Split<64>>(p, stream)
                          : Launch<Sm90Small<64>>(p, stream);
  }
  return cudaErrorInvalidValue;
}

int RvqEncodeSm90BlocksPerSm(int dim, int variant) {
  if (dim == 128) {
    return variant == 6   ? BlocksPerSm<Sm90Big<128>>()
           : variant == 7 ? BlocksPerSm<Sm90Split<128>>()
                          : BlocksPerSm<Sm90Small<128>>();
  }
  if (dim == 64) {
    return variant == 6   ? BlocksPerSm<Sm90Big<64>>()
           : variant == 7 ? BlocksPerSm<Sm90Split<64>>()
                          : BlocksPerSm<Sm90Small<64>>();
  }
  return -1;
}

}  // namespace vqkv::kernels::cuda
