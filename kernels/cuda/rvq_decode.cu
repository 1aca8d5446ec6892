// rvq decode: x^ = sum over stages of the selected codewords, written straight into the
// caller's KV layout (contiguous, vLLM paged, SGLang per-layer, TensorRT-LLM pool).
//
// A group of LPV lanes reconstructs one vector with 16-byte codeword loads (8 fp16 or 4 fp32
// values per lane and load). Each lane extracts a few of the vector's codes from the packed
// stream and the group shares them with shuffles, so the codeword gathers of consecutive stages
// are independent loads in flight together. Grid y is (layer, kind): CTAs that run together
// read the same layer's tables, which then stay in L2 (one layer of LLaMA-3.1-8B keys is 14.7 MB
// in fp16, 29 MB in fp32).
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

using detail::ReadBits;

constexpr int kDecodeThreads = 256;

__device__ __forceinline__ int ElemSize(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }

// Pointer to element 0 of row (l, c, t, h) of block `blk` in the output layout.
// l: layer inside the block (contiguous layout); ml: model layer (paged layouts).
__device__ __forceinline__ char* OutRow(const KvOutLayout& L, const RvqDecodeBlock& blk, int layers,
                                        int heads, int dim, int l, int ml, int c, int t, int h) {
  const int64_t es = ElemSize(L.type);
  int64_t e = 0;
  char* base = nullptr;
  switch (L.kind) {
    case KvLayoutKind::kContiguous:
      base = static_cast<char*>(blk.out);
      e = (((int64_t(l) * 2 + c) * blk.tokens + t) * heads + h) * dim;
      break;
    case KvLayoutKind::kVllm:
      base = static_cast<char*>(L.layer_ptrs[ml]);
      e = ((int64_t(c) * L.num_pages + blk.block_id) * L.page_tokens + t) * heads * dim +
          int64_t(h) * dim;
      break;
    case KvLayoutKind::kSglang:
      base = static_cast<char*>(c == 0 ? L.layer_ptrs[ml] : L.layer_ptrs2[ml]);
      e = (L.slots[blk.slot_base + t] * heads + h) * dim;
      break;
    case KvLayoutKind::kTrtllm:
      base = static_cast<char*>(L.pool);
      e = ((((int64_t(blk.block_id) * layers + ml) * 2 + c) * heads + h) * L.page_tokens + t) * dim;
      break;
  }
  return base + e * es;
}

__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <int N>
__device__ __forceinline__ void StoreVec(char* dst, ElemType t, const float (&v)[N]) {
  if (t == ElemType::kF32) {
    float* o = reinterpret_cast<float*>(dst);
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      *reinterpret_cast<float4*>(o + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
    return;
  }
  uint32_t w[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    w[i] = t == ElemType::kF16 ? detail::PackHalf2(v[2 * i], v[2 * i + 1])
                               : PackBf16x2(v[2 * i], v[2 * i + 1]);
  }
  if constexpr (N == 8) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  }
}

__device__ __forceinline__ int FindBlock(const int64_t* prefix, int n, int64_t v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= v) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__host__ __device__ constexpr int Pow2Ceil(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <int D, bool kF16Tab>
__global__ void __launch_bounds__(kDecodeThreads) RvqDecodeKernel(const RvqDecodeParams p) {
  constexpr int kVec = kF16Tab ? 8 : 4;  // elements per 16-byte load
  constexpr int kNeed = D / kVec;        // 16-byte chunks per vector
  constexpr int kLpv = kNeed >= 32 ? 32 : Pow2Ceil(kNeed);
  constexpr int kCh = (kNeed + kLpv - 1) / kLpv;  // chunks per lane
  constexpr int kVpw = 32 / kLpv;                 // vectors per warp
  static_assert(D % kVec == 0, "head_dim must be a multiple of the vector width");

  const int lane = threadIdx.x & 31;
  const int li = lane % kLpv;
  const int lc = blockIdx.y;
  const int ml = lc >> 1, c = lc & 1;
  const int64_t* prefix = p.row_prefix + int64_t(lc) * (p.num_blocks + 1);
  const int64_t rows = prefix[p.num_blocks];
  const int64_t v0 = (int64_t(blockIdx.x) * (kDecodeThreads / 32) + (threadIdx.x >> 5)) * kVpw;
  if (v0 >= rows) return;  // the whole warp is past this plane's rows
  const int64_t v = v0 + lane / kLpv;
  const bool active = v < rows;
  // Every lane of the warp runs the shuffles below; inactive groups only skip memory.
  const int64_t vv = active ? v : rows - 1;
  const int b = FindBlock(prefix, p.num_blocks, vv);
  const RvqDecodeBlock blk = p.blocks[b];
  const int64_t local = vv - prefix[b];
  const int tt = static_cast<int>(local / p.heads);
  const int h = static_cast<int>(local - int64_t(tt) * p.heads);
  const RvqDeviceTable tab = p.tables[p.per_head ? lc * p.heads + h : lc];
  const int stages = tab.stages, bits = tab.bits;
  const int64_t bit0 =
      int64_t(blk.tokens - blk.sinks) * (p.seg_bits[lc] - p.seg_bits[2 * blk.first_layer]) +
      local * stages * bits;

  float acc[kCh][kVec];
#pragma unroll
  for (int ch = 0; ch < kCh; ++ch) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[ch][i] = 0.f;
  }
  for (int m = 0; m < stages; m += kLpv) {
    const int i = m + li;
    const uint32_t mine =
        (active && i < stages) ? ReadBits(blk.body, bit0 + int64_t(i) * bits, bits) : 0u;
    const int cnt = min(kLpv, stages - m);
#pragma unroll 8
    for (int k = 0; k < cnt; ++k) {
      const uint32_t code = __shfl_sync(0xffffffffu, mine, k, kLpv);
      if (!active) continue;
      const int s = m + k;
      if constexpr (kF16Tab) {
        const float inv = 1.f / __ldg(tab.scale + s);
        const __half* row =
            reinterpret_cast<const __half*>(tab.cb16) + (int64_t(s) * tab.size_pad + code) * D;
#pragma unroll
        for (int ch = 0; ch < kCh; ++ch) {
          const int d = (ch * kLpv + li) * kVec;
          if (d < D) {
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + d));
            const __half2* hv = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float2 f = __half22float2(hv[e]);
              acc[ch][2 * e] = fmaf(f.x, inv, acc[ch][2 * e]);
              acc[ch][2 * e + 1] = fmaf(f.y, inv, acc[ch][2 * e + 1]);
            }
          }
        }
      } else {
        const float* row = tab.cb32 + (int64_t(s) * tab.size + code) * D;
#pragma unroll
        for (int ch = 0; ch < kCh; ++ch) {
          const int d = (ch * kLpv + li) * kVec;
          if (d < D) {
            const float4 f = __ldg(reinterpret_cast<const float4*>(row + d));
            acc[ch][0] += f.x;
            acc[ch][1] += f.y;
            acc[ch][2] += f.z;
            acc[ch][3] += f.w;
          }
        }
      }
    }
  }
  if (!active) return;
  char* out =
      OutRow(p.out, blk, p.layers, p.heads, D, ml - blk.first_layer, ml, c, blk.sinks + tt, h);
  const int es = ElemSize(p.out.type);
#pragma unroll
  for (int ch = 0; ch < kCh; ++ch) {
    const int d = (ch * kLpv + li) * kVec;
    if (d < D) StoreVec<kVec>(out + int64_t(d) * es, p.out.type, acc[ch]);
  }
}

// Any head_dim: one warp per vector, fp32 tables, scalar accesses.
__global__ void __launch_bounds__(kDecodeThreads) RvqDecodeGenericKernel(const RvqDecodeParams p) {
  const int lane = threadIdx.x & 31;
  const int lc = blockIdx.y;
  const int ml = lc >> 1, c = lc & 1;
  const int64_t* prefix = p.row_prefix + int64_t(lc) * (p.num_blocks + 1);
  const int64_t rows = prefix[p.num_blocks];
  const int64_t v = int64_t(blockIdx.x) * (kDecodeThreads / 32) + (threadIdx.x >> 5);
  if (v >= rows) return;
  const int D = p.dim;
  const int b = FindBlock(prefix, p.num_blocks, v);
  const RvqDecodeBlock blk = p.blocks[b];
  const int64_t local = v - prefix[b];
  const int tt = static_cast<int>(local / p.heads);
  const int h = static_cast<int>(local - int64_t(tt) * p.heads);
  const RvqDeviceTable tab = p.tables[p.per_head ? lc * p.heads + h : lc];
  const int64_t bit0 =
      int64_t(blk.tokens - blk.sinks) * (p.seg_bits[lc] - p.seg_bits[2 * blk.first_layer]) +
      local * tab.stages * tab.bits;
  char* out =
      OutRow(p.out, blk, p.layers, p.heads, D, ml - blk.first_layer, ml, c, blk.sinks + tt, h);
  for (int d0 = 0; d0 < D; d0 += 32) {
    const int d = d0 + lane;
    float acc = 0.f;
    for (int s = 0; s < tab.stages; ++s) {
      const uint32_t code = ReadBits(blk.body, bit0 + int64_t(s) * tab.bits, tab.bits);
      if (d < D) acc += tab.cb32[(int64_t(s) * tab.size + code) * D + d];
    }
    if (d < D) detail::StoreElem(out, d, p.out.type, acc);
  }
}

__global__ void __launch_bounds__(kDecodeThreads) KvScatterKernel(const KvScatterParams p) {
  const int b = blockIdx.x;
  const int lcl = blockIdx.y;  // plane inside the block
  const KvScatterBlock src = p.src[b];
  const RvqDecodeBlock blk = p.blocks[b];
  if (lcl >= blk.layers * 2 || src.in == nullptr) return;
  const int l = lcl >> 1, c = lcl & 1;
  const int64_t row = int64_t(p.heads) * p.dim;
  const int64_t n = int64_t(src.sinks) * row;
  const int64_t in0 = int64_t(lcl) * src.sinks * row;
  for (int64_t i = threadIdx.x; i < n; i += kDecodeThreads) {
    const int t = static_cast<int>(i / row);
    const int h = static_cast<int>((i - t * row) / p.dim);
    const int d = static_cast<int>(i - t * row - int64_t(h) * p.dim);
    const float v = detail::LoadElem(src.in, in0 + i, p.in_type);
    char* out = OutRow(p.out, blk, p.layers, p.heads, p.dim, l, blk.first_layer + l, c, t, h);
    detail::StoreElem(out, d, p.out.type, v);
  }
}

template <int D>
cudaError_t LaunchTyped(const RvqDecodeParams& p, int64_t max_rows, cudaStream_t stream) {
  const int lpv_f16 = (D / 8) >= 32 ? 32 : Pow2Ceil(D / 8);
  const int lpv_f32 = (D / 4) >= 32 ? 32 : Pow2Ceil(D / 4);
  const int vpc = (kDecodeThreads / 32) * (32 / (p.fp16_tables ? lpv_f16 : lpv_f32));
  const dim3 grid(static_cast<unsigned>((max_rows + vpc - 1) / vpc), p.layers * 2);
  if (p.fp16_tables) {
    RvqDecodeKernel<D, true><<<grid, kDecodeThreads, 0, stream>>>(p);
  } else {
    RvqDecodeKernel<D, false><<<grid, kDecodeThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchRvqDecode(const RvqDecodeParams& p, int64_t max_rows, cudaStream_t stream) {
  if (max_rows <= 0) return cudaSuccess;
  switch (p.dim) {
    case 64:
      return LaunchTyped<64>(p, max_rows, stream);
    case 96:
      return LaunchTyped<96>(p, max_rows, stream);
    case 128:
      return LaunchTyped<128>(p, max_rows, stream);
    case 256:
      return LaunchTyped<256>(p, max_rows, stream);
    default: {
      if (p.fp16_tables) return cudaErrorInvalidValue;
      const dim3 grid(static_cast<unsigned>((max_rows + 7) / 8), p.layers * 2);
      RvqDecodeGenericKernel<<<grid, kDecodeThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
}

cudaError_t LaunchKvScatter(const KvScatterParams& p, int32_t max_planes, cudaStream_t stream) {
  if (p.num_blocks == 0 || max_planes == 0) return cudaSuccess;
  KvScatterKernel<<<dim3(p.num_blocks, max_planes), kDecodeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vqkv::kernels::cuda
