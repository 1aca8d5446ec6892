// Plain parameter structs and launchers of the rvq CUDA kernels (encode, pack, decode, table
// preparation). Everything here is raw device pointers; launchers enqueue on `stream` and return
// the launch's cudaError_t (they never synchronize). Host wrappers in gpu_rvq.h validate shapes
// and turn errors into absl::Status.
//
// Conventions (D = head_dim, "table" = one codebook of (layer, kind[, head])):
//   cb32   [stages, size, D]      fp32 codewords, exactly the Codebook's numbers
//   norms  [stages, size]         ||c||^2, fp32 of a double sum (== Codebook::Norms)
//   cb16   [stages, size_pad, D]  fp16(scale[s] * c), rows >= size are zero
//   cinit  [stages, size_pad]     -0.5 * scale[s]^2 * ||c||^2, -1e30 for rows >= size
//   scale  [stages]               power of two with max|scale * c| in [0.5, 1)
// size_pad = max(size, 64) (size is a power of two).
// Thread-safety: launchers are reentrant; concurrent launches must not share output buffers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vqkv::kernels::cuda {

// Element types; the values equal vqkv::DType's.
enum class ElemType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline constexpr int kRvqChunk = 64;  // codewords per shared-memory chunk (size_pad granularity)

struct RvqDeviceTable {
  const float* cb32 = nullptr;
  const float* norms = nullptr;
  const uint16_t* cb16 = nullptr;  // IEEE fp16 bits
  const float* cinit = nullptr;
  const float* scale = nullptr;
  int32_t stages = 0, size = 0, size_pad = 0, bits = 0;
};

// ---------------------------------------------------------------------------------------------
// Encode: greedy residual VQ of rows of D values.
//
// Work is described as segments (runs of rows of one table, strided in the input) cut into tiles
// of at most RvqEncodeTileRows(D) rows. A tile's rows all belong to one table and may run across
// consecutive segments of that table. For each row and stage the kernel finds the nearest
// codeword (fp16 tensor-core scores, fp32 accumulation, then the best two candidates rescored
// exactly in fp32 with ties to the lower index), subtracts it and writes its index:
//   codes[seg.code_offset + row * seg.code_row_stride + stage]   (uint16)
struct RvqSegment {
  const void* in = nullptr;     // first row of the segment, elements of `in_type`
  int64_t in_row_stride = 0;    // elements between consecutive rows
  int64_t code_offset = 0;      // index into codes of row 0, stage 0
  int64_t code_row_stride = 0;  // codes between consecutive rows
  int64_t aux_offset = -1;      // row index into residual_out / dist_out (-1: not written)
  int32_t rows = 0;
  int32_t table = 0;
};

struct RvqTile {
  int32_t segment = 0;  // first segment
  int32_t row = 0;      // first row inside it
  int32_t rows = 0;     // rows in the tile (<= RvqEncodeTileRows)
  int32_t table = 0;
};

struct RvqEncodeParams {
  const RvqDeviceTable* tables = nullptr;
  const RvqSegment* segments = nullptr;
  const RvqTile* tiles = nullptr;
  int32_t num_tiles = 0;
  int32_t dim = 0;
  ElemType in_type = ElemType::kF32;
  uint16_t* codes = nullptr;
  float* residual_out = nullptr;  // optional [*, D]: residual after the last stage
  float* dist_out = nullptr;      // optional [*]: squared distance to the last stage's codeword
  int32_t* error_flag = nullptr;  // set to 1 when an input value is NaN or Inf
  int32_t variant = 0;            // tile configuration (RvqEncodeVariantSupported)
  // Optional: when every table's cb16 lies at a whole number of rows of `dim` fp16 values from
  // cb16_base, within cb16_rows rows, variants 10-18 load the chunks with the tensor memory
  // accelerator through one tensor map over that range (else 10/11 run 8/9, and 12-18 the
  // cp.async kernel of 8 on their own tiles).
  const uint16_t* cb16_base = nullptr;
  int64_t cb16_rows = 0;
};

// Tile configurations (`variant`) of the tensor-core encode:
//   0  default: the fastest clean one for this device and head dim (15 on compute capability 9.0
//      for head_dim 64/128 when built with sm_90a, else 4)
//   1-3  mma.sync alternatives for head_dim 128 (see rvq_encode.cu)
//   4  mma.sync default tiles (any tensor-core head dim, any sm_80+ GPU)
//   5  wgmma (sm_90a), 128-row tiles, 2 CTAs per SM (rvq_encode_sm90.cu)
//   6  wgmma (sm_90a), 256-row tiles, 1 CTA per SM
//   7  wgmma (sm_90a), as 5 with each chunk split into two pipelined n32 halves
//   8  wgmma (sm_90a), 128-row tiles, 2 CTAs per SM, two accumulators per warpgroup so that
//      the next chunk's MMAs run during this chunk's epilogue
//   9  wgmma (sm_90a), as 8 with 256-row tiles, 1 CTA per SM
//   10, 11  as 8, 9 with the codeword chunks loaded by TMA (one thread, mbarriers); needs
//      cb16_base / cb16_rows, else runs 8 / 9
//   12, 13  ping-pong warpgroups (rvq_encode_sm90.cu): 1 CTA per SM of 2 / 3 independent
//      consumer warpgroups (128 / 192-row tiles) and a TMA producer warp (13: in a producer
//      warpgroup that hands registers to the consumers with setmaxnreg), staggered so that one
//      warpgroup's stage end overlaps the others' MMAs; needs cb16_base / cb16_rows, else runs
//      the cp.async kernel of 8 on the same tiles
//   14  as 13 with each chunk's score offsets loaded during the reduce two chunks before
//   15, 16  as 13, 14 where a stage end skips the exact rescore of row batches whose tensor-core
//      scores provably decide between the two candidates (identical codes; data-dependent);
//      15 is the sm_90 default
// Unsupported variants fall back to 0 everywhere. RvqEncodeTileRows gives the rows per tile of
// the configuration that runs (for head dims without a tensor-core kernel, the exact kernel's
// tile size); it and LaunchRvqEncode resolve `variant` the same way for the current device.
int RvqEncodeTileRows(int dim, int variant = 0);
bool RvqEncodeHasTensorCorePath(int dim);
bool RvqEncodeVariantSupported(int dim, int variant);
// The configuration `variant` resolves to on the current device (-1 without a tensor-core path).
int RvqEncodeResolvedVariant(int dim, int variant);
// CTAs per SM of that configuration (occupancy calculator; -1 if unknown).
int RvqEncodeBlocksPerSm(int dim, int variant);
// The tensor-core kernel (dim in {64, 96, 128, 256}); tables must have cb16/cinit/scale.
cudaError_t LaunchRvqEncode(const RvqEncodeParams& p, cudaStream_t stream);
// The exact fp32 kernel (any dim <= 1024; only cb32 and norms are used). Slow; a reference and
// a fallback for odd head dims.
cudaError_t LaunchRvqEncodeExact(const RvqEncodeParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Pack: uint16 codes -> the CPU codec's LSB-first bit stream (body of an rvq payload).
// Segments are the model's (layer, kind) planes, lc = layer*2 + kind; a block holding model
// layers [first_layer, first_layer + layers) covers segments [seg0, seg0 + nseg) with
// seg0 = 2*first_layer. Its codes are stored in stream order (l, c, t, h, stage): segment lc
// holds tokens * (seg_codes[lc+1] - seg_codes[lc]) codes of seg_width[lc] bits.
struct RvqPackBlock {
  const uint16_t* codes = nullptr;  // this block's codes
  uint32_t* body = nullptr;         // this block's output words (4-byte aligned)
  int32_t tokens = 0;               // non-sink tokens
  int32_t seg0 = 0;                 // first model segment
  int32_t nseg = 0;                 // segments in the block
  int32_t pad = 0;
};
struct RvqPackParams {
  const RvqPackBlock* blocks = nullptr;
  const int64_t* word_prefix = nullptr;  // [num_blocks + 1] output words before each block
  int32_t num_blocks = 0;
  const int64_t* seg_codes = nullptr;  // [2*layers + 1] model prefix of codes per token
  const int64_t* seg_bits = nullptr;   // [2*layers + 1] model prefix of bits per token
  const int32_t* seg_width = nullptr;  // [2*layers] bits per code
};
cudaError_t LaunchRvqPack(const RvqPackParams& p, int64_t total_words, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Decode: x^ = sum_s C_s[z_s], written straight into the caller's layout.
enum class KvLayoutKind : int32_t {
  kContiguous = 0,  // per block [layers, 2, tokens, heads, D] at blocks[b].out
  kVllm = 1,    // per layer (2, num_pages, page_tokens, heads, D) at layer_ptrs[l]; page = block_id
  kSglang = 2,  // per layer K [slots, heads, D] at layer_ptrs[l], V at layer_ptrs2[l];
                // token t of block b goes to slot slots[blocks[b].slot_base + t]
  kTrtllm = 3,  // pool [num_pages, layers, 2, heads, page_tokens, D]; page = block_id
};

struct KvOutLayout {
  KvLayoutKind kind = KvLayoutKind::kContiguous;
  ElemType type = ElemType::kF16;
  void* const* layer_ptrs = nullptr;   // vllm, sglang (K)
  void* const* layer_ptrs2 = nullptr;  // sglang (V)
  void* pool = nullptr;                // trtllm
  const int64_t* slots = nullptr;      // sglang
  int32_t num_pages = 0;               // vllm, trtllm
  int32_t page_tokens = 0;             // vllm, trtllm: tokens per page (>= block tokens)
};

struct RvqDecodeBlock {
  const uint32_t* body = nullptr;  // packed codes, 4-byte aligned, readable to a multiple of 4
  void* out = nullptr;             // contiguous layout only: [layers, 2, tokens, heads, D]
  int64_t slot_base = 0;           // sglang
  int32_t tokens = 0;              // all tokens of the block (sinks included)
  int32_t sinks = 0;               // leading tokens not in the codes
  int32_t block_id = 0;            // vllm / trtllm page
  int32_t first_layer = 0;         // model layer of the block's layer 0
  int32_t layers = 0;              // layers in the block
  int32_t pad = 0;
};

struct RvqDecodeParams {
  const RvqDeviceTable* tables = nullptr;  // (l*2 + c) * (per_head ? heads : 1) + head
  const RvqDecodeBlock* blocks = nullptr;
  // [2*layers][num_blocks + 1]: per model plane lc, prefix of (tokens - sinks) * heads over
  // blocks (blocks that do not hold layer lc/2 add nothing)
  const int64_t* row_prefix = nullptr;
  int32_t num_blocks = 0;
  int32_t layers = 0, heads = 0, dim = 0;  // the model's (codebook's) layers
  bool per_head = false;
  bool fp16_tables = true;            // gather from cb16 (half the bytes) instead of cb32
  const int64_t* seg_bits = nullptr;  // [2*layers + 1] model prefix of code bits per token
  KvOutLayout out;
};
// Decodes all non-sink tokens of all blocks; grid y = layer*2 + kind so that concurrently
// running CTAs share one layer's codebook in L2. max_rows: the largest plane's row count.
cudaError_t LaunchRvqDecode(const RvqDecodeParams& p, int64_t max_rows, cudaStream_t stream);

// Writes dense rows [layers, 2, sinks, heads, D] (`in_type`, one buffer per block: tokens
// [0, sinks) of that block) into the layout. Used for lossless sink tokens.
struct KvScatterBlock {
  const void* in = nullptr;  // [layers, 2, sinks, heads, D]
  int32_t sinks = 0;
  int32_t pad = 0;
};
struct KvScatterParams {
  const KvScatterBlock* src = nullptr;
  const RvqDecodeBlock* blocks = nullptr;  // destination description (same as decode's)
  int32_t num_blocks = 0;
  int32_t layers = 0, heads = 0, dim = 0;
  ElemType in_type = ElemType::kF16;
  KvOutLayout out;
};
// max_planes: the largest block's layers * 2.
cudaError_t LaunchKvScatter(const KvScatterParams& p, int32_t max_planes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Table preparation: from cb32 (+ norms, or computing them) fill cb16, cinit and scale.
struct RvqPrepTable {
  const float* cb32 = nullptr;
  float* norms = nullptr;  // read, or written when compute_norms
  uint16_t* cb16 = nullptr;
  float* cinit = nullptr;
  float* scale = nullptr;
  int32_t stages = 0, size = 0, size_pad = 0;
  int32_t compute_norms = 0;
};
cudaError_t LaunchRvqPrep(const RvqPrepTable* tables, int32_t num_tables, int32_t max_stages,
                          int32_t dim, cudaStream_t stream);

}  // namespace vqkv::kernels::cuda
