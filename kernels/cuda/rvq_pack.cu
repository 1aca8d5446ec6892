// Bit packing of rvq codes on the GPU: uint16 codes in stream order -> the LSB-first bit stream
// of kernels/bitpack.h. One thread per output word, so no two threads touch the same byte.
#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

constexpr int kPackThreads = 256;

__global__ void __launch_bounds__(kPackThreads)
    RvqPackKernel(const RvqPackParams p, int64_t total_words) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; w < total_words; w += stride) {
    // Block: the last one whose first word is <= w (blocks without words are skipped).
    int lo = 0, hi = p.num_blocks - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (p.word_prefix[mid] <= w) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const RvqPackBlock blk = p.blocks[lo];
    const int64_t lw = w - p.word_prefix[lo];
    const int64_t tokens = blk.tokens;
    const int64_t bits0 = p.seg_bits[blk.seg0];
    const int64_t codes0 = p.seg_codes[blk.seg0];
    const int send = blk.seg0 + blk.nseg;
    const int64_t total_bits = tokens * (p.seg_bits[send] - bits0);
    int64_t pos = lw * 32;
    const int64_t end = min(pos + 32, total_bits);
    // Segment: the last one starting at or before pos.
    int s0 = blk.seg0, s1 = send - 1;
    while (s0 < s1) {
      const int mid = (s0 + s1 + 1) >> 1;
      if (tokens * (p.seg_bits[mid] - bits0) <= pos) {
        s0 = mid;
      } else {
        s1 = mid - 1;
      }
    }
    int seg = s0;
    uint32_t out = 0;
    while (pos < end) {
      while (seg + 1 < send && pos >= tokens * (p.seg_bits[seg + 1] - bits0)) ++seg;
      const int width = p.seg_width[seg];
      const int64_t rel = pos - tokens * (p.seg_bits[seg] - bits0);
      const int64_t k = rel / width;
      const int off = static_cast<int>(rel - k * width);
      const uint32_t code = blk.codes[tokens * (p.seg_codes[seg] - codes0) + k];
      const int64_t room = end - pos;
      const int take = static_cast<int>(width - off < room ? width - off : room);
      out |= ((code >> off) & ((1u << take) - 1u)) << static_cast<int>(pos - lw * 32);
      pos += take;
    }
    blk.body[lw] = out;
  }
}

}  // namespace

cudaError_t LaunchRvqPack(const RvqPackParams& p, int64_t total_words, cudaStream_t stream) {
  if (total_words <= 0) return cudaSuccess;
  const int64_t blocks = (total_words + kPackThreads - 1) / kPackThreads;
  const int grid = static_cast<int>(blocks < 65536 * 8 ? blocks : 65536 * 8);
  RvqPackKernel<<<grid, kPackThreads, 0, stream>>>(p, total_words);
  return cudaGetLastError();
}

}  // namespace vqkv::kernels::cuda
