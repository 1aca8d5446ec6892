#include "kernels/cuda/gpu_rvq.h"

#include <algorithm>
#include <cstdint>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/device_buffer.h"

namespace vqkv::kernels::cuda {
namespace {

bool Aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

ElemType ToElem(DType t) { return static_cast<ElemType>(static_cast<int32_t>(t)); }

absl::Status CheckBlockShape(const RvqConfig& cfg, const KvShape& s, int sinks, int first_layer,
                             size_t b, const char* op) {
  VQKV_RETURN_IF_ERROR(ValidateShape(s));
  if (first_layer < 0 || first_layer + s.layers > cfg.layers || s.kv_heads != cfg.kv_heads ||
      s.head_dim != cfg.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": block ", b, " shape ", s.DebugString(), " at first_layer ", first_layer,
                     " does not match the codebook (layers=", cfg.layers,
                     ", kv_heads=", cfg.kv_heads, ", head_dim=", cfg.head_dim, ")"));
  }
  if (sinks < 0 || sinks > s.tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": block ", b, " sinks ", sinks, " outside [0, ", s.tokens, "]"));
  }
  return absl::OkStatus();
}

// Per-token prefix sums over the model's (layer, kind) segments of the code stream.
struct SegmentPrefix {
  std::vector<int64_t> codes;  // [2L + 1]
  std::vector<int64_t> bits;   // [2L + 1]
  std::vector<int32_t> width;  // [2L]
  int64_t Codes(int first_layer, int layers) const {
    return codes[2 * (first_layer + layers)] - codes[2 * first_layer];
  }
  int64_t Bits(int first_layer, int layers) const {
    return bits[2 * (first_layer + layers)] - bits[2 * first_layer];
  }
};

SegmentPrefix MakePrefix(const RvqConfig& cfg) {
  SegmentPrefix p;
  p.codes.push_back(0);
  p.bits.push_back(0);
  for (int l = 0; l < cfg.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const StageConfig& s = cfg.at(l, c);
      p.codes.push_back(p.codes.back() + int64_t(cfg.kv_heads) * s.stages);
      p.bits.push_back(p.bits.back() + int64_t(cfg.kv_heads) * s.stages * s.bits());
      p.width.push_back(s.bits());
    }
  }
  return p;
}

}  // namespace

int64_t RvqCodesPerToken(const RvqConfig& cfg, int first_layer, int layers) {
  return MakePrefix(cfg).Codes(first_layer, layers);
}

int64_t RvqBodyBytes(const RvqConfig& cfg, const KvShape& shape, int sinks, int first_layer) {
  return (int64_t(shape.tokens - sinks) * MakePrefix(cfg).Bits(first_layer, shape.layers) + 7) / 8;
}

absl::Status RvqEncodeCodes(const DeviceCodebook& cb, absl::Span<const DeviceKvBlock> blocks,
                            uint16_t* codes, cudaStream_t stream, const GpuRvqOptions& opts) {
  const RvqConfig& cfg = cb.config();
  if (blocks.empty()) return absl::OkStatus();
  if (codes == nullptr) return absl::InvalidArgumentError("rvq encode: null codes buffer");
  for (size_t b = 0; b < blocks.size(); ++b) {
    VQKV_RETURN_IF_ERROR(CheckBlockShape(cfg, blocks[b].shape, blocks[b].sinks,
                                         blocks[b].first_layer, b, "rvq encode"));
    if (static_cast<uint8_t>(blocks[b].dtype) > 2) {
      return absl::InvalidArgumentError(absl::StrCat("rvq encode: block ", b, ": unknown dtype"));
    }
    if (blocks[b].data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("rvq encode: block ", b, ": null data"));
    }
  }
  const SegmentPrefix pre = MakePrefix(cfg);
  const int D = cfg.head_dim, H = cfg.kv_heads;
  const bool tc = opts.tensor_cores && RvqEncodeHasTensorCorePath(D);
  const int tile_rows = RvqEncodeTileRows(D, opts.encode_variant);
  const int heads_per_table = cfg.per_head ? H : 1;
  const int num_tables = cb.num_tables();

  // Tables with the most work per row first, so the long tiles start early.
  std::vector<int> order(num_tables);
  std::iota(order.begin(), order.end(), 0);
  auto work = [&](int ti) {
    const RvqDeviceTable& t = cb.host_tables()[ti];
    return int64_t(t.stages) * t.size_pad;
  };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return work(a) > work(b); });

  // One launch per input dtype present (normally one).
  StreamScratch scratch(stream);
  int32_t* flag = nullptr;
  if (opts.check_finite) {
    VQKV_ASSIGN_OR_RETURN(flag, scratch.Alloc<int32_t>(1, "error flag"));
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flag, 0, sizeof(int32_t), stream),
                              "rvq encode: clear flag");
  }
  // One view of every table's fp16 codewords (rows of D) for the TMA encode configurations.
  const uint16_t* cb16_lo = nullptr;
  const uint16_t* cb16_hi = nullptr;
  for (const RvqDeviceTable& t : cb.host_tables()) {
    const uint16_t* end = t.cb16 + int64_t(t.stages) * t.size_pad * D;
    if (cb16_lo == nullptr || t.cb16 < cb16_lo) cb16_lo = t.cb16;
    if (cb16_hi == nullptr || end > cb16_hi) cb16_hi = end;
  }
  for (const RvqDeviceTable& t : cb.host_tables()) {
    if ((t.cb16 - cb16_lo) % D != 0) cb16_lo = nullptr;  // not whole rows: no tensor view
    if (cb16_lo == nullptr) break;
  }
  std::vector<int64_t> code_base(blocks.size() + 1, 0);
  for (size_t b = 0; b < blocks.size(); ++b) {
    code_base[b + 1] = code_base[b] + int64_t(blocks[b].shape.tokens - blocks[b].sinks) *
                                          pre.Codes(blocks[b].first_layer, blocks[b].shape.layers);
  }
  for (int dt = 0; dt < 3; ++dt) {
    std::vector<RvqSegment> segs;
    std::vector<RvqTile> tiles;
    for (int ti : order) {
      const int lc = ti / heads_per_table;
      const int ml = lc / 2, c = lc % 2;
      const int h = cfg.per_head ? ti % heads_per_table : 0;
      const int stages = cfg.at(ml, c).stages;
      const size_t first_seg = segs.size();
      for (size_t b = 0; b < blocks.size(); ++b) {
        const DeviceKvBlock& blk = blocks[b];
        if (static_cast<int>(blk.dtype) != dt) continue;
        const int l = ml - blk.first_layer;  // layer inside the block
        if (l < 0 || l >= blk.shape.layers) continue;
        const int t1 = blk.shape.tokens - blk.sinks;
        if (t1 == 0) continue;
        RvqSegment s;
        const int64_t off = blk.shape.Offset(l, c, blk.sinks, h);
        s.in = static_cast<const char*>(blk.data) + off * DTypeSize(blk.dtype);
        s.in_row_stride = cfg.per_head ? int64_t(H) * D : D;
        s.code_offset = code_base[b] +
                        int64_t(t1) * (pre.codes[lc] - pre.codes[2 * blk.first_layer]) +
                        int64_t(h) * stages;
        s.code_row_stride = cfg.per_head ? int64_t(H) * stages : stages;
        s.rows = cfg.per_head ? t1 : t1 * H;
        s.table = ti;
        segs.push_back(s);
      }
      // Cut this table's segments into tiles (a tile may span segments).
      size_t si = first_seg;
      int row = 0;
      while (si < segs.size()) {
        RvqTile t;
        t.segment = static_cast<int32_t>(si);
        t.row = row;
        t.table = ti;
        int n = 0;
        while (n < tile_rows && si < segs.size()) {
          const int take = std::min(tile_rows - n, segs[si].rows - row);
          n += take;
          row += take;
          if (row == segs[si].rows) {
            ++si;
            row = 0;
          }
        }
        t.rows = n;
        tiles.push_back(t);
      }
    }
    if (tiles.empty()) continue;
    RvqEncodeParams p;
    p.tables = cb.tables();
    VQKV_ASSIGN_OR_RETURN(p.segments, scratch.Upload(segs, "segments"));
    VQKV_ASSIGN_OR_RETURN(p.tiles, scratch.Upload(tiles, "tiles"));
    p.num_tiles = static_cast<int32_t>(tiles.size());
    p.dim = D;
    p.in_type = static_cast<ElemType>(dt);
    p.codes = codes;
    p.error_flag = flag;
    p.variant = opts.encode_variant;
    if (cb16_lo != nullptr) {
      p.cb16_base = cb16_lo;
      p.cb16_rows = (cb16_hi - cb16_lo) / D;
    }
    VQKV_CUDA_RETURN_IF_ERROR(tc ? LaunchRvqEncode(p, stream) : LaunchRvqEncodeExact(p, stream),
                              "rvq encode kernel");
  }
  if (opts.check_finite) {
    int32_t bad = 0;
    VQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(&bad, flag, sizeof bad, cudaMemcpyDeviceToHost, stream),
        "rvq encode: read flag");
    VQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "rvq encode");
    if (bad) return absl::InvalidArgumentError("rvq encode: input holds NaN or Inf");
  }
  return absl::OkStatus();
}

absl::Status RvqPackCodes(const DeviceCodebook& cb, absl::Span<const DeviceKvBlock> blocks,
                          const uint16_t* codes, absl::Span<uint8_t* const> bodies,
                          cudaStream_t stream) {
  const RvqConfig& cfg = cb.config();
  if (bodies.size() != blocks.size()) {
    return absl::InvalidArgumentError("rvq pack: blocks and bodies differ in count");
  }
  if (blocks.empty()) return absl::OkStatus();
  const SegmentPrefix pre = MakePrefix(cfg);
  std::vector<RvqPackBlock> pb(blocks.size());
  std::vector<int64_t> word_prefix(blocks.size() + 1, 0);
  int64_t code_at = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const DeviceKvBlock& blk = blocks[b];
    VQKV_RETURN_IF_ERROR(
        CheckBlockShape(cfg, blk.shape, blk.sinks, blk.first_layer, b, "rvq pack"));
    const int t1 = blk.shape.tokens - blk.sinks;
    const int64_t words = (int64_t(t1) * pre.Bits(blk.first_layer, blk.shape.layers) + 31) / 32;
    if (words > 0 && (bodies[b] == nullptr || !Aligned(bodies[b], 4))) {
      return absl::InvalidArgumentError(
          absl::StrCat("rvq pack: body ", b, " is null or not 4-byte aligned"));
    }
    pb[b].codes = codes + code_at;
    pb[b].body = reinterpret_cast<uint32_t*>(bodies[b]);
    pb[b].tokens = t1;
    pb[b].seg0 = 2 * blk.first_layer;
    pb[b].nseg = 2 * blk.shape.layers;
    code_at += int64_t(t1) * pre.Codes(blk.first_layer, blk.shape.layers);
    word_prefix[b + 1] = word_prefix[b] + words;
  }
  StreamScratch scratch(stream);
  RvqPackParams p;
  VQKV_ASSIGN_OR_RETURN(p.blocks, scratch.Upload(pb, "pack blocks"));
  VQKV_ASSIGN_OR_RETURN(p.word_prefix, scratch.Upload(word_prefix, "pack prefix"));
  p.num_blocks = static_cast<int32_t>(blocks.size());
  VQKV_ASSIGN_OR_RETURN(p.seg_codes, scratch.Upload(pre.codes, "seg codes"));
  VQKV_ASSIGN_OR_RETURN(p.seg_bits, scratch.Upload(pre.bits, "seg bits"));
  VQKV_ASSIGN_OR_RETURN(p.seg_width, scratch.Upload(pre.width, "seg width"));
  VQKV_CUDA_RETURN_IF_ERROR(LaunchRvqPack(p, word_prefix.back(), stream), "rvq pack kernel");
  return absl::OkStatus();
}

absl::Status RvqEncode(const DeviceCodebook& cb, absl::Span<const DeviceKvBlock> blocks,
                       absl::Span<uint8_t* const> bodies, cudaStream_t stream,
                       const GpuRvqOptions& opts) {
  if (bodies.size() != blocks.size()) {
    return absl::InvalidArgumentError("rvq encode: blocks and bodies differ in count");
  }
  int64_t total = 0;
  const SegmentPrefix pre = MakePrefix(cb.config());
  for (const DeviceKvBlock& b : blocks) {
    if (b.first_layer < 0 || b.first_layer + b.shape.layers > cb.config().layers) continue;
    total +=
        int64_t(std::max(0, b.shape.tokens - b.sinks)) * pre.Codes(b.first_layer, b.shape.layers);
  }
  StreamScratch scratch(stream);
  VQKV_ASSIGN_OR_RETURN(uint16_t * codes, scratch.Alloc<uint16_t>(size_t(total), "codes"));
  VQKV_RETURN_IF_ERROR(RvqEncodeCodes(cb, blocks, codes, stream, opts));
  return RvqPackCodes(cb, blocks, codes, bodies, stream);
}

absl::Status RvqDecode(const DeviceCodebook& cb, absl::Span<const DeviceRvqBody> blocks,
                       const KvLayout& layout, cudaStream_t stream, const GpuRvqOptions& opts) {
  const RvqConfig& cfg = cb.config();
  if (blocks.empty()) return absl::OkStatus();
  const int D = cfg.head_dim, H = cfg.kv_heads, L = cfg.layers;
  if (static_cast<uint8_t>(layout.dtype) > 2) {
    return absl::InvalidArgumentError("rvq decode: unknown output dtype");
  }
  // fp16 gathers exist for the tensor-core head dims only; others decode from fp32.
  const bool fp16_tab = opts.fp16_decode_tables && RvqEncodeHasTensorCorePath(D);
  const size_t align = RvqEncodeHasTensorCorePath(D) ? 16 : DTypeSize(layout.dtype);
  auto check_ptr = [&](const void* p, const std::string& what) -> absl::Status {
    if (p == nullptr || !Aligned(p, align)) {
      return absl::InvalidArgumentError(
          absl::StrCat("rvq decode: ", what, " is null or not ", align, "-byte aligned"));
    }
    return absl::OkStatus();
  };
  switch (layout.kind) {
    case KvLayoutKind::kContiguous:
      break;
    case KvLayoutKind::kVllm:
    case KvLayoutKind::kSglang:
      if (int(layout.layer_ptrs.size()) != L ||
          (layout.kind == KvLayoutKind::kSglang && int(layout.layer_ptrs2.size()) != L)) {
        return absl::InvalidArgumentError(
            absl::StrCat("rvq decode: layout needs one pointer per layer (", L, ")"));
      }
      for (int l = 0; l < L; ++l) {
        VQKV_RETURN_IF_ERROR(check_ptr(layout.layer_ptrs[l], absl::StrCat("layer ", l, " buffer")));
        if (layout.kind == KvLayoutKind::kSglang) {
          VQKV_RETURN_IF_ERROR(
              check_ptr(layout.layer_ptrs2[l], absl::StrCat("layer ", l, " V buffer")));
        }
      }
      if (layout.kind == KvLayoutKind::kSglang && layout.slots == nullptr) {
        return absl::InvalidArgumentError("rvq decode: SGLang layout needs token slots");
      }
      break;
    case KvLayoutKind::kTrtllm:
      VQKV_RETURN_IF_ERROR(check_ptr(layout.pool, "pool"));
      break;
    default:
      return absl::InvalidArgumentError("rvq decode: unknown layout");
  }
  const bool paged = layout.kind == KvLayoutKind::kVllm || layout.kind == KvLayoutKind::kTrtllm;
  const SegmentPrefix pre = MakePrefix(cfg);
  std::vector<RvqDecodeBlock> db(blocks.size());
  std::vector<KvScatterBlock> sb(blocks.size());
  const size_t nb1 = blocks.size() + 1;
  std::vector<int64_t> row_prefix(size_t(2 * L) * nb1, 0);
  int max_planes = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const DeviceRvqBody& in = blocks[b];
    VQKV_RETURN_IF_ERROR(CheckBlockShape(cfg, in.shape, in.sinks, in.first_layer, b, "rvq decode"));
    const int t1 = in.shape.tokens - in.sinks;
    if (t1 > 0 && (in.body == nullptr || !Aligned(in.body, 4))) {
      return absl::InvalidArgumentError(
          absl::StrCat("rvq decode: block ", b, " body is null or not 4-byte aligned"));
    }
    if (layout.kind == KvLayoutKind::kContiguous) {
      VQKV_RETURN_IF_ERROR(check_ptr(in.out, absl::StrCat("block ", b, " output")));
    }
    if (paged) {
      if (in.block_id < 0 || in.block_id >= layout.num_pages) {
        return absl::InvalidArgumentError(absl::StrCat("rvq decode: block ", b, " page ",
                                                       in.block_id, " outside [0, ",
                                                       layout.num_pages, ")"));
      }
      if (in.shape.tokens > layout.page_tokens) {
        return absl::InvalidArgumentError(absl::StrCat("rvq decode: block ", b, " has ",
                                                       in.shape.tokens, " tokens, pages hold ",
                                                       layout.page_tokens));
      }
    }
    db[b].body = reinterpret_cast<const uint32_t*>(in.body);
    db[b].out = in.out;
    db[b].slot_base = in.slot_base;
    db[b].tokens = in.shape.tokens;
    db[b].sinks = in.sinks;
    db[b].block_id = in.block_id;
    db[b].first_layer = in.first_layer;
    db[b].layers = in.shape.layers;
    for (int lc = 0; lc < 2 * L; ++lc) {
      const int l = lc / 2 - in.first_layer;
      const bool holds = l >= 0 && l < in.shape.layers;
      row_prefix[lc * nb1 + b + 1] = row_prefix[lc * nb1 + b] + (holds ? int64_t(t1) * H : 0);
    }
    if (in.sink_data != nullptr && in.sinks > 0) {
      if (static_cast<uint8_t>(in.sink_dtype) > 2) {
        return absl::InvalidArgumentError("rvq decode: unknown sink dtype");
      }
      sb[b].in = in.sink_data;
      sb[b].sinks = in.sinks;
      max_planes = std::max(max_planes, 2 * in.shape.layers);
    }
  }
  int64_t max_rows = 0;
  for (int lc = 0; lc < 2 * L; ++lc)
    max_rows = std::max(max_rows, row_prefix[lc * nb1 + blocks.size()]);
  StreamScratch scratch(stream);
  KvOutLayout out;
  out.kind = layout.kind;
  out.type = ToElem(layout.dtype);
  if (!layout.layer_ptrs.empty()) {
    VQKV_ASSIGN_OR_RETURN(void** lp, scratch.Upload(layout.layer_ptrs, "layer pointers"));
    out.layer_ptrs = lp;
  }
  if (!layout.layer_ptrs2.empty()) {
    VQKV_ASSIGN_OR_RETURN(void** lp2, scratch.Upload(layout.layer_ptrs2, "layer pointers"));
    out.layer_ptrs2 = lp2;
  }
  out.pool = layout.pool;
  out.slots = layout.slots;
  out.num_pages = layout.num_pages;
  out.page_tokens = layout.page_tokens;

  RvqDecodeParams p;
  p.tables = cb.tables();
  VQKV_ASSIGN_OR_RETURN(p.blocks, scratch.Upload(db, "decode blocks"));
  VQKV_ASSIGN_OR_RETURN(p.row_prefix, scratch.Upload(row_prefix, "row prefix"));
  VQKV_ASSIGN_OR_RETURN(p.seg_bits, scratch.Upload(pre.bits, "seg bits"));
  p.num_blocks = static_cast<int32_t>(blocks.size());
  p.layers = L;
  p.heads = H;
  p.dim = D;
  p.per_head = cfg.per_head;
  p.fp16_tables = fp16_tab;
  p.out = out;
  VQKV_CUDA_RETURN_IF_ERROR(LaunchRvqDecode(p, max_rows, stream), "rvq decode kernel");
  if (max_planes > 0) {
    // Sink rows are not 16-byte vectors in general, so this kernel needs element alignment only.
    for (size_t b = 0; b < blocks.size(); ++b)
      sb[b].pad = static_cast<int32_t>(blocks[b].sink_dtype);
    // One launch per sink dtype.
    for (int dt = 0; dt < 3; ++dt) {
      std::vector<KvScatterBlock> part = sb;
      bool any = false;
      for (size_t b = 0; b < part.size(); ++b) {
        if (part[b].in != nullptr && part[b].pad == dt) {
          any = true;
        } else {
          part[b].in = nullptr;
          part[b].sinks = 0;
        }
      }
      if (!any) continue;
      KvScatterParams sp;
      VQKV_ASSIGN_OR_RETURN(sp.src, scratch.Upload(part, "sink blocks"));
      sp.blocks = p.blocks;
      sp.num_blocks = p.num_blocks;
      sp.layers = L;
      sp.heads = H;
      sp.dim = D;
      sp.in_type = static_cast<ElemType>(dt);
      sp.out = out;
      VQKV_CUDA_RETURN_IF_ERROR(LaunchKvScatter(sp, max_planes, stream), "sink scatter kernel");
    }
  }
  return absl::OkStatus();
}

}  // namespace vqkv::kernels::cuda
