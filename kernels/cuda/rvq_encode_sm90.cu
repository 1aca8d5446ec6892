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
// Three kernels: RvqEncodeWgmmaKernel (variants 5-7: MMAs of a chunk, then its epilogue),
// RvqEncodeWgmmaPipeKernel (variants 8-11: two accumulator sets per warpgroup, so that the next
// chunk's MMAs run during this chunk's epilogue; accumulators start from the score offsets; 10/11
// load the chunks with TMA; see the comment above PipeCfg) and RvqEncodePingPongKernel (variants
// 12-16, 15 the default: independent, staggered warpgroups fed by a TMA producer warp; see the
// comment above PingCfg).
#include <cuda.h>

#include <cfloat>
#include <type_traits>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

using detail::CpAsync16;
using detail::CpAsyncCommit;
using detail::CpAsyncWait;
using detail::LoadElem;
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
  static constexpr bool kPipe = false;
  static constexpr bool kTma = false;
  static constexpr bool kPing = false;
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

// r - c, elementwise, for the float2 / float4 row slices of the rescore.
__device__ __forceinline__ float2 SubVec(float2 r, float2 c) {
  return make_float2(r.x - c.x, r.y - c.y);
}
__device__ __forceinline__ float4 SubVec(float4 r, float4 c) {
  return make_float4(r.x - c.x, r.y - c.y, r.z - c.z, r.w - c.w);
}

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

// fp16x2 of (lo, hi), saturated to +-65504 (the residuals are finite).
__device__ __forceinline__ uint32_t Half2Sat(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// A fragments (fp16 x2, scale * residual, saturated) of rows r0 = wrow + g and r0 + 8 for every
// k16 step, from the residuals in shared memory (q: the lane's column pair); kNorm: also rn.
template <class C, bool kNorm = false>
__device__ __forceinline__ void BuildAFrags(uint32_t (&a)[C::kKS][4], const float* res, float sc,
                                            int r0, int q, float* rn = nullptr) {
  constexpr int D = C::kD;
  const int r1 = r0 + 8;
  float n0 = 0.f, n1 = 0.f;
#pragma unroll
  for (int ks = 0; ks < C::kKS; ++ks) {
    const int k0 = ks * 16 + 2 * q;
    const float2 v00 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r0, k0));
    const float2 v10 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r1, k0));
    const float2 v01 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r0, k0 + 8));
    const float2 v11 = *reinterpret_cast<const float2*>(res + ResIdx<D>(r1, k0 + 8));
    a[ks][0] = Half2Sat(sc * v00.x, sc * v00.y);
    a[ks][1] = Half2Sat(sc * v10.x, sc * v10.y);
    a[ks][2] = Half2Sat(sc * v01.x, sc * v01.y);
    a[ks][3] = Half2Sat(sc * v11.x, sc * v11.y);
    if constexpr (kNorm) {
      n0 = fmaf(v00.x, v00.x, n0);
      n0 = fmaf(v00.y, v00.y, n0);
      n0 = fmaf(v01.x, v01.x, n0);
      n0 = fmaf(v01.y, v01.y, n0);
      n1 = fmaf(v10.x, v10.x, n1);
      n1 = fmaf(v10.y, v10.y, n1);
      n1 = fmaf(v11.x, v11.x, n1);
      n1 = fmaf(v11.y, v11.y, n1);
    }
  }
  if constexpr (kNorm) {
    // rn[h]: the squared norm of residual row r0 + 8h, in every lane of the row's lane quad.
    n0 += __shfl_xor_sync(0xffffffffu, n0, 1);
    n1 += __shfl_xor_sync(0xffffffffu, n1, 1);
    n0 += __shfl_xor_sync(0xffffffffu, n0, 2);
    n1 += __shfl_xor_sync(0xffffffffu, n1, 2);
    rn[0] = n0;
    rn[1] = n1;
  }
}

__device__ __forceinline__ float SqrtApprox(float x) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// Whether the tensor-core scores alone decide between a row's two candidates, i.e. the exact fp32
// rescore would pick the first: their score gap (c1 - c2, index bits in the low mantissa bits)
// exceeds the sum of both scores' error bounds. Scores are those of a = sc * r (fp16-rounded,
// relative error <= 2^-11, absolute <= 2^-25 below fp16's normal range) against b = sc * c
// (fp16(sc * c), the same) plus -|b|^2 / 2: per candidate the operand rounding is at most
// (2^-10 + 2^-22) |a||b| + 2^-25 sqrt(D) (|a| + |b|) (Cauchy-Schwarz), the index bits perturb the
// score by rho (|a||b| + |b|^2 / 2) (rho: 2^-23 times the index range), and the fp32 accumulation
// and the fp32 rescore's own rounding are bounded generously by 2^-12 (|a||b| + |b|^2 / 2).
// rn: |r|^2; nc1, nc2: |c1|^2, |c2|^2 (the norms table). Saturated operands (|a| >= 16384 may
// hold an element beyond fp16's range) are never decided here.
template <int D>
__device__ __forceinline__ bool ScoresDecide(float c1, float c2, float sc, float rn, float nc1,
                                             float nc2, float rho) {
  const float na = sc * SqrtApprox(rn) * (1.f + 0x1p-12f);
  const float nb1 = sc * SqrtApprox(nc1) * (1.f + 0x1p-12f);
  const float nb2 = sc * SqrtApprox(nc2) * (1.f + 0x1p-12f);
  constexpr float kSqrtD = D == 128 ? 11.3137085f : 8.f;
  const float t1 = na * nb1 + 0.5f * nb1 * nb1;
  const float t2 = na * nb2 + 0.5f * nb2 * nb2;
  const float k = rho + 0x1p-12f;
  const float e = (0x1p-10f + 0x1p-20f) * na * (nb1 + nb2) + k * (t1 + t2) +
                  0x1p-24f * kSqrtD * (2.f * na + nb1 + nb2 + 2.f);
  // c1 - c2 is exact (Sterbenz) when they are close, which is when it matters.
  return na < 16384.f && (c1 - c2) > e * (1.f + 0x1p-10f);
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
  // The shared helper (saturating conversion) gives the fragments of the clamp-then-round this
  // kernel had: the same machine code (2026-12-06, all 20 kernels of this file compared).
  auto build_a = [&](int stage) { BuildAFrags<C>(a, res, tab.scale[stage], wrow + g, q); };
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

// ---------------------------------------------------------------------------------------------
// Variants 8-11: the same algorithm with each warpgroup's MMAs and epilogue overlapped.
// Two accumulator sets per warpgroup: while the tensor cores compute chunk k+1 into one, the
// warps reduce chunk k from the other (a chunk's ring slots are refilled once every warpgroup's
// MMAs on it completed: one CTA barrier per chunk remains). Fewer instructions per chunk:
//  - the accumulators are loaded with the chunk's score offsets -scale^2 |c|^2 / 2 before the
//    MMAs (as the mma.sync kernel does), so the epilogue adds nothing;
//  - the epilogue writes a 6-bit in-chunk index into each score with one LOP3 (the index bits
//    of an accumulator register are compile-time constants, marker bits select them) and
//    merges the chunk's four maxima into the running maxima with the chunk's index bits; the
//    packed keys at a stage's end are the same as in variants 5-7 (full index, reversed, in the
//    low log2(size_pad) bits), except that candidates within one chunk are compared on their
//    finer unpacked value;
//  - wgmma descriptors are one add from a per-CTA base;
//  - variants 10/11: one thread loads each chunk with two TMA boxes (the copy engine writes the
//    128-byte swizzle) and its offsets with a bulk copy, completing on the slot's mbarrier;
//    variants 8/9: every thread issues cp.async pieces with immediate offsets.
// At a stage's end (templated on the last stage, which also writes the aux outputs) the owner
// lanes decode each row's two candidates once (codeword byte offsets) and load their norms, the
// rescore's codeword loads for the next batch of rows are issued before the current batch's
// arithmetic, the 16 codes of a warp are written by one store, and the A fragments are rebuilt
// with saturating fp16x2 conversions.
template <int D_, int WGS_, int NBUF_, int MINB_, int R_, bool TMA_ = false>
struct PipeCfg {
  static constexpr int kD = D_;
  static constexpr int kBM = WGS_ * 64;
  static constexpr int kBN = kRvqChunk;
  static constexpr int kNBUF = NBUF_;  // B ring (chunks)
  // Score-offset ring, slot for slot with the B ring: a chunk's offsets are read (into the
  // accumulators) before its MMAs, one step before its slots are refilled.
  static constexpr int kNCI = NBUF_;
  static constexpr int kMinBlocks = MINB_;
  static constexpr int kThreads = WGS_ * 128;
  static constexpr int kKS = D_ / 16;
  static constexpr int kVW = D_ / 32;
  static constexpr int kR = R_;
  static constexpr bool kPipe = true;
  static constexpr bool kPing = false;
  // TMA: one thread loads each chunk with the tensor memory accelerator (128-byte swizzle done by
  // the copy engine) and an mbarrier per ring slot; else every thread issues cp.async pieces.
  static constexpr bool kTma = TMA_;
  // Threads issuing the cp.async chunk copies: 64 codeword rows per chunk must split into whole
  // passes (3 warpgroups: the first 256 threads copy).
  static constexpr int kCopyThreads = WGS_ == 3 ? 256 : WGS_ * 128;
  using Plain = PipeCfg<D_, WGS_, NBUF_, MINB_, R_, false>;
  static constexpr int kCbBytes = kBN * D_ * 2;
  static constexpr int kCbufBytes = NBUF_ * kCbBytes;
  static constexpr int kResBytes = kBM * D_ * 4;
  static constexpr int kCiFloats = kNCI * kBN;
  // Shared memory: B ring | residuals | offsets ring | (TMA) one full-barrier per ring slot.
  // 2 CTAs of variant 8/10 use all 228 KB of an SM (1 KB per CTA is reserved): keep it so.
  static constexpr size_t kBarOffset = size_t(kCbufBytes) + kResBytes + kCiFloats * 4;
  static constexpr size_t kSmem = kBarOffset + (TMA_ ? NBUF_ * 8 : 0);
  static_assert(D_ % 64 == 0 && D_ <= 128, "wgmma path: head_dim 64 or 128");
  static_assert(kBN == 64, "chunk of 64 codewords (one m64n64 accumulator)");
  static_assert(16 % R_ == 0 && (R_ == 4 || R_ == 8), "rows per rescore batch");
  static_assert(NBUF_ >= 3, "ring too short for two chunks in flight plus one landing");
};
// Variant 8: 128-row tiles, 2 CTAs per SM (registers and shared memory both at the limit).
template <int D>
using PipeSmall = PipeCfg<D, 2, (D == 128 ? 3 : 4), 2, (D == 128 ? 4 : 8)>;
// Variant 9: 256-row tiles, 1 CTA per SM (half the L2 traffic per row), deeper ring.
template <int D>
using PipeBig = PipeCfg<D, 4, (D == 128 ? 5 : 6), 1, (D == 128 ? 4 : 8)>;
// Variants 10 (the default on sm_90 before 13) and 11: 8 and 9 with the chunks loaded by TMA.
template <int D>
using PipeSmallTma = PipeCfg<D, 2, (D == 128 ? 3 : 4), 2, (D == 128 ? 4 : 8), true>;
template <int D>
using PipeBigTma = PipeCfg<D, 4, (D == 128 ? 5 : 6), 1, (D == 128 ? 4 : 8), true>;
// 228 KB of shared memory per SM, 1 KB of it reserved per CTA.
static_assert(2 * (PipeSmallTma<128>::kSmem + 1024) <= 228 * 1024, "variant 10: 2 CTAs per SM");

__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Box {64 elements, 64 rows} at (x, y) of a 2-D tensor map into shared memory at dst.
__device__ __forceinline__ void TmaLoad2d(uint32_t dst, const CUtensorMap* map, int x, int y,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], "
      "[%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void BulkLoad(uint32_t dst, const void* src, uint32_t bytes,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// (a & ~(b | c)) | (b & c): with marker bits (b = 1 where c carries index bits, c = 1 where b
// does) this writes 6 index bits into a's low bits in one LOP3.
__device__ __forceinline__ uint32_t Lop98(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0x98;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(float v) { return v; }

// The warp's 16 input rows into res (fp32, non-finite values as 0; returns whether there were
// any) with every element load in flight at once: one memory latency per tile, not one per row.
// my_src: lane l's row (warp row l & 15) as a byte address, 0 past the tile (rows of zeros).
template <int D, class T>
__device__ __forceinline__ bool LoadRowsT(uint64_t my_src, float* res, int wrow, int lane) {
  constexpr int kPer = D / 32;
  float v[16][kPer];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const uint64_t a = __shfl_sync(0xffffffffu, my_src, i);
    const T* row = reinterpret_cast<const T*>(a);
#pragma unroll
    for (int k = 0; k < kPer; ++k) v[i][k] = a != 0 ? ToFloat(__ldg(row + lane + 32 * k)) : 0.f;
  }
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      float x = v[i][k];
      if (!isfinite(x)) {
        bad = true;
        x = 0.f;
      }
      res[ResIdx<D>(wrow + i, lane + 32 * k)] = x;
    }
  }
  return bad;
}
template <int D>
__device__ __forceinline__ bool LoadRows(const RvqEncodeParams& p, float* res, int wrow, int lane,
                                         int my_seg, int my_r) {
  uint64_t src = 0;
  if (my_seg >= 0) {
    const RvqSegment& sg = p.segments[my_seg];
    const int64_t esz = p.in_type == ElemType::kF32 ? 4 : 2;
    src = reinterpret_cast<uint64_t>(sg.in) + uint64_t(int64_t(my_r) * sg.in_row_stride * esz);
  }
  switch (p.in_type) {
    case ElemType::kF16:
      return LoadRowsT<D, __half>(src, res, wrow, lane);
    case ElemType::kBF16:
      return LoadRowsT<D, __nv_bfloat16>(src, res, wrow, lane);
    default:
      return LoadRowsT<D, float>(src, res, wrow, lane);
  }
}

// ---- per-warp chunk steps shared by variants 8-13 (BuildAFrags: 5-13, above) ----

// The warpgroup's MMAs of one chunk into acc (which starts from the chunk's score offsets, so
// every k step accumulates), committed as one group. lo: low descriptor word of the chunk's slot.
template <class C>
__device__ __forceinline__ void IssueChunkMmas(float (&acc)[32], const uint32_t (&a)[C::kKS][4],
                                               uint32_t lo) {
  WgmmaFence();
#pragma unroll
  for (int ks = 0; ks < C::kKS; ++ks) {
    const uint64_t desc =
        (uint64_t(0x40000040u) << 32) | (lo + (ks >> 2) * (C::kBN * 128 / 16) + (ks & 3) * 2);
    Wgmma64x64<false>(acc, a[ks], desc);
  }
  WgmmaCommit();
}

// Accumulator (row g | g + 8, column 8j + 2q + parity) := offset of that column; a0: shared
// address of the chunk's offset 2q. Loaded twice (rows g and g + 8) rather than copied: loads
// straight into the accumulators.
__device__ __forceinline__ void InitFromOffsets(float (&acc)[32], uint32_t a0) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      asm volatile("ld.volatile.shared.v2.f32 {%0, %1}, [%2];\n"
                   : "=f"(acc[4 * j + 2 * h]), "=f"(acc[4 * j + 2 * h + 1])
                   : "r"(a0 + 32 * j));
    }
  }
}

// Epilogue of a chunk: the 6-bit in-chunk index (reversed) into each score with one LOP3 (qbits:
// see the kernels), the chunk's maxima per [row g | g + 8] x [even | odd column], merged into
// the running maxima m with the chunk's index bits cbits (hi_mask: the index bits above 6).
// kLop (variants 12/13, whose cbits are counted down): that merge as one explicit LOP3 each;
// variants 8-11 keep the C++ form (and their SASS).
// Column group j (accumulators 4j .. 4j + 3) of ChunkMax: index bits in, into the chunk maxima mc.
__device__ __forceinline__ void ChunkMaxGroup(float (&mc)[4], const float (&acc)[32], int j,
                                              uint32_t qbits) {
  const uint32_t ce = 0x06u | (static_cast<uint32_t>(7 - j) << 3) | 1u;  // even column
  const uint32_t co = 0x06u | (static_cast<uint32_t>(7 - j) << 3);       // odd column
  const float k0 = __uint_as_float(Lop98(__float_as_uint(acc[4 * j + 0]), qbits, ce));
  const float k1 = __uint_as_float(Lop98(__float_as_uint(acc[4 * j + 1]), qbits, co));
  const float k2 = __uint_as_float(Lop98(__float_as_uint(acc[4 * j + 2]), qbits, ce));
  const float k3 = __uint_as_float(Lop98(__float_as_uint(acc[4 * j + 3]), qbits, co));
  if (j == 0) {
    mc[0] = k0;
    mc[1] = k1;
    mc[2] = k2;
    mc[3] = k3;
  } else {
    mc[0] = fmaxf(mc[0], k0);
    mc[1] = fmaxf(mc[1], k1);
    mc[2] = fmaxf(mc[2], k2);
    mc[3] = fmaxf(mc[3], k3);
  }
}

// The chunk maxima mc with the chunk's index bits cbits into the running maxima m.
template <bool kLop>
__device__ __forceinline__ void MergeChunkMax(float (&m)[4], const float (&mc)[4], uint32_t cbits,
                                              uint32_t hi_mask) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kLop) {
      // (mc & ~hi_mask) | cbits as one LOP3 (0xBA; ptxas otherwise splits it).
      uint32_t v;
      asm("lop3.b32 %0, %1, %2, %3, 0xBA;\n"
          : "=r"(v)
          : "r"(__float_as_uint(mc[i])), "r"(hi_mask), "r"(cbits));
      m[i] = fmaxf(m[i], __uint_as_float(v));
    } else {
      m[i] = fmaxf(m[i], __uint_as_float((__float_as_uint(mc[i]) & ~hi_mask) | cbits));
    }
  }
}

// Epilogue of a chunk: the 6-bit in-chunk index (reversed) into each score with one LOP3 (qbits:
// see the kernels), the chunk's maxima per [row g | g + 8] x [even | odd column], merged into
// the running maxima m with the chunk's index bits cbits (hi_mask: the index bits above 6).
// kLop (variants 12/13, whose cbits are counted down): that merge as one explicit LOP3 each;
// variants 8-11 keep the C++ form (and their SASS).
template <bool kLop = false>
__device__ __forceinline__ void ChunkMax(float (&m)[4], const float (&acc)[32], uint32_t qbits,
                                         uint32_t cbits, uint32_t hi_mask) {
  float mc[4];
#pragma unroll
  for (int j = 0; j < 8; ++j) ChunkMaxGroup(mc, acc, j, qbits);
  MergeChunkMax<kLop>(m, mc, cbits, hi_mask);
}

// ChunkMax<true> of acc fused with loading the score offsets of a later chunk into acc (shared
// address a0 as in InitFromOffsets): each half's loads go into the registers whose scores the
// half above consumed, ordered after them by a false dependency on the half's maxima (zmask: a
// zero ptxas cannot prove), so that the loads neither wait for the whole reduce nor need
// registers beside the scores.
__device__ __forceinline__ void ChunkMaxInit(float (&m)[4], float (&acc)[32], uint32_t qbits,
                                             uint32_t cbits, uint32_t hi_mask, uint32_t a0,
                                             uint32_t zmask) {
  float mc[4];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int j = 4 * half; j < 4 * half + 4; ++j) ChunkMaxGroup(mc, acc, j, qbits);
    const uint32_t dep = (__float_as_uint(mc[0]) | __float_as_uint(mc[3])) & zmask;
    const uint32_t ah = a0 + dep;
#pragma unroll
    for (int j = 4 * half; j < 4 * half + 4; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        asm volatile("ld.volatile.shared.v2.f32 {%0, %1}, [%2];\n"
                     : "=f"(acc[4 * j + 2 * h]), "=f"(acc[4 * j + 2 * h + 1])
                     : "r"(ah + 32 * j));
      }
    }
  }
  MergeChunkMax<true>(m, mc, cbits, hi_mask);
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    RvqEncodeWgmmaPipeKernel(const RvqEncodeParams p, const __grid_constant__ CUtensorMap tmap) {
  constexpr int D = C::kD;
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* cbuf = smem;
  float* res = reinterpret_cast<float*>(smem + C::kCbufBytes);
  float* cibuf = reinterpret_cast<float*>(smem + C::kCbufBytes + C::kResBytes);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int q = lane & 3;
  const int wrow = warp * 16;

  const RvqTile tile = p.tiles[blockIdx.x];
  const RvqDeviceTable tab = p.tables[tile.table];
  const uint32_t idx_mask = static_cast<uint32_t>(tab.size_pad - 1);
  const uint32_t hi_mask = idx_mask & ~63u;  // index bits above the in-chunk 6
  const uint32_t cb_base = SmemAddr(cbuf);
  if ((cb_base & 1023u) != 0) __trap();

  // ---- copy issue: chunk after chunk of cb16 / cinit into the rings ----
  constexpr int kVecPerRow = D / 8;
  constexpr int kRowsPerPass = C::kCopyThreads / kVecPerRow;
  constexpr int kPasses = C::kBN / kRowsPerPass;
  static_assert(C::kCopyThreads % kVecPerRow == 0 && kRowsPerPass % 8 == 0 && kPasses >= 1 &&
                    C::kBN % kRowsPerPass == 0,
                "copy passes must keep the swizzle phase");
  static_assert(kPasses == 1 || kPasses == 2 || kPasses == 4, "copy passes");
  const int cp_n = tid / kVecPerRow, cp_v = tid % kVecPerRow;
  const uint32_t cp_dst =
      cb_base + (cp_v >> 3) * (C::kBN * 128) + cp_n * 128 + (((cp_v & 7) ^ (cp_n & 7)) << 4);
  const char* cp_src = reinterpret_cast<const char*>(tab.cb16 + cp_n * D + cp_v * 8);
  const bool ci_thread = tid < C::kBN / 4;
  const uint32_t ci_dst = SmemAddr(cibuf) + (C::kTma ? 0 : tid * 16);
  const char* ci_src = reinterpret_cast<const char*>(tab.cinit + (C::kTma ? 0 : tid * 4));
  const uint32_t bar0 = SmemAddr(smem + C::kBarOffset);  // TMA: full barrier of slot b at +8b
  // TMA: row of the table's first codeword in the tensor map (cb16 rows from p.cb16_base).
  int tma_row = C::kTma ? static_cast<int>((tab.cb16 - p.cb16_base) / D) : 0;
  int iss_left = tab.stages * (tab.size_pad / C::kBN);
  uint32_t iss_b = 0, iss_c = 0;  // byte offsets of the next chunk's slots
  int iss_buf = 0;
  auto issue = [&]() {
    if constexpr (C::kTma) {
      // Thread 0 only.
      if (iss_left > 0) {
        const uint32_t bar = bar0 + 8 * iss_buf;
        MbarExpectTx(bar, C::kCbBytes + C::kBN * 4);
#pragma unroll
        for (int pi = 0; pi < D / 64; ++pi) {
          TmaLoad2d(cb_base + iss_b + pi * (C::kBN * 128), &tmap, pi * 64, tma_row, bar);
        }
        BulkLoad(ci_dst + iss_c, ci_src, C::kBN * 4, bar);
        tma_row += C::kBN;
        ci_src += C::kBN * 4;
        --iss_left;
        iss_b = iss_b + C::kCbBytes == C::kCbufBytes ? 0u : iss_b + C::kCbBytes;
        iss_c = iss_c + C::kBN * 4 == C::kCiFloats * 4 ? 0u : iss_c + C::kBN * 4;
        iss_buf = iss_buf + 1 == C::kNBUF ? 0 : iss_buf + 1;
      }
    } else {
      if (iss_left > 0 && (C::kCopyThreads == C::kThreads || tid < C::kCopyThreads)) {
        // Pass i: rows + i * kRowsPerPass (immediate offsets on both addresses).
        constexpr int kDs = kRowsPerPass * 128, kSs = kRowsPerPass * D * 2;
        const uint32_t dst = cp_dst + iss_b;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(cp_src)
                     : "memory");
        if constexpr (kPasses > 1) {
          asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%3], 16;\n" ::"r"(dst), "l"(cp_src),
                       "n"(kDs), "n"(kSs)
                       : "memory");
        }
        if constexpr (kPasses > 2) {
          asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%3], 16;\n" ::"r"(dst), "l"(cp_src),
                       "n"(2 * kDs), "n"(2 * kSs)
                       : "memory");
          asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%3], 16;\n" ::"r"(dst), "l"(cp_src),
                       "n"(3 * kDs), "n"(3 * kSs)
                       : "memory");
        }
        if (ci_thread) {
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(ci_dst + iss_c),
                       "l"(ci_src)
                       : "memory");
        }
        cp_src += C::kCbBytes;
        ci_src += C::kBN * 4;
        --iss_left;
        iss_b = iss_b + C::kCbBytes == C::kCbufBytes ? 0u : iss_b + C::kCbBytes;
        iss_c = iss_c + C::kBN * 4 == C::kCiFloats * 4 ? 0u : iss_c + C::kBN * 4;
      }
      CpAsyncCommit();
    }
  };
  if constexpr (C::kTma) {
    if (tid == 0) {
#pragma unroll
      for (int b = 0; b < C::kNBUF; ++b) MbarInit(bar0 + 8 * b, 1);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
      FenceProxyAsync();
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap))
                   : "memory");
#pragma unroll
      for (int i = 0; i < C::kNBUF; ++i) issue();
    }
  } else {
#pragma unroll
    for (int i = 0; i < C::kNBUF; ++i) issue();
  }

  // ---- rows: (segment, row, code base) of warp row lane & 15; fp32 residuals in smem ----
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
  auto build_a = [&](int stage) { BuildAFrags<C>(a, res, tab.scale[stage], wrow + g, q); };
  build_a(0);

  // wgmma B descriptors: low word = (address >> 4) | LBO 16 B; high word: SBO 1024 B, 128B swizzle.
  const uint32_t desc_lo0 = ((cb_base & 0x3FFFFu) >> 4) | (1u << 16);
  auto mma = [&](float(&acc)[32], uint32_t boff) {
    IssueChunkMmas<C>(acc, a, desc_lo0 + (boff >> 4));
  };
  auto ci_init = [&](float(&acc)[32], const float* csm) {
    InitFromOffsets(acc, SmemAddr(csm + 2 * q));
  };

  // In-chunk index bits (reversed: 63 - column): bits 1-2 from q (a register, markers at bits 0
  // and 3-5), bits 0 and 3-5 from the accumulator position (immediates, markers at bits 1-2).
  const uint32_t qbits = 0x39u | (static_cast<uint32_t>(3 - q) << 1);
  float m[4];
  auto epilogue = [&](const float(&acc)[32], int col0) {
    ChunkMax(m, acc, qbits, (idx_mask ^ static_cast<uint32_t>(col0)) & hi_mask, hi_mask);
  };

  float acc0[32], acc1[32];
  int buf = 0;         // ring slot of the current chunk
  uint32_t phase = 0;  // TMA: bit b = parity of slot b's next completion
  int c_cur = 0;       // float offset of the current chunk's score offsets
  int col0 = 0;        // its first column within the stage
  // Waits until the chunk in ring slot b has landed (TMA: on its barrier; cp.async: the caller
  // waits on its own groups and the CTA barrier publishes them).
  auto wait_tma = [&](int b) {
    if constexpr (C::kTma) {
      MbarWait(bar0 + 8 * b, (phase >> b) & 1u);
      phase ^= 1u << b;
    }
  };
  // One chunk: MMAs of chunk k (into cur) complete; after the barrier the next chunk's MMAs go
  // into nxt while the warps reduce cur.
  auto step = [&](float(&cur)[32], float(&nxt)[32], auto next_tag) {
    constexpr bool kNext = decltype(next_tag)::value;
    WgmmaWait<0>();
#pragma unroll
    for (int i = 0; i < 32; ++i) FenceReg(cur[i]);
    if constexpr (!C::kTma) {
      CpAsyncWait<C::kNBUF - 2>();  // this thread's copies of chunk k+1 landed
      FenceProxyAsync();
    }
    __syncthreads();  // chunk k's slots free in every warpgroup (cp.async: chunk k+1 visible)
    const int b_next = buf + 1 == C::kNBUF ? 0 : buf + 1;
    const int c_next = c_cur + C::kBN == C::kCiFloats ? 0 : c_cur + C::kBN;
    if constexpr (C::kTma) {
      if (tid == 0) issue();  // chunk k + NBUF into chunk k's slots
    }
    if constexpr (kNext) {
      wait_tma(b_next);
      ci_init(nxt, cibuf + c_next);
      mma(nxt, b_next * C::kCbBytes);
    }
    if constexpr (!C::kTma) {
      issue();  // chunk k + NBUF into chunk k's slots
    }
    // The epilogue stays after the MMA issue (no hoisting above it).
#pragma unroll
    for (int i = 0; i < 32; ++i) FenceReg(cur[i]);
    epilogue(cur, col0);
    buf = b_next;
    c_cur = c_next;
    col0 += C::kBN;
  };

  using V = typename std::conditional<C::kVW == 4, float4, float2>::type;
  constexpr int kShift = C::kR == 4 ? 3 : 2;  // lane l ends up with batch row l >> kShift
  constexpr int kNB = 16 / C::kR;             // rescore batches per warp
  // At a stage's end (per warp, no CTA barrier): the best two candidates of each row, rescored
  // exactly in fp32; residuals updated, codes written. kLast: also |r|^2 and the aux outputs.
  // Rows past the tile carry codeword 0 along (their residuals stay finite and are never stored).
  auto stage_end = [&](int stage, auto last_tag) {
    constexpr bool kLast = decltype(last_tag)::value;
    const int myrow = lane >> kShift;
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
    const char* cb32 =
        reinterpret_cast<const char*>(tab.cb32 + int64_t(stage) * tab.size * D) + lane * sizeof(V);
    const float* norms = tab.norms + int64_t(stage) * tab.size;
    // Rows wrow + g (h = 0) and wrow + g + 8 (h = 1): candidates j1, j2 as byte offsets of their
    // codewords (j2 == j1 when there is no second one; rows past the tile and impossible indices
    // read codeword 0) and their norms.
    uint32_t o1[2], o2[2];
    float n1[2], n2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool valid = wrow + g + 8 * h < tile.rows;
      uint32_t j1 = (__float_as_uint(c1[h]) & idx_mask) ^ idx_mask;
      uint32_t j2 = (__float_as_uint(c2[h]) & idx_mask) ^ idx_mask;
      if (!valid || j1 >= static_cast<uint32_t>(tab.size)) j1 = 0;
      if (!valid || j2 >= static_cast<uint32_t>(tab.size)) j2 = j1;
      o1[h] = j1 * (D * 4);
      o2[h] = j2 * (D * 4);
      n1[h] = __ldg(norms + j1);
      n2[h] = __ldg(norms + j2);
    }
    V v1[2][C::kR], v2[2][C::kR];
    uint32_t win = 0;  // lanes 0-15: the code of warp row lane
    auto load = [&](int i0, V(&w1)[C::kR], V(&w2)[C::kR]) {
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int i = i0 + r;
        const uint32_t a1 = __shfl_sync(0xffffffffu, o1[i >> 3], (i & 7) * 4);
        const uint32_t a2 = __shfl_sync(0xffffffffu, o2[i >> 3], (i & 7) * 4);
        w1[r] = __ldg(reinterpret_cast<const V*>(cb32 + a1));
        w2[r] = __ldg(reinterpret_cast<const V*>(cb32 + a2));
      }
    };
    load(0, v1[0], v2[0]);
#pragma unroll
    for (int b = 0; b < kNB; ++b) {
      const int i0 = b * C::kR;
      if (b + 1 < kNB) load(i0 + C::kR, v1[(b + 1) & 1], v2[(b + 1) & 1]);
      const V(&w1)[C::kR] = v1[b & 1];
      const V(&w2)[C::kR] = v2[b & 1];
      V rv[C::kR];
      float s1[C::kR], s2[C::kR], sr[C::kR];
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        rv[r] = *reinterpret_cast<const V*>(res + ResIdx<D>(wrow + i0 + r, lane * C::kVW));
        // Same operation order as variants 5-7 (fma from +0, then the reduce-scatter tree).
        s1[r] = fmaf(rv[r].x, w1[r].x, 0.f);
        s1[r] = fmaf(rv[r].y, w1[r].y, s1[r]);
        s2[r] = fmaf(rv[r].x, w2[r].x, 0.f);
        s2[r] = fmaf(rv[r].y, w2[r].y, s2[r]);
        if constexpr (kLast) {
          sr[r] = fmaf(rv[r].x, rv[r].x, 0.f);
          sr[r] = fmaf(rv[r].y, rv[r].y, sr[r]);
        }
        if constexpr (C::kVW == 4) {
          s1[r] = fmaf(rv[r].z, w1[r].z, s1[r]);
          s1[r] = fmaf(rv[r].w, w1[r].w, s1[r]);
          s2[r] = fmaf(rv[r].z, w2[r].z, s2[r]);
          s2[r] = fmaf(rv[r].w, w2[r].w, s2[r]);
          if constexpr (kLast) {
            sr[r] = fmaf(rv[r].z, rv[r].z, sr[r]);
            sr[r] = fmaf(rv[r].w, rv[r].w, sr[r]);
          }
        }
      }
      const float p1 = ReduceScatter<C::kR>(s1, lane);
      const float p2 = ReduceScatter<C::kR>(s2, lane);
      const int mi = i0 + myrow;  // this lane's batch row (warp row)
      const int src = (mi & 7) * 4;
      const uint32_t mo1 = __shfl_sync(0xffffffffu, o1[i0 >> 3], src);
      const uint32_t mo2 = __shfl_sync(0xffffffffu, o2[i0 >> 3], src);
      const float nn1 = __shfl_sync(0xffffffffu, n1[i0 >> 3], src);
      const float nn2 = __shfl_sync(0xffffffffu, n2[i0 >> 3], src);
      const float d1 = nn1 - 2.f * p1;
      const float d2 = nn2 - 2.f * p2;
      // Byte offsets order as indices: ties to the lower index.
      const bool take2 = mo2 != mo1 && (d2 < d1 || (d2 == d1 && mo2 < mo1));
      const uint32_t take2_mask = __ballot_sync(0xffffffffu, take2);
      const uint32_t mwin = (take2 ? mo2 : mo1) / (D * 4);
      // Lane l (l in [i0, i0 + R)) takes row l's code from that row's leader lane.
      const uint32_t w = __shfl_sync(0xffffffffu, mwin, ((lane - i0) & (C::kR - 1)) << kShift);
      if (lane >= i0 && lane < i0 + C::kR) win = w;
      if constexpr (kLast) {
        const float pr = ReduceScatter<C::kR>(sr, lane);
        const int seg = __shfl_sync(0xffffffffu, my_seg, mi);
        const int srow = __shfl_sync(0xffffffffu, my_r, mi);
        const bool leader = (lane & ((1 << kShift) - 1)) == 0;
        if (leader && wrow + mi < tile.rows && p.dist_out != nullptr) {
          const RvqSegment& sg = p.segments[seg];
          if (sg.aux_offset >= 0) {
            p.dist_out[sg.aux_offset + srow] = fmaxf(0.f, (take2 ? d2 : d1) + pr);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int i = i0 + r;
        const bool t2 = (take2_mask >> (r << kShift)) & 1u;
        const V c = t2 ? w2[r] : w1[r];
        V nr = rv[r];
        nr.x -= c.x;
        nr.y -= c.y;
        if constexpr (C::kVW == 4) {
          nr.z -= c.z;
          nr.w -= c.w;
        }
        *reinterpret_cast<V*>(res + ResIdx<D>(wrow + i, lane * C::kVW)) = nr;
        if constexpr (kLast) {
          const int seg = __shfl_sync(0xffffffffu, my_seg, i);
          const int srow = __shfl_sync(0xffffffffu, my_r, i);
          if (wrow + i < tile.rows && p.residual_out != nullptr) {
            const RvqSegment& sg = p.segments[seg];
            if (sg.aux_offset >= 0) {
              reinterpret_cast<V*>(p.residual_out + (sg.aux_offset + srow) * D)[lane] = nr;
            }
          }
        }
      }
    }
    if (lane < 16 && my_valid) p.codes[my_code + stage] = static_cast<uint16_t>(win);
  };

  if constexpr (C::kTma) {
    __syncthreads();  // barriers initialized
  } else {
    CpAsyncWait<C::kNBUF - 1>();
    FenceProxyAsync();
    __syncthreads();
  }
  const int nchunks = tab.size_pad / C::kBN;
  for (int stage = 0;;) {
#pragma unroll
    for (int i = 0; i < 4; ++i) m[i] = -FLT_MAX;
    col0 = 0;
    wait_tma(buf);  // TMA: the stage's first chunk (the last step of a stage waits for none)
    ci_init(acc0, cibuf + c_cur);
    mma(acc0, buf * C::kCbBytes);
    for (int c = 0;; c += 2) {
      if (c + 1 < nchunks) {
        step(acc0, acc1, std::true_type{});
      } else {
        step(acc0, acc1, std::false_type{});
        break;
      }
      if (c + 2 < nchunks) {
        step(acc1, acc0, std::true_type{});
      } else {
        step(acc1, acc0, std::false_type{});
        break;
      }
    }

    // ---- end of a stage (per warp): best two candidates per row, exact rescore, update ----
    const bool last = stage == tab.stages - 1;
    if (last) {
      stage_end(stage, std::true_type{});
    } else {
      stage_end(stage, std::false_type{});
    }
    __syncwarp();
    if (last) break;
    ++stage;
    build_a(stage);
  }
  if constexpr (!C::kTma) CpAsyncWait<0>();
}

// ---------------------------------------------------------------------------------------------
// Variants 12 and 13: ping-pong warpgroups. Profiles of variants 8-11 show the per-stage rescore,
// residual update and A rebuild (a third of the instructions, latency-bound: shuffles and L2
// loads) running with none of that warpgroup's MMAs in flight, the two warpgroups of a CTA in
// lockstep (one CTA barrier per chunk), and each warpgroup's next MMAs issued only after its
// previous ones completed. Here:
//  - one CTA per SM: WGS consumer warpgroups of 64 rows each plus one producer warp that alone
//    issues the TMA loads into a deep ring (full and empty mbarrier per slot); no CTA barrier
//    after the setup, so the warpgroups run independently, bounded only by the ring. In 13 the
//    producer warp is one of a whole warpgroup (the other three warps exit at once) that hands
//    registers back with setmaxnreg (24 per thread), so that the consumers run at 160 instead of
//    the 128 that 13 warps allow (each SM scheduler's 16,384 registers over 4 warps): no spills
//    (24 bytes of stack before), the rescore's codeword loads two batches ahead; +2.2% side by
//    side (2026-11-29 17:32 UTC; one batch ahead +1.8%, three 1.0% with 40 bytes of spills);
//  - warpgroup w + 1 starts a fixed number of chunks after warpgroup w, so that their stage ends
//    fall at different times and each one's rescore runs while the others' MMAs keep the tensor
//    cores busy (as FlashAttention-3 overlaps one warpgroup's softmax with another's GEMMs);
//  - a warpgroup issues chunk k+1's MMAs before it waits for chunk k's (wgmma.wait_group 1), so
//    the tensor cores always hold its next chunk during an epilogue;
//  - the input rows are loaded with all loads in flight at once (LoadRows);
//  - with the register room of variant 12 (one CTA of 2 warpgroups per SM), the rescore issues
//    the candidate codeword loads of more row batches before the first batch's arithmetic.
// The epilogue, stage end and codes are those of variants 8-11 (identical codes). Measured on the
// H200 (docs/benchmarks-gpu.md): 3 warpgroups (13) beat variant 10 by 7%; 2 (12) lose to
// it (8 warps per SM hide too little latency); so did, measured and dropped: waiting for chunk
// k's MMAs before issuing k+1's, loading k+2's offsets early (spills at 128 registers), no
// producer warp (the last-started warpgroup refilling the ring, 168 registers), 4 warpgroups
// without a producer, in variant 10 late TMA issue, LoadRows and a per-slot release counter
// instead of the CTA barrier, and in 13 the score offsets stored by the producer warp in a
// per-lane order for LDS.128 loads (as many shared-memory wavefronts; copying them into the row
// g + 8 accumulators makes ptxas serialize the MMAs) and other start lags, and in 13 the offsets
// added in the epilogue instead of loaded into the accumulators (-3.8%: the FADDs cost more issue
// slots than the load wait they remove; 2026-12-06).
template <int D_, int WGS_, int NBUF_, int AHEAD_, int CREGS_ = 0, int PREGS_ = 0,
          bool PRE_ = false, int SKIP_ = 0>
struct PingCfg {
  static constexpr int kD = D_;
  // SKIP_ 1: at a stage's end, row batches whose tensor-core scores already decide between their
  // two candidates (ScoresDecide; identical codes) skip the exact rescore: one codeword load per
  // row and the residual update.
  static constexpr int kSkip = SKIP_;
  // PRE_: chunk c + 2's score offsets are loaded into the accumulator set that chunk c's
  // reduce frees, during that reduce, so that chunk c + 2's MMAs issue without waiting on them.
  static constexpr bool kPre = PRE_;
  // CREGS_ > 0: a whole producer warpgroup (one warp loads, three idle) that gives registers
  // back with setmaxnreg (PREGS_ per thread) so that the consumers can take CREGS_ each.
  static constexpr int kCRegs = CREGS_;
  static constexpr int kPRegs = PREGS_;
  // setmaxnreg: multiples of 8 in [24, 256]; what the producers give back covers the consumers'
  // increase over the launch's 128 (65,536 / 512 threads), and every SM scheduler's 16,384
  // registers hold its 3 consumer warps and 1 producer-warpgroup warp.
  static_assert(kCRegs == 0 || (kCRegs % 8 == 0 && kPRegs % 8 == 0 && kPRegs >= 24 &&
                                kCRegs <= 256 && 4 * kPRegs + 4 * WGS_ * kCRegs <= 2048 &&
                                WGS_ == 3 && (3 * kCRegs + kPRegs) * 32 <= 16384),
                "setmaxnreg register split");
  static constexpr int kWGS = WGS_;  // consumer warpgroups
  static constexpr int kBM = WGS_ * 64;
  static constexpr int kBN = kRvqChunk;
  static constexpr int kNBUF = NBUF_;
  static constexpr int kConsumerThreads = WGS_ * 128;
  static constexpr int kThreads = kConsumerThreads + (CREGS_ > 0 ? 128 : 32);  // + producer(s)
  static constexpr int kKS = D_ / 16;
  static constexpr int kVW = D_ / 32;
  static constexpr int kR = D_ == 128 ? 4 : 8;
  // Rescore batches whose codeword loads are in flight before a batch's arithmetic.
  static constexpr int kAhead = AHEAD_;
  static constexpr bool kPipe = false;
  static constexpr bool kTma = true;
  static constexpr bool kPing = true;
  // Without the tensor-map view of the tables (e.g. the k-means fit's scratch tables): the same
  // tiles on the cp.async kernel of variant 8 (2 warpgroups: variant 8 itself; 3: one CTA per SM).
  using Plain = PipeCfg<D_, WGS_, (D_ == 128 ? 3 : 4), (WGS_ == 2 ? 2 : 1), (D_ == 128 ? 4 : 8)>;
  static constexpr int kCbBytes = kBN * D_ * 2;
  static constexpr int kCbufBytes = NBUF_ * kCbBytes;
  static constexpr int kResBytes = kBM * D_ * 4;
  static constexpr int kCiFloats = NBUF_ * kBN;
  // Shared memory: B ring | residuals | offsets ring | full[NBUF] | empty[NBUF] | go[WGS].
  static constexpr size_t kBarOffset = size_t(kCbufBytes) + kResBytes + kCiFloats * 4;
  static constexpr size_t kSmem = kBarOffset + (2 * NBUF_ + WGS_) * 8;
  static_assert(D_ % 64 == 0 && D_ <= 128, "wgmma path: head_dim 64 or 128");
  static_assert(kBN == 64, "chunk of 64 codewords (one m64n64 accumulator)");
  static_assert(NBUF_ >= 3 && NBUF_ <= 32, "ring slots (one parity bit each)");
  // 227 KB of shared memory per CTA at most (228 KB per SM, 1 KB of it reserved per CTA).
  static_assert(kSmem <= 232448, "shared memory");
};
// Variant 12: 2 consumer warpgroups (128-row tiles, up to 168 registers per thread), 10-chunk
// ring, rescore codeword loads two batches ahead.
template <int D>
using PingTwo = PingCfg<D, 2, (D == 128 ? 10 : 16), 2>;
// Variant 13: 3 consumer warpgroups (192-row tiles, 2/3 of the L2 traffic per row; 160 registers
// per consumer thread through setmaxnreg, a producer warpgroup at 24), 8-chunk ring, rescore
// codeword loads two batches ahead.
template <int D>
using PingThree = PingCfg<D, 3, (D == 128 ? 8 : 16), 2, 160, 24>;
// Variant 14: 13 with the score offsets loaded one chunk step early (kPre).
template <int D>
using PingThreePre = PingCfg<D, 3, (D == 128 ? 8 : 16), 2, 160, 24, true>;
// Variant 15: 13 with the rescore skipped where the scores decide (kSkip; the codeword loads one
// batch ahead, two spill); 16: 14 with it.
template <int D>
using PingThreeSkip = PingCfg<D, 3, (D == 128 ? 8 : 16), 1, 160, 24, false, 1>;
template <int D>
using PingThreePreSkip = PingCfg<D, 3, (D == 128 ? 8 : 16), 1, 160, 24, true, 1>;
static_assert(PingThreePre<128>::kBM == PingThree<128>::kBM &&
                  PingThreeSkip<128>::kBM == PingThree<128>::kBM &&
                  PingThreePreSkip<128>::kBM == PingThree<128>::kBM,
              "variants 13-16 share their tiles (RvqEncodeSm90TileRows)");

__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// The skip configurations (kSkip) return early from their stage end's and loads' lambdas, which
// leaves the code after the return unreachable in those instantiations (nvcc warning 128).
#pragma nv_diagnostic push
#pragma nv_diag_suppress 128
template <class C>
__global__ void __launch_bounds__(C::kThreads, 1)
    RvqEncodePingPongKernel(const RvqEncodeParams p, const __grid_constant__ CUtensorMap tmap) {
  constexpr int D = C::kD;
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* cbuf = smem;
  float* res = reinterpret_cast<float*>(smem + C::kCbufBytes);
  float* cibuf = reinterpret_cast<float*>(smem + C::kCbufBytes + C::kResBytes);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;  // consumer warpgroup (kWGS: the producer warp)
  const int g = lane >> 2;
  const int q = lane & 3;
  const int wrow = warp * 16;

  const RvqTile tile = p.tiles[blockIdx.x];
  const RvqDeviceTable tab = p.tables[tile.table];
  const uint32_t idx_mask = static_cast<uint32_t>(tab.size_pad - 1);
  const uint32_t hi_mask = idx_mask & ~63u;  // index bits above the in-chunk 6
  const uint32_t cb_base = SmemAddr(cbuf);
  if ((cb_base & 1023u) != 0) __trap();
  const int nchunks = tab.size_pad / C::kBN;
  const int total = tab.stages * nchunks;
  const uint32_t full0 = SmemAddr(smem + C::kBarOffset);  // full barrier of slot b at +8b
  const uint32_t empty0 = full0 + 8 * C::kNBUF;
  const uint32_t go0 = empty0 + 8 * C::kNBUF;  // go[w]: warpgroup w may start

  // Chunk k of the table (stage-major) into ring slot s, by one thread.
  const int row0 = static_cast<int>((tab.cb16 - p.cb16_base) / D);  // tensor-map row of codeword 0
  auto load_chunk = [&](int k, int s) {
    const uint32_t bar = full0 + 8 * s;
    MbarExpectTx(bar, C::kCbBytes + C::kBN * 4);
#pragma unroll
    for (int pi = 0; pi < D / 64; ++pi) {
      TmaLoad2d(cb_base + s * C::kCbBytes + pi * (C::kBN * 128), &tmap, pi * 64, row0 + k * C::kBN,
                bar);
    }
    BulkLoad(SmemAddr(cibuf) + s * (C::kBN * 4), tab.cinit + int64_t(k) * C::kBN, C::kBN * 4, bar);
  };
  if (tid == 0) {
#pragma unroll
    for (int b = 0; b < C::kNBUF; ++b) {
      MbarInit(full0 + 8 * b, 1);
      MbarInit(empty0 + 8 * b, C::kConsumerThreads);  // one arrival per consumer thread
    }
#pragma unroll
    for (int w = 0; w < C::kWGS; ++w) MbarInit(go0 + 8 * w, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    FenceProxyAsync();
  }
  __syncthreads();  // the only CTA barrier: the roles below never wait for each other's threads

  // ---- producer warp: chunk after chunk of cb16 / cinit into the ring, each slot once all
  // consumer warps released it (with kCRegs: the first warp of the producer warpgroup, whose
  // warps all hand their registers back first) ----
  if (wg == C::kWGS) {
    if constexpr (C::kCRegs > 0) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::kPRegs));
    }
    if (lane == 0 && warp == 4 * C::kWGS) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap))
                   : "memory");
      int s = 0;
      uint32_t eph = 0;  // bit s: parity of slot s's next release
      for (int k = 0; k < total; ++k) {
        if (k >= C::kNBUF) {
          // Every consumer thread arrived after its last read of the slot (see release).
          MbarWait(empty0 + 8 * s, (eph >> s) & 1u);
          eph ^= 1u << s;
          // The consumers read the slot's offsets with ordinary loads (before their release):
          // order those before the copy engine's writes.
          FenceProxyAsync();
        }
        load_chunk(k, s);
        s = s + 1 == C::kNBUF ? 0 : s + 1;
      }
    }
    return;
  }

  if constexpr (C::kCRegs > 0) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(C::kCRegs));
  }

  // ---- rows: (segment, row, code base) of warp row lane & 15; fp32 residuals in smem ----
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
  const bool bad = LoadRows<D>(p, res, wrow, lane, my_seg, my_r);
  if (bad && p.error_flag != nullptr) *p.error_flag = 1;
  __syncwarp();

  uint32_t a[C::kKS][4];
  float rn[2];  // kSkip: |r|^2 of rows wrow + g + 8h
  auto build_a = [&](int stage) {
    if constexpr (C::kSkip) {
      BuildAFrags<C, true>(a, res, tab.scale[stage], wrow + g, q, rn);
    } else {
      BuildAFrags<C>(a, res, tab.scale[stage], wrow + g, q);
    }
  };
  build_a(0);

  // wgmma B descriptors: low word = (address >> 4) | LBO 16 B; high word: SBO 1024 B, 128B swizzle.
  const uint32_t desc_lo0 = ((cb_base & 0x3FFFFu) >> 4) | (1u << 16);
  auto ci_init = [&](float(&acc)[32], const float* csm) {
    InitFromOffsets(acc, SmemAddr(csm + 2 * q));
  };

  // In-chunk index bits (reversed: 63 - column): bits 1-2 from q (a register, markers at bits 0
  // and 3-5), bits 0 and 3-5 from the accumulator position (immediates, markers at bits 1-2).
  const uint32_t qbits = 0x39u | (static_cast<uint32_t>(3 - q) << 1);
  float m[4];

  float acc0[32], acc1[32];
  int slot = 0;        // ring slot of this warpgroup's next chunk
  uint32_t phase = 0;  // parity of that slot's next completion (slots are taken in order)
  // Warpgroup wg + 1 starts once this one released `lag` chunks: about 1/WGS of a stage, at most
  // NBUF - 5 (the leader keeps chunks in flight and the TMA loads ahead without waiting for the
  // laggard's releases); at most NBUF - 1 in any case, so that no release of the waiting
  // warpgroup is needed before it starts.
  const int lag = max(1, min(C::kNBUF - 5, nchunks / C::kWGS));
  const int go_at = wg + 1 < C::kWGS ? min(lag, total) - 1 : -1;
  auto acquire = [&]() {
    const int s = slot;
    MbarWait(full0 + 8 * s, phase);
    if (s + 1 == C::kNBUF) {
      slot = 0;
      phase ^= 1u;
    } else {
      slot = s + 1;
    }
    return s;
  };
  // Chunks left before this thread signals warpgroup wg + 1 (-1: never, or done). The chunk
  // loop issues ~150 instructions per chunk and warp at ~7.6 cycles each: the bookkeeping
  // above and here (one parity bit instead of a bit per slot, a count-down instead of lane,
  // warp and count tests) measured 3% faster than the earlier form (2026-11-29 16:49 UTC).
  int go_left = (lane == 0 && (warp & 3) == 0) ? go_at : -1;
  // After this warpgroup's wgmma on slot s completed: the producer may refill it. Every thread
  // arrives itself (release), after its own loads of the slot's offsets. (One arrival per warp
  // by lane 0 after __syncwarp orders the same, but compute-sanitizer's racecheck does not
  // follow a warp barrier into an mbarrier arrival and reported the refill as a race with the
  // other lanes' loads: 8 hazards, 2026-11-29 14:20 UTC; per-thread arrivals: 0 and no slower.)
  auto release = [&](int s) {
    MbarArrive(empty0 + 8 * s);
    if (go_left >= 0) {
      if (go_left == 0) MbarArrive(go0 + 8 * (wg + 1));
      --go_left;
    }
  };
  // (Signalling from the chunk loop instead, a uniform test per two chunks outside the step,
  // measured 3.5% slower, although ptxas's loop had 7 instructions fewer per two chunks:
  // 2026-11-29 17:16 UTC.)
  int s_cur = 0;  // slot of the chunk whose MMAs are in flight in cur
  // Index bits of cur's chunk, (idx_mask ^ col0) & hi_mask = hi_mask - col0 (col0: its first
  // column), counted down; merged into the maxima with one LOP3 each (ChunkMax<true>). The
  // slot's B descriptor from an unsigned product (no byte offset shifted down, whose
  // wrap-around ptxas masked). Both: 18 instructions fewer per two chunks in ptxas's loop and
  // +1.2-1.3% side by side (2026-11-29 17:16 and 17:20 UTC).
  uint32_t cbits = hi_mask;
  // 0 (size_pad <= 65,536), not known to ptxas: ChunkMaxInit's false dependency.
  const uint32_t zmask = hi_mask >> 16;
  auto start_chunk = [&](float(&acc)[32], int s) {
    ci_init(acc, cibuf + s * C::kBN);
    IssueChunkMmas<C>(acc, a, desc_lo0 + static_cast<uint32_t>(s) * (C::kCbBytes >> 4));
  };
  auto reduce = [&](const float(&acc)[32]) {
    ChunkMax<true>(m, acc, qbits, cbits, hi_mask);
    cbits -= C::kBN;
  };
  // kPre: slot of the chunk whose offsets are already in nxt (acquired).
  int s_pre = 0;
  // One chunk: the next chunk's MMAs go into nxt before cur's are waited for; cur is reduced
  // while nxt's run. kPre (pre: chunk c + 2 exists in this stage): nxt already holds its
  // offsets, and cur takes those of chunk c + 2 during its reduce.
  auto step = [&](float(&cur)[32], float(&nxt)[32], auto next_tag, bool pre) {
    constexpr bool kNext = decltype(next_tag)::value;
    if constexpr (kNext && C::kPre) {
      IssueChunkMmas<C>(nxt, a, desc_lo0 + static_cast<uint32_t>(s_pre) * (C::kCbBytes >> 4));
      WgmmaWait<1>();
#pragma unroll
      for (int i = 0; i < 32; ++i) FenceReg(cur[i]);
      release(s_cur);
      s_cur = s_pre;
      if (pre) {
        s_pre = acquire();
        ChunkMaxInit(m, cur, qbits, cbits, hi_mask, SmemAddr(cibuf + s_pre * C::kBN + 2 * q),
                     zmask);
        cbits -= C::kBN;
      } else {
        reduce(cur);
      }
      return;
    } else if constexpr (kNext) {
      (void)pre;
      const int s_nxt = acquire();
      start_chunk(nxt, s_nxt);
      WgmmaWait<1>();
#pragma unroll
      for (int i = 0; i < 32; ++i) FenceReg(cur[i]);
      release(s_cur);
      s_cur = s_nxt;
    } else {
      WgmmaWait<0>();
#pragma unroll
      for (int i = 0; i < 32; ++i) FenceReg(cur[i]);
      release(s_cur);
    }
    reduce(cur);
  };
  using V = typename std::conditional<C::kVW == 4, float4, float2>::type;
  constexpr int kShift = C::kR == 4 ? 3 : 2;  // lane l ends up with batch row l >> kShift
  constexpr int kNB = 16 / C::kR;             // rescore batches per warp
  // At a stage's end (per warp, no CTA barrier): the best two candidates of each row, rescored
  // exactly in fp32; residuals updated, codes written. kLast: also |r|^2 and the aux outputs.
  // Rows past the tile carry codeword 0 along (their residuals stay finite and are never stored).
  auto stage_end = [&](int stage, auto last_tag) {
    constexpr bool kLast = decltype(last_tag)::value;
    const int myrow = lane >> kShift;
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
    const char* cb32 =
        reinterpret_cast<const char*>(tab.cb32 + int64_t(stage) * tab.size * D) + lane * sizeof(V);
    const float* norms = tab.norms + int64_t(stage) * tab.size;
    // Rows wrow + g (h = 0) and wrow + g + 8 (h = 1): candidates j1, j2 as byte offsets of their
    // codewords (j2 == j1 when there is no second one; rows past the tile and impossible indices
    // read codeword 0) and their norms.
    uint32_t o1[2], o2[2];
    float n1[2], n2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool valid = wrow + g + 8 * h < tile.rows;
      uint32_t j1 = (__float_as_uint(c1[h]) & idx_mask) ^ idx_mask;
      uint32_t j2 = (__float_as_uint(c2[h]) & idx_mask) ^ idx_mask;
      if (!valid || j1 >= static_cast<uint32_t>(tab.size)) j1 = 0;
      if (!valid || j2 >= static_cast<uint32_t>(tab.size)) j2 = j1;
      o1[h] = j1 * (D * 4);
      o2[h] = j2 * (D * 4);
      n1[h] = __ldg(norms + j1);
      n2[h] = __ldg(norms + j2);
    }
    // kSkip (not at the last stage, whose exact distances are outputs): bit 4g of dec[h] set
    // when row g + 8h's scores decide (or it has one candidate); a row batch whose rows all
    // decide takes c1 without the rescore.
    uint32_t dec[2] = {0u, 0u};
    if constexpr (C::kSkip && !kLast) {
      const float sc = __ldg(tab.scale + stage);
      const float rho = static_cast<float>(idx_mask + 1u) * 0x1p-23f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool d =
            o1[h] == o2[h] || ScoresDecide<D>(c1[h], c2[h], sc, rn[h], n1[h], n2[h], rho);
        dec[h] = __ballot_sync(0xffffffffu, d);
      }
    }
    auto batch_decided = [&](int i0) {
      if constexpr (C::kSkip && !kLast) {
        constexpr uint32_t kPat = C::kR == 4 ? 0x1111u : 0x11111111u;
        return ((dec[i0 >> 3] >> (4 * (i0 & 7))) & kPat) == kPat;
      } else {
        (void)i0;
        return false;
      }
    };
    // Codewords of kAhead batches in flight before the first one's arithmetic (1 in 8-11).
    constexpr int kVB = C::kAhead + 1 < kNB ? C::kAhead + 1 : kNB;
    V v1[kVB][C::kR], v2[kVB][C::kR];
    uint32_t win = 0;  // lanes 0-15: the code of warp row lane
    auto load = [&](int i0, V(&w1)[C::kR], V(&w2)[C::kR]) {
      if constexpr (C::kSkip && !kLast) {
        // The first candidates before anything that waits for the decision (whose norms are
        // loads themselves).
#pragma unroll
        for (int r = 0; r < C::kR; ++r) {
          const int i = i0 + r;
          const uint32_t a1 = __shfl_sync(0xffffffffu, o1[i >> 3], (i & 7) * 4);
          w1[r] = __ldg(reinterpret_cast<const V*>(cb32 + a1));
        }
        if (!batch_decided(i0)) {
#pragma unroll
          for (int r = 0; r < C::kR; ++r) {
            const int i = i0 + r;
            const uint32_t a2 = __shfl_sync(0xffffffffu, o2[i >> 3], (i & 7) * 4);
            w2[r] = __ldg(reinterpret_cast<const V*>(cb32 + a2));
          }
        }
        return;
      }
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int i = i0 + r;
        const uint32_t a1 = __shfl_sync(0xffffffffu, o1[i >> 3], (i & 7) * 4);
        const uint32_t a2 = __shfl_sync(0xffffffffu, o2[i >> 3], (i & 7) * 4);
        w1[r] = __ldg(reinterpret_cast<const V*>(cb32 + a1));
        w2[r] = __ldg(reinterpret_cast<const V*>(cb32 + a2));
      }
    };
#pragma unroll
    for (int b = 0; b < C::kAhead && b < kNB; ++b) load(b * C::kR, v1[b % kVB], v2[b % kVB]);
#pragma unroll
    for (int b = 0; b < kNB; ++b) {
      const int i0 = b * C::kR;
      if (b + C::kAhead < kNB) {
        load((b + C::kAhead) * C::kR, v1[(b + C::kAhead) % kVB], v2[(b + C::kAhead) % kVB]);
      }
      const V(&w1)[C::kR] = v1[b % kVB];
      const V(&w2)[C::kR] = v2[b % kVB];
      if (batch_decided(i0)) {
        // Lane l in [i0, i0 + R): row l's code is its first candidate.
        const uint32_t w = __shfl_sync(0xffffffffu, o1[i0 >> 3], (lane & 7) * 4) / (D * 4);
        if (lane >= i0 && lane < i0 + C::kR) win = w;
#pragma unroll
        for (int r = 0; r < C::kR; ++r) {
          const int i = i0 + r;
          const V nr =
              SubVec(*reinterpret_cast<const V*>(res + ResIdx<D>(wrow + i, lane * C::kVW)), w1[r]);
          *reinterpret_cast<V*>(res + ResIdx<D>(wrow + i, lane * C::kVW)) = nr;
        }
        continue;
      }
      V rv[C::kR];
      float s1[C::kR], s2[C::kR], sr[C::kR];
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        rv[r] = *reinterpret_cast<const V*>(res + ResIdx<D>(wrow + i0 + r, lane * C::kVW));
        // Same operation order as variants 5-7 (fma from +0, then the reduce-scatter tree).
        s1[r] = fmaf(rv[r].x, w1[r].x, 0.f);
        s1[r] = fmaf(rv[r].y, w1[r].y, s1[r]);
        s2[r] = fmaf(rv[r].x, w2[r].x, 0.f);
        s2[r] = fmaf(rv[r].y, w2[r].y, s2[r]);
        if constexpr (kLast) {
          sr[r] = fmaf(rv[r].x, rv[r].x, 0.f);
          sr[r] = fmaf(rv[r].y, rv[r].y, sr[r]);
        }
        if constexpr (C::kVW == 4) {
          s1[r] = fmaf(rv[r].z, w1[r].z, s1[r]);
          s1[r] = fmaf(rv[r].w, w1[r].w, s1[r]);
          s2[r] = fmaf(rv[r].z, w2[r].z, s2[r]);
          s2[r] = fmaf(rv[r].w, w2[r].w, s2[r]);
          if constexpr (kLast) {
            sr[r] = fmaf(rv[r].z, rv[r].z, sr[r]);
            sr[r] = fmaf(rv[r].w, rv[r].w, sr[r]);
          }
        }
      }
      const float p1 = ReduceScatter<C::kR>(s1, lane);
      const float p2 = ReduceScatter<C::kR>(s2, lane);
      const int mi = i0 + myrow;  // this lane's batch row (warp row)
      const int src = (mi & 7) * 4;
      const uint32_t mo1 = __shfl_sync(0xffffffffu, o1[i0 >> 3], src);
      const uint32_t mo2 = __shfl_sync(0xffffffffu, o2[i0 >> 3], src);
      const float nn1 = __shfl_sync(0xffffffffu, n1[i0 >> 3], src);
      const float nn2 = __shfl_sync(0xffffffffu, n2[i0 >> 3], src);
      const float d1 = nn1 - 2.f * p1;
      const float d2 = nn2 - 2.f * p2;
      // Byte offsets order as indices: ties to the lower index.
      const bool take2 = mo2 != mo1 && (d2 < d1 || (d2 == d1 && mo2 < mo1));
      const uint32_t take2_mask = __ballot_sync(0xffffffffu, take2);
      const uint32_t mwin = (take2 ? mo2 : mo1) / (D * 4);
      // Lane l (l in [i0, i0 + R)) takes row l's code from that row's leader lane.
      const uint32_t w = __shfl_sync(0xffffffffu, mwin, ((lane - i0) & (C::kR - 1)) << kShift);
      if (lane >= i0 && lane < i0 + C::kR) win = w;
      if constexpr (kLast) {
        const float pr = ReduceScatter<C::kR>(sr, lane);
        const int seg = __shfl_sync(0xffffffffu, my_seg, mi);
        const int srow = __shfl_sync(0xffffffffu, my_r, mi);
        const bool leader = (lane & ((1 << kShift) - 1)) == 0;
        if (leader && wrow + mi < tile.rows && p.dist_out != nullptr) {
          const RvqSegment& sg = p.segments[seg];
          if (sg.aux_offset >= 0) {
            p.dist_out[sg.aux_offset + srow] = fmaxf(0.f, (take2 ? d2 : d1) + pr);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < C::kR; ++r) {
        const int i = i0 + r;
        const bool t2 = (take2_mask >> (r << kShift)) & 1u;
        const V c = t2 ? w2[r] : w1[r];
        V nr = rv[r];
        nr.x -= c.x;
        nr.y -= c.y;
        if constexpr (C::kVW == 4) {
          nr.z -= c.z;
          nr.w -= c.w;
        }
        *reinterpret_cast<V*>(res + ResIdx<D>(wrow + i, lane * C::kVW)) = nr;
        if constexpr (kLast) {
          const int seg = __shfl_sync(0xffffffffu, my_seg, i);
          const int srow = __shfl_sync(0xffffffffu, my_r, i);
          if (wrow + i < tile.rows && p.residual_out != nullptr) {
            const RvqSegment& sg = p.segments[seg];
            if (sg.aux_offset >= 0) {
              reinterpret_cast<V*>(p.residual_out + (sg.aux_offset + srow) * D)[lane] = nr;
            }
          }
        }
      }
    }
    if (lane < 16 && my_valid) p.codes[my_code + stage] = static_cast<uint16_t>(win);
  };

  if (wg > 0) MbarWait(go0 + 8 * wg, 0);  // the start lag behind warpgroup wg - 1
  for (int stage = 0;;) {
#pragma unroll
    for (int i = 0; i < 4; ++i) m[i] = -FLT_MAX;
    cbits = hi_mask;
    s_cur = acquire();
    start_chunk(acc0, s_cur);
    if constexpr (C::kPre) {
      if (nchunks > 1) {
        s_pre = acquire();
        ci_init(acc1, cibuf + s_pre * C::kBN);
      } else {
        // Never read (one chunk per stage), but defined: left undefined, ptxas spilled 544 bytes.
#pragma unroll
        for (int i = 0; i < 32; ++i) acc1[i] = 0.f;
      }
    }
    for (int c = 0;; c += 2) {
      if (c + 1 < nchunks) {
        step(acc0, acc1, std::true_type{}, c + 2 < nchunks);
      } else {
        step(acc0, acc1, std::false_type{}, false);
        break;
      }
      if (c + 2 < nchunks) {
        step(acc1, acc0, std::true_type{}, c + 3 < nchunks);
      } else {
        step(acc1, acc0, std::false_type{}, false);
        break;
      }
    }

    // ---- end of a stage (per warp): best two candidates per row, exact rescore, update ----
    const bool last = stage == tab.stages - 1;
    if (last) {
      stage_end(stage, std::true_type{});
    } else {
      stage_end(stage, std::false_type{});
    }
    __syncwarp();
    if (last) break;
    ++stage;
    build_a(stage);
  }
}

#pragma nv_diagnostic pop

template <class C>
constexpr auto KernelOf() {
  if constexpr (C::kPing) {
    return RvqEncodePingPongKernel<C>;
  } else if constexpr (C::kPipe) {
    return RvqEncodeWgmmaPipeKernel<C>;
  } else {
    return RvqEncodeWgmmaKernel<C>;
  }
}

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime (no link against libcuda); null if unavailable.
EncodeTiledFn GetEncodeTiled() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// Every table's cb16 as one fp16 tensor [cb16_rows][dim] from cb16_base; boxes of 64 codewords
// x 64 elements (128 bytes) written with the 128-byte swizzle the wgmma descriptors expect.
bool MakeCb16Map(const RvqEncodeParams& p, CUtensorMap* map) {
  if (p.cb16_base == nullptr || p.cb16_rows <= 0 || p.cb16_rows >= (int64_t{1} << 31)) {
    return false;
  }
  if ((reinterpret_cast<uintptr_t>(p.cb16_base) & 15u) != 0) return false;
  const EncodeTiledFn fn = GetEncodeTiled();
  if (fn == nullptr) return false;
  const cuuint64_t dims[2] = {cuuint64_t(p.dim), cuuint64_t(p.cb16_rows)};
  const cuuint64_t strides[1] = {cuuint64_t(p.dim) * 2};
  const cuuint32_t box[2] = {64, 64};
  const cuuint32_t elem_strides[2] = {1, 1};
  return fn(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<uint16_t*>(p.cb16_base), dims,
            strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <class C>
cudaError_t Launch(const RvqEncodeParams& p, cudaStream_t stream) {
  if constexpr (C::kTma) {
    // Without the one-tensor view of the tables (e.g. the k-means fit's scratch tables), the
    // same tiles with cp.async copies.
    CUtensorMap map;
    if (!MakeCb16Map(p, &map)) return Launch<typename C::Plain>(p, stream);
  }
  constexpr auto kernel = KernelOf<C>();
  cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmem));
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           int(cudaSharedmemCarveoutMaxShared));
  if (e != cudaSuccess) return e;
  if constexpr (C::kPipe || C::kPing) {
    CUtensorMap map{};
    if constexpr (C::kTma) MakeCb16Map(p, &map);
    kernel<<<p.num_tiles, C::kThreads, C::kSmem, stream>>>(p, map);
  } else {
    kernel<<<p.num_tiles, C::kThreads, C::kSmem, stream>>>(p);
  }
  return cudaGetLastError();
}

template <class C>
int BlocksPerSm() {
  constexpr auto kernel = KernelOf<C>();
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmem)) !=
      cudaSuccess) {
    return -1;
  }
  cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                       int(cudaSharedmemCarveoutMaxShared));
  int n = -1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, C::kThreads, C::kSmem) !=
      cudaSuccess) {
    return -1;
  }
  return n;
}

}  // namespace

// Internal to rvq_encode.cu (declared there). variant: 5 (128-row tiles), 6 (256-row tiles),
// 7 (128-row tiles, split pipelined chunks), 8 (128-row tiles, MMA/epilogue overlap),
// 9 (256-row tiles, MMA/epilogue overlap), 10 / 11 (8 / 9 with TMA chunk loads), 12 / 13
// (ping-pong warpgroups, 128 / 192-row tiles, 1 CTA per SM).
int RvqEncodeSm90TileRows(int dim, int variant) {
  (void)dim;
  return variant == 6    ? Sm90Big<128>::kBM
         : variant == 9  ? PipeBig<128>::kBM
         : variant == 11 ? PipeBigTma<128>::kBM
         : variant == 12 ? PingTwo<128>::kBM
         : variant >= 13 ? PingThree<128>::kBM  // 13-16: the same 192-row tiles
                         : Sm90Small<128>::kBM;
}

namespace {
template <int D, class F>
auto DispatchSm90(int variant, F&& f) {
  switch (variant) {
    case 6:
      return f(static_cast<Sm90Big<D>*>(nullptr));
    case 7:
      return f(static_cast<Sm90Split<D>*>(nullptr));
    case 8:
      return f(static_cast<PipeSmall<D>*>(nullptr));
    case 9:
      return f(static_cast<PipeBig<D>*>(nullptr));
    case 10:
      return f(static_cast<PipeSmallTma<D>*>(nullptr));
    case 11:
      return f(static_cast<PipeBigTma<D>*>(nullptr));
    case 12:
      return f(static_cast<PingTwo<D>*>(nullptr));
    case 13:
      return f(static_cast<PingThree<D>*>(nullptr));
    case 14:
      return f(static_cast<PingThreePre<D>*>(nullptr));
    case 15:
      return f(static_cast<PingThreeSkip<D>*>(nullptr));
    case 16:
      return f(static_cast<PingThreePreSkip<D>*>(nullptr));
    default:
      return f(static_cast<Sm90Small<D>*>(nullptr));
  }
}
}  // namespace

cudaError_t LaunchRvqEncodeSm90(const RvqEncodeParams& p, int variant, cudaStream_t stream) {
  auto launch = [&](auto* cfg) { return Launch<std::remove_pointer_t<decltype(cfg)>>(p, stream); };
  if (p.dim == 128) return DispatchSm90<128>(variant, launch);
  if (p.dim == 64) return DispatchSm90<64>(variant, launch);
  return cudaErrorInvalidValue;
}

int RvqEncodeSm90BlocksPerSm(int dim, int variant) {
  auto occ = [](auto* cfg) { return BlocksPerSm<std::remove_pointer_t<decltype(cfg)>>(); };
  if (dim == 128) return DispatchSm90<128>(variant, occ);
  if (dim == 64) return DispatchSm90<64>(variant, occ);
  return -1;
}

}  // namespace vqkv::kernels::cuda
