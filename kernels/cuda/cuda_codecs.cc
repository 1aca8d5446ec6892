// rvq-cuda and scalar-cuda: Codec implementations over gpu_rvq / gpu_scalar. Payload framing
// (header, sink tokens) is the CPU codecs' (codec.cc); only the body is computed on the GPU.
#include "kernels/cuda/cuda_codecs.h"

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/codebook.h"
#include "kernels/codec_impl.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/device_codebook.h"
#include "kernels/cuda/gpu_rvq.h"
#include "kernels/cuda/gpu_scalar.h"

namespace vqkv::kernels::cuda {
namespace {

constexpr char kMagic[4] = {'V', 'Q', 'K', 'B'};

size_t Round4(size_t n) { return (n + 3) & ~size_t{3}; }
size_t Round256(size_t n) { return (n + 255) & ~size_t{255}; }

bool SameGeometry(const KvShape& a, const KvShape& b) {
  return a.layers == b.layers && a.kv_heads == b.kv_heads && a.head_dim == b.head_dim;
}

int SinksOf(int sink_tokens, int64_t first_token, int tokens) {
  if (first_token >= sink_tokens) return 0;
  return static_cast<int>(std::min<int64_t>(sink_tokens - first_token, tokens));
}

// Makes `device` current and owns a stream for one call; restores the previous device. Declare
// it before any StreamScratch of the call so the scratch is released first.
class CallContext {
 public:
  CallContext() = default;
  CallContext(const CallContext&) = delete;
  CallContext& operator=(const CallContext&) = delete;
  ~CallContext() {
    if (stream_ != nullptr) {
      (void)cudaStreamSynchronize(stream_);
      (void)cudaStreamDestroy(stream_);
    }
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  absl::Status Init(int device, const char* op) {
    VQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&prev_), op);
    VQKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), op);
    VQKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), op);
    return absl::OkStatus();
  }
  cudaStream_t stream() const { return stream_; }
  absl::Status Sync(const char* op) {
    VQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_), op);
    return absl::OkStatus();
  }

 private:
  int prev_ = -1;
  cudaStream_t stream_ = nullptr;
};

absl::Status ToDevice(void* dst, const void* src, size_t bytes, cudaStream_t s, const char* op) {
  if (bytes == 0) return absl::OkStatus();
  VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s), op);
  return absl::OkStatus();
}
absl::Status ToHost(void* dst, const void* src, size_t bytes, cudaStream_t s, const char* op) {
  if (bytes == 0) return absl::OkStatus();
  VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s), op);
  return absl::OkStatus();
}

// Builds the header and sink bytes of a payload exactly as Codec::Encode does.
absl::StatusOr<std::string> PayloadPrefix(const Codec& codec, const KvBlockView& blk, size_t b,
                                          const PayloadHeader& fill, int* sinks_out) {
  if (static_cast<uint8_t>(blk.dtype) > 2) {
    return absl::InvalidArgumentError(absl::StrCat("block ", b, ": unsupported dtype"));
  }
  if (blk.data == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("block ", b, ": null data"));
  if (blk.first_token < 0) {
    return absl::InvalidArgumentError(absl::StrCat("block ", b, ": first_token must be >= 0"));
  }
  const KvShape& s = blk.shape;
  const int sinks = SinksOf(codec.spec().sink_tokens, blk.first_token, s.tokens);
  PayloadHeader h = fill;
  std::memcpy(h.magic, kMagic, 4);
  h.version = 1;
  h.kind = static_cast<uint8_t>(codec.kind());
  h.dtype = static_cast<uint8_t>(blk.dtype);
  h.layers = s.layers;
  h.tokens = s.tokens;
  h.kv_heads = s.kv_heads;
  h.head_dim = s.head_dim;
  h.sink_tokens = sinks;
  h.first_layer = blk.first_layer;
  h.first_token = HeaderFirstToken(blk.first_token);
  const size_t esize = DTypeSize(blk.dtype);
  const size_t row = size_t(s.kv_heads) * s.head_dim;
  std::string payload(reinterpret_cast<const char*>(&h), sizeof h);
  payload.resize(sizeof h + size_t(s.layers) * 2 * sinks * row * esize);
  std::vector<float> f(sinks * row);
  for (int l = 0; l < s.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const char* src = static_cast<const char*>(blk.data) + s.Offset(l, c, 0, 0) * esize;
      std::memcpy(payload.data() + sizeof h + (size_t(l) * 2 + c) * sinks * row * esize, src,
                  sinks * row * esize);
      // The GPU checks the coded tokens; the sink tokens are checked here, as the CPU does.
      ToFloat(blk.dtype, src, f.size(), f.data());
      for (float v : f) {
        if (!std::isfinite(v)) {
          return absl::InvalidArgumentError(
              absl::StrCat("block ", b, ": a sink value is NaN or Inf"));
        }
      }
    }
  }
  *sinks_out = sinks;
  return payload;
}

// Validates a payload for `codec` and returns its header, as Codec::Decode does.
absl::StatusOr<PayloadHeader> CheckPayload(const Codec& codec, std::string_view payload, size_t b,
                                           DType out_dtype, size_t out_bytes, const void* out,
                                           int64_t body_bytes_for_shape) {
  VQKV_ASSIGN_OR_RETURN(PayloadHeader h, ReadPayloadHeader(payload));
  if (h.kind != static_cast<uint8_t>(codec.kind())) {
    return absl::InvalidArgumentError(absl::StrCat("payload ", b, ": encoded by codec kind ",
                                                   int{h.kind}, ", not by ", codec.Label()));
  }
  const KvShape shape = HeaderShape(h);
  const int64_t n = shape.elements();
  if (out == nullptr || out_bytes < size_t(n) * DTypeSize(out_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("payload ", b, ": output buffer holds ",
                                                   out_bytes, " bytes, needs ",
                                                   n * DTypeSize(out_dtype)));
  }
  const size_t row = size_t(shape.kv_heads) * shape.head_dim;
  const size_t sink_bytes =
      size_t(shape.layers) * 2 * h.sink_tokens * row * DTypeSize(static_cast<DType>(h.dtype));
  const int64_t want = int64_t{sizeof(PayloadHeader)} + int64_t(sink_bytes) + body_bytes_for_shape;
  if (int64_t(payload.size()) != want) {
    return absl::InvalidArgumentError(absl::StrCat("payload ", b, ": ", payload.size(),
                                                   " bytes, expected ", want, " for shape ",
                                                   shape.DebugString()));
  }
  return h;
}

// ---------------------------------------------------------------------------------------------
class CudaRvqCodec final : public Codec {
 public:
  CudaRvqCodec(const CodecSpec& spec, std::shared_ptr<const DeviceCodebook> dcb)
      : Codec(spec), dcb_(std::move(dcb)), device_(dcb_->device()) {
    const std::string raw = absl::HexStringToBytes(dcb_->codebook().id());
    std::memcpy(tag_, raw.data(), 8);
  }
  std::string Label() const override {
    return absl::StrCat("rvq-cuda(", dcb_->config().ToString(), ")");
  }
  CodecKind kind() const override { return CodecKind::kRvq; }

  absl::Status EncodeBatched(absl::Span<const KvBlockView> blocks,
                             std::vector<std::string>* out) const override {
    return EncodeBatchImpl(blocks, out);
  }
  absl::Status DecodeBatched(absl::Span<const std::string_view> payloads, DType out_dtype,
                             absl::Span<void* const> out,
                             absl::Span<const size_t> out_bytes) const override {
    return DecodeBatchImpl(payloads, out_dtype, out, out_bytes);
  }

  absl::Status EncodeBatchImpl(absl::Span<const KvBlockView> blocks,
                               std::vector<std::string>* out) const;
  absl::Status DecodeBatchImpl(absl::Span<const std::string_view> payloads, DType out_dtype,
                               absl::Span<void* const> out,
                               absl::Span<const size_t> out_bytes) const;

 protected:
  void FillHeader(PayloadHeader* h) const override {
    h->param = 1;
    std::memcpy(h->codebook_tag, tag_, 8);
  }
  absl::Status CheckShape(const KvShape& s, int first_layer) const override {
    VQKV_RETURN_IF_ERROR(Codec::CheckShape(s, first_layer));
    const RvqConfig& c = dcb_->config();
    if (first_layer + s.layers > c.layers || s.kv_heads != c.kv_heads || s.head_dim != c.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rvq-cuda codec: block shape ", s.DebugString(), " at first_layer ", first_layer,
          " does not match codebook ", dcb_->codebook().id(), " (layers=", c.layers,
          ", kv_heads=", c.kv_heads, ", head_dim=", c.head_dim, ")"));
    }
    return absl::OkStatus();
  }
  int64_t BodyBytes(const KvShape& s, int sinks, DType, int first_layer) const override {
    return RvqBodyBytes(dcb_->config(), s, sinks, first_layer);
  }
  absl::Status CheckTag(const PayloadHeader& h) const {
    if (std::memcmp(h.codebook_tag, tag_, 8) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("payload was encoded with codebook ",
                       absl::BytesToHexString(
                           absl::string_view(reinterpret_cast<const char*>(h.codebook_tag), 8)),
                       "..., decoder has ", dcb_->codebook().id()));
    }
    return absl::OkStatus();
  }

  absl::Status EncodeBody(const PayloadHeader& h, const float* x,
                          std::string* body) const override {
    const KvShape s = HeaderShape(h);
    const int64_t nb = BodyBytes(s, h.sink_tokens, DType::kF32, h.first_layer);
    if (nb == 0) return absl::OkStatus();
    CallContext ctx;
    VQKV_RETURN_IF_ERROR(ctx.Init(device_, "rvq-cuda encode"));
    StreamScratch scratch(ctx.stream());
    VQKV_ASSIGN_OR_RETURN(float* dx, scratch.Alloc<float>(size_t(s.elements()), "block"));
    VQKV_ASSIGN_OR_RETURN(uint8_t * db, scratch.Alloc<uint8_t>(Round4(nb), "body"));
    VQKV_RETURN_IF_ERROR(ToDevice(dx, x, size_t(s.elements()) * 4, ctx.stream(), "upload block"));
    const DeviceKvBlock blk{s, DType::kF32, dx, h.sink_tokens, h.first_layer};
    uint8_t* bodies[1] = {db};
    GpuRvqOptions opts;
    opts.check_finite = false;  // Codec::Encode has checked every value
    VQKV_RETURN_IF_ERROR(RvqEncode(*dcb_, {&blk, 1}, bodies, ctx.stream(), opts));
    const size_t old = body->size();
    body->resize(old + nb);
    VQKV_RETURN_IF_ERROR(ToHost(body->data() + old, db, nb, ctx.stream(), "download body"));
    return ctx.Sync("rvq-cuda encode");
  }

  absl::Status DecodeBody(const PayloadHeader& h, std::string_view body, float* x) const override {
    VQKV_RETURN_IF_ERROR(CheckTag(h));
    const KvShape s = HeaderShape(h);
    if (s.tokens == h.sink_tokens) return absl::OkStatus();
    CallContext ctx;
    VQKV_RETURN_IF_ERROR(ctx.Init(device_, "rvq-cuda decode"));
    StreamScratch scratch(ctx.stream());
    VQKV_ASSIGN_OR_RETURN(uint8_t * db, scratch.Alloc<uint8_t>(Round4(body.size()), "body"));
    VQKV_ASSIGN_OR_RETURN(float* dx, scratch.Alloc<float>(size_t(s.elements()), "block"));
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(db, 0, Round4(body.size()), ctx.stream()), "decode");
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dx, 0, size_t(s.elements()) * 4, ctx.stream()),
                              "decode");
    VQKV_RETURN_IF_ERROR(ToDevice(db, body.data(), body.size(), ctx.stream(), "upload body"));
    DeviceRvqBody in;
    in.shape = s;
    in.sinks = h.sink_tokens;
    in.body = db;
    in.out = dx;
    in.first_layer = h.first_layer;
    KvLayout layout;
    layout.dtype = DType::kF32;
    GpuRvqOptions opts;
    opts.fp16_decode_tables = false;  // the CPU's exact sums
    VQKV_RETURN_IF_ERROR(RvqDecode(*dcb_, {&in, 1}, layout, ctx.stream(), opts));
    VQKV_RETURN_IF_ERROR(ToHost(x, dx, size_t(s.elements()) * 4, ctx.stream(), "download block"));
    return ctx.Sync("rvq-cuda decode");
  }

 private:
  std::shared_ptr<const DeviceCodebook> dcb_;
  int device_;
  uint8_t tag_[8];
};

absl::Status CudaRvqCodec::EncodeBatchImpl(absl::Span<const KvBlockView> blocks,
                                           std::vector<std::string>* out) const {
  std::vector<std::string> payloads;
  std::vector<DeviceKvBlock> dev(blocks.size());
  std::vector<size_t> in_off(blocks.size()), body_off(blocks.size()), body_len(blocks.size());
  size_t in_total = 0, body_total = 0;
  PayloadHeader fill{};
  FillHeader(&fill);
  for (size_t b = 0; b < blocks.size(); ++b) {
    VQKV_RETURN_IF_ERROR(CheckShape(blocks[b].shape, blocks[b].first_layer));
    int sinks = 0;
    VQKV_ASSIGN_OR_RETURN(std::string p, PayloadPrefix(*this, blocks[b], b, fill, &sinks));
    payloads.push_back(std::move(p));
    dev[b] = DeviceKvBlock{blocks[b].shape, blocks[b].dtype, nullptr, sinks, blocks[b].first_layer};
    in_off[b] = in_total;
    in_total += Round256(size_t(blocks[b].shape.elements()) * DTypeSize(blocks[b].dtype));
    body_len[b] = size_t(BodyBytes(blocks[b].shape, sinks, blocks[b].dtype, blocks[b].first_layer));
    body_off[b] = body_total;
    body_total += Round256(body_len[b]);
  }
  if (blocks.empty()) return absl::OkStatus();
  CallContext ctx;
  VQKV_RETURN_IF_ERROR(ctx.Init(device_, "rvq-cuda encode"));
  StreamScratch scratch(ctx.stream());
  VQKV_ASSIGN_OR_RETURN(uint8_t * din, scratch.Alloc<uint8_t>(in_total, "blocks"));
  VQKV_ASSIGN_OR_RETURN(uint8_t * dbody, scratch.Alloc<uint8_t>(body_total, "bodies"));
  std::vector<uint8_t*> bodies(blocks.size());
  for (size_t b = 0; b < blocks.size(); ++b) {
    VQKV_RETURN_IF_ERROR(ToDevice(din + in_off[b], blocks[b].data,
                                  size_t(blocks[b].shape.elements()) * DTypeSize(blocks[b].dtype),
                                  ctx.stream(), "upload block"));
    dev[b].data = din + in_off[b];
    bodies[b] = dbody + body_off[b];
  }
  GpuRvqOptions opts;
  opts.check_finite = true;
  VQKV_RETURN_IF_ERROR(RvqEncode(*dcb_, dev, bodies, ctx.stream(), opts));
  std::vector<uint8_t> host(body_total);
  VQKV_RETURN_IF_ERROR(ToHost(host.data(), dbody, body_total, ctx.stream(), "download bodies"));
  VQKV_RETURN_IF_ERROR(ctx.Sync("rvq-cuda encode"));
  for (size_t b = 0; b < blocks.size(); ++b) {
    payloads[b].append(reinterpret_cast<const char*>(host.data() + body_off[b]), body_len[b]);
  }
  for (auto& p : payloads) out->push_back(std::move(p));
  return absl::OkStatus();
}

absl::Status CudaRvqCodec::DecodeBatchImpl(absl::Span<const std::string_view> payloads,
                                           DType out_dtype, absl::Span<void* const> out,
                                           absl::Span<const size_t> out_bytes) const {
  if (out.size() != payloads.size() || out_bytes.size() != payloads.size()) {
    return absl::InvalidArgumentError("decode: payloads, outputs and sizes differ in count");
  }
  if (static_cast<uint8_t>(out_dtype) > 2) return absl::InvalidArgumentError("decode: bad dtype");
  std::vector<PayloadHeader> hs;
  size_t body_total = 0, sink_total = 0, out_total = 0;
  std::vector<size_t> body_off, sink_off, out_off;
  for (size_t b = 0; b < payloads.size(); ++b) {
    VQKV_ASSIGN_OR_RETURN(PayloadHeader h, ReadPayloadHeader(payloads[b]));
    VQKV_RETURN_IF_ERROR(CheckShape(HeaderShape(h), h.first_layer));
    VQKV_ASSIGN_OR_RETURN(
        h, CheckPayload(*this, payloads[b], b, out_dtype, out_bytes[b], out[b],
                        BodyBytes(HeaderShape(h), h.sink_tokens, DType::kF32, h.first_layer)));
    VQKV_RETURN_IF_ERROR(CheckTag(h));
    const KvShape s = HeaderShape(h);
    const size_t sink_bytes = size_t(s.layers) * 2 * h.sink_tokens * s.kv_heads * s.head_dim *
                              DTypeSize(static_cast<DType>(h.dtype));
    body_off.push_back(body_total);
    body_total += Round256(payloads[b].size() - sizeof(PayloadHeader) - sink_bytes);
    sink_off.push_back(sink_total);
    sink_total += Round256(sink_bytes);
    out_off.push_back(out_total);
    out_total += Round256(size_t(s.elements()) * DTypeSize(out_dtype));
    hs.push_back(h);
  }
  if (payloads.empty()) return absl::OkStatus();
  CallContext ctx;
  VQKV_RETURN_IF_ERROR(ctx.Init(device_, "rvq-cuda decode"));
  StreamScratch scratch(ctx.stream());
  VQKV_ASSIGN_OR_RETURN(uint8_t * dbody, scratch.Alloc<uint8_t>(body_total, "bodies"));
  VQKV_ASSIGN_OR_RETURN(uint8_t * dsink, scratch.Alloc<uint8_t>(sink_total, "sinks"));
  VQKV_ASSIGN_OR_RETURN(uint8_t * dout, scratch.Alloc<uint8_t>(out_total, "outputs"));
  VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dbody, 0, body_total, ctx.stream()), "decode");
  std::vector<DeviceRvqBody> dev(payloads.size());
  for (size_t b = 0; b < payloads.size(); ++b) {
    const PayloadHeader& h = hs[b];
    const KvShape s = HeaderShape(h);
    const size_t sink_bytes = size_t(s.layers) * 2 * h.sink_tokens * s.kv_heads * s.head_dim *
                              DTypeSize(static_cast<DType>(h.dtype));
    const char* p = payloads[b].data() + sizeof(PayloadHeader);
    VQKV_RETURN_IF_ERROR(
        ToDevice(dsink + sink_off[b], p, sink_bytes, ctx.stream(), "upload sinks"));
    VQKV_RETURN_IF_ERROR(ToDevice(dbody + body_off[b], p + sink_bytes,
                                  payloads[b].size() - sizeof(PayloadHeader) - sink_bytes,
                                  ctx.stream(), "upload body"));
    DeviceRvqBody& d = dev[b];
    d.shape = s;
    d.sinks = h.sink_tokens;
    d.body = dbody + body_off[b];
    d.sink_data = h.sink_tokens > 0 ? dsink + sink_off[b] : nullptr;
    d.sink_dtype = static_cast<DType>(h.dtype);
    d.out = dout + out_off[b];
    d.first_layer = h.first_layer;
  }
  KvLayout layout;
  layout.dtype = out_dtype;
  GpuRvqOptions opts;
  opts.fp16_decode_tables = false;
  VQKV_RETURN_IF_ERROR(RvqDecode(*dcb_, dev, layout, ctx.stream(), opts));
  for (size_t b = 0; b < payloads.size(); ++b) {
    VQKV_RETURN_IF_ERROR(ToHost(out[b], dout + out_off[b],
                                size_t(HeaderShape(hs[b]).elements()) * DTypeSize(out_dtype),
                                ctx.stream(), "download output"));
  }
  return ctx.Sync("rvq-cuda decode");
}

// ---------------------------------------------------------------------------------------------
class CudaScalarCodec final : public Codec {
 public:
  CudaScalarCodec(const CodecSpec& spec, int device) : Codec(spec), device_(device) {}
  std::string Label() const override {
    return absl::StrCat("scalar-cuda-", spec_.scalar_bits, "/g", spec_.scalar_group);
  }
  CodecKind kind() const override { return CodecKind::kScalar; }

  // One launch needs one (layers, kv_heads, head_dim) for the whole batch; a mixed batch takes
  // the per-block path, so the contract stays Encode's/Decode's.
  absl::Status EncodeBatched(absl::Span<const KvBlockView> blocks,
                             std::vector<std::string>* out) const override {
    for (const KvBlockView& b : blocks) {
      if (!SameGeometry(b.shape, blocks[0].shape)) return Encode(blocks, out);
    }
    return EncodeBatchImpl(blocks, out);
  }
  absl::Status DecodeBatched(absl::Span<const std::string_view> payloads, DType out_dtype,
                             absl::Span<void* const> out,
                             absl::Span<const size_t> out_bytes) const override {
    KvShape first;
    for (size_t b = 0; b < payloads.size(); ++b) {
      absl::StatusOr<PayloadHeader> h = ReadPayloadHeader(payloads[b]);
      if (!h.ok()) return Decode(payloads, out_dtype, out, out_bytes);  // Decode reports it
      if (b == 0) first = HeaderShape(*h);
      if (!SameGeometry(HeaderShape(*h), first)) return Decode(payloads, out_dtype, out, out_bytes);
    }
    return DecodeBatchImpl(payloads, out_dtype, out, out_bytes);
  }

  absl::Status EncodeBatchImpl(absl::Span<const KvBlockView> blocks,
                               std::vector<std::string>* out) const;
  absl::Status DecodeBatchImpl(absl::Span<const std::string_view> payloads, DType out_dtype,
                               absl::Span<void* const> out,
                               absl::Span<const size_t> out_bytes) const;

 protected:
  ScalarSpec sspec() const { return ScalarSpec{spec_.scalar_bits, spec_.scalar_group}; }
  void FillHeader(PayloadHeader* h) const override {
    h->param = static_cast<uint8_t>(spec_.scalar_bits);
    h->group = spec_.scalar_group;
  }
  int64_t BodyBytes(const KvShape& s, int sinks, DType, int) const override {
    return ScalarBodyBytes(s, sinks, sspec());
  }
  absl::Status CheckParams(const PayloadHeader& h) const {
    if (h.param != spec_.scalar_bits || h.group != spec_.scalar_group) {
      return absl::InvalidArgumentError(absl::StrCat("payload: encoded with scalar-", int{h.param},
                                                     "/g", h.group, ", decoder is ", Label()));
    }
    return absl::OkStatus();
  }

  absl::Status EncodeBody(const PayloadHeader& h, const float* x,
                          std::string* body) const override {
    const KvShape s = HeaderShape(h);
    const int64_t nb = BodyBytes(s, h.sink_tokens, DType::kF32, 0);
    if (s.tokens == h.sink_tokens) return absl::OkStatus();
    CallContext ctx;
    VQKV_RETURN_IF_ERROR(ctx.Init(device_, "scalar-cuda encode"));
    StreamScratch scratch(ctx.stream());
    VQKV_ASSIGN_OR_RETURN(float* dx, scratch.Alloc<float>(size_t(s.elements()), "block"));
    VQKV_ASSIGN_OR_RETURN(uint8_t * db, scratch.Alloc<uint8_t>(Round4(nb), "body"));
    VQKV_RETURN_IF_ERROR(ToDevice(dx, x, size_t(s.elements()) * 4, ctx.stream(), "upload block"));
    DeviceScalarBlock blk;
    blk.shape = s;
    blk.sinks = h.sink_tokens;
    blk.in = dx;
    blk.body = db;
    const absl::Status st = ScalarQuantize({&blk, 1}, DType::kF32, sspec(), ctx.stream(), true);
    if (!st.ok()) {
      return absl::InvalidArgumentError("scalar codec: values exceed the fp16 range of scale/zero");
    }
    const size_t old = body->size();
    body->resize(old + nb);
    VQKV_RETURN_IF_ERROR(ToHost(body->data() + old, db, nb, ctx.stream(), "download body"));
    return ctx.Sync("scalar-cuda encode");
  }

  absl::Status DecodeBody(const PayloadHeader& h, std::string_view body, float* x) const override {
    VQKV_RETURN_IF_ERROR(CheckParams(h));
    const KvShape s = HeaderShape(h);
    if (s.tokens == h.sink_tokens) return absl::OkStatus();
    CallContext ctx;
    VQKV_RETURN_IF_ERROR(ctx.Init(device_, "scalar-cuda decode"));
    StreamScratch scratch(ctx.stream());
    VQKV_ASSIGN_OR_RETURN(uint8_t * db, scratch.Alloc<uint8_t>(Round4(body.size()), "body"));
    VQKV_ASSIGN_OR_RETURN(float* dx, scratch.Alloc<float>(size_t(s.elements()), "block"));
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(db, 0, Round4(body.size()), ctx.stream()), "decode");
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dx, 0, size_t(s.elements()) * 4, ctx.stream()),
                              "decode");
    VQKV_RETURN_IF_ERROR(ToDevice(db, body.data(), body.size(), ctx.stream(), "upload body"));
    DeviceScalarBlock blk;
    blk.shape = s;
    blk.sinks = h.sink_tokens;
    blk.out = dx;
    blk.body = db;
    VQKV_RETURN_IF_ERROR(ScalarDequantize({&blk, 1}, DType::kF32, sspec(), ctx.stream()));
    VQKV_RETURN_IF_ERROR(ToHost(x, dx, size_t(s.elements()) * 4, ctx.stream(), "download block"));
    return ctx.Sync("scalar-cuda decode");
  }

 private:
  int device_;
};

absl::Status CudaScalarCodec::EncodeBatchImpl(absl::Span<const KvBlockView> blocks,
                                              std::vector<std::string>* out) const {
  std::vector<std::string> payloads;
  std::vector<DeviceScalarBlock> dev(blocks.size());
  std::vector<size_t> in_off(blocks.size()), body_off(blocks.size()), body_len(blocks.size());
  size_t in_total = 0, body_total = 0;
  PayloadHeader fill{};
  FillHeader(&fill);
  for (size_t b = 0; b < blocks.size(); ++b) {
    VQKV_RETURN_IF_ERROR(CheckShape(blocks[b].shape, blocks[b].first_layer));
    if (b > 0 && (blocks[b].shape.layers != blocks[0].shape.layers ||
                  blocks[b].shape.kv_heads != blocks[0].shape.kv_heads ||
                  blocks[b].shape.head_dim != blocks[0].shape.head_dim)) {
      return absl::InvalidArgumentError("scalar-cuda: a batch needs one layers/heads/head_dim");
    }
    int sinks = 0;
    VQKV_ASSIGN_OR_RETURN(std::string p, PayloadPrefix(*this, blocks[b], b, fill, &sinks));
    payloads.push_back(std::move(p));
    dev[b].shape = blocks[b].shape;
    dev[b].sinks = sinks;
    in_off[b] = in_total;
    in_total += Round256(size_t(blocks[b].shape.elements()) * DTypeSize(blocks[b].dtype));
    body_len[b] = size_t(BodyBytes(blocks[b].shape, sinks, blocks[b].dtype, 0));
    body_off[b] = body_total;
    body_total += Round256(body_len[b]);
  }
  if (blocks.empty()) return absl::OkStatus();
  CallContext ctx;
  VQKV_RETURN_IF_ERROR(ctx.Init(device_, "scalar-cuda encode"));
  StreamScratch scratch(ctx.stream());
  VQKV_ASSIGN_OR_RETURN(uint8_t * din, scratch.Alloc<uint8_t>(in_total, "blocks"));
  VQKV_ASSIGN_OR_RETURN(uint8_t * dbody, scratch.Alloc<uint8_t>(body_total, "bodies"));
  for (size_t b = 0; b < blocks.size(); ++b) {
    VQKV_RETURN_IF_ERROR(ToDevice(din + in_off[b], blocks[b].data,
                                  size_t(blocks[b].shape.elements()) * DTypeSize(blocks[b].dtype),
                                  ctx.stream(), "upload block"));
    dev[b].in = din + in_off[b];
    dev[b].body = dbody + body_off[b];
  }
  for (int dt = 0; dt < 3; ++dt) {
    std::vector<DeviceScalarBlock> part;
    for (size_t b = 0; b < blocks.size(); ++b) {
      if (static_cast<int>(blocks[b].dtype) == dt) part.push_back(dev[b]);
    }
    if (part.empty()) continue;
    const absl::Status st =
        ScalarQuantize(part, static_cast<DType>(dt), sspec(), ctx.stream(), true);
    if (!st.ok()) {
      if (absl::IsInvalidArgument(st)) {
        return absl::InvalidArgumentError(
            "scalar codec: a value is NaN/Inf or exceeds the fp16 range of scale/zero");
      }
      return st;
    }
  }
  std::vector<uint8_t> host(body_total);
  VQKV_RETURN_IF_ERROR(ToHost(host.data(), dbody, body_total, ctx.stream(), "download bodies"));
  VQKV_RETURN_IF_ERROR(ctx.Sync("scalar-cuda encode"));
  for (size_t b = 0; b < blocks.size(); ++b) {
    payloads[b].append(reinterpret_cast<const char*>(host.data() + body_off[b]), body_len[b]);
  }
  for (auto& p : payloads) out->push_back(std::move(p));
  return absl::OkStatus();
}

absl::Status CudaScalarCodec::DecodeBatchImpl(absl::Span<const std::string_view> payloads,
                                              DType out_dtype, absl::Span<void* const> out,
                                              absl::Span<const size_t> out_bytes) const {
  if (out.size() != payloads.size() || out_bytes.size() != payloads.size()) {
    return absl::InvalidArgumentError("decode: payloads, outputs and sizes differ in count");
  }
  if (static_cast<uint8_t>(out_dtype) > 2) return absl::InvalidArgumentError("decode: bad dtype");
  std::vector<PayloadHeader> hs;
  for (size_t b = 0; b < payloads.size(); ++b) {
    VQKV_ASSIGN_OR_RETURN(PayloadHeader h, ReadPayloadHeader(payloads[b]));
    VQKV_RETURN_IF_ERROR(CheckParams(h));
    VQKV_RETURN_IF_ERROR(CheckShape(HeaderShape(h), h.first_layer));
    VQKV_ASSIGN_OR_RETURN(h,
                          CheckPayload(*this, payloads[b], b, out_dtype, out_bytes[b], out[b],
                                       BodyBytes(HeaderShape(h), h.sink_tokens, DType::kF32, 0)));
    if (b > 0 && (h.layers != hs[0].layers || h.kv_heads != hs[0].kv_heads ||
                  h.head_dim != hs[0].head_dim)) {
      return absl::InvalidArgumentError("scalar-cuda: a batch needs one layers/heads/head_dim");
    }
    hs.push_back(h);
  }
  if (payloads.empty()) return absl::OkStatus();
  CallContext ctx;
  VQKV_RETURN_IF_ERROR(ctx.Init(device_, "scalar-cuda decode"));
  StreamScratch scratch(ctx.stream());
  std::vector<DeviceScalarBlock> dev(payloads.size());
  std::vector<size_t> out_off(payloads.size());
  size_t body_total = 0, out_total = 0;
  std::vector<size_t> body_off(payloads.size());
  for (size_t b = 0; b < payloads.size(); ++b) {
    const KvShape s = HeaderShape(hs[b]);
    body_off[b] = body_total;
    body_total += Round256(size_t(BodyBytes(s, hs[b].sink_tokens, DType::kF32, 0)));
    out_off[b] = out_total;
    out_total += Round256(size_t(s.elements()) * DTypeSize(out_dtype));
  }
  VQKV_ASSIGN_OR_RETURN(uint8_t * dbody, scratch.Alloc<uint8_t>(body_total, "bodies"));
  VQKV_ASSIGN_OR_RETURN(uint8_t * dout, scratch.Alloc<uint8_t>(out_total, "outputs"));
  VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dbody, 0, body_total, ctx.stream()), "decode");
  for (size_t b = 0; b < payloads.size(); ++b) {
    const PayloadHeader& h = hs[b];
    const KvShape s = HeaderShape(h);
    const size_t nb = size_t(BodyBytes(s, h.sink_tokens, DType::kF32, 0));
    VQKV_RETURN_IF_ERROR(ToDevice(dbody + body_off[b], payloads[b].data() + payloads[b].size() - nb,
                                  nb, ctx.stream(), "upload body"));
    dev[b].shape = s;
    dev[b].sinks = h.sink_tokens;
    dev[b].out = dout + out_off[b];
    dev[b].body = dbody + body_off[b];
  }
  VQKV_RETURN_IF_ERROR(ScalarDequantize(dev, out_dtype, sspec(), ctx.stream()));
  for (size_t b = 0; b < payloads.size(); ++b) {
    VQKV_RETURN_IF_ERROR(ToHost(out[b], dout + out_off[b],
                                size_t(HeaderShape(hs[b]).elements()) * DTypeSize(out_dtype),
                                ctx.stream(), "download output"));
  }
  VQKV_RETURN_IF_ERROR(ctx.Sync("scalar-cuda decode"));
  // Sink tokens: converted on the host from the payload, as Codec::Decode does.
  std::vector<float> f;
  for (size_t b = 0; b < payloads.size(); ++b) {
    const PayloadHeader& h = hs[b];
    if (h.sink_tokens == 0) continue;
    const KvShape s = HeaderShape(h);
    const DType in = static_cast<DType>(h.dtype);
    const size_t row = size_t(s.kv_heads) * s.head_dim;
    const size_t plane = size_t(h.sink_tokens) * row;
    f.resize(plane);
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        const char* src = payloads[b].data() + sizeof(PayloadHeader) +
                          (size_t(l) * 2 + c) * plane * DTypeSize(in);
        ToFloat(in, src, plane, f.data());
        FromFloat(f.data(), plane, out_dtype,
                  static_cast<char*>(out[b]) + s.Offset(l, c, 0, 0) * DTypeSize(out_dtype));
      }
    }
  }
  return absl::OkStatus();
}

struct DeviceCodebookCache {
  std::mutex mu;
  std::map<std::pair<int, std::string>, std::weak_ptr<const DeviceCodebook>> entries;
};

DeviceCodebookCache& Cache() {
  static DeviceCodebookCache* c = new DeviceCodebookCache;
  return *c;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const DeviceCodebook>> GetDeviceCodebook(
    std::shared_ptr<const Codebook> cb) {
  if (!cb) return absl::FailedPreconditionError("rvq-cuda: no codebook (fit or upload one first)");
  int device = 0;
  VQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device), "rvq-cuda: cudaGetDevice");
  DeviceCodebookCache& c = Cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const auto key = std::make_pair(device, cb->id());
  if (auto it = c.entries.find(key); it != c.entries.end()) {
    if (auto sp = it->second.lock()) return sp;
  }
  VQKV_ASSIGN_OR_RETURN(std::unique_ptr<DeviceCodebook> dcb, DeviceCodebook::Create(std::move(cb)));
  std::shared_ptr<const DeviceCodebook> sp(std::move(dcb));
  c.entries[key] = sp;
  return sp;
}

absl::StatusOr<std::unique_ptr<Codec>> NewCudaRvqCodec(const CodecSpec& spec) {
  if (!spec.codebook) {
    return absl::FailedPreconditionError("rvq-cuda codec: no codebook (fit or upload one first)");
  }
  if (spec.beam < 1 || spec.beam > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("rvq-cuda codec: beam must be in [1, 64], got ", spec.beam));
  }
  // Beam search, and codebooks with a code space (pre-RoPE keys, channel scales: the kernels
  // code vectors as given), run on the CPU codec; the payloads are the same format.
  if (spec.beam > 1 || spec.outliers > 0 || !spec.codebook->code_space().empty()) {
    return NewRvqCodec(spec);
  }
  if (!CudaDeviceAvailable()) {
    return absl::FailedPreconditionError("rvq-cuda codec: no CUDA device");
  }
  VQKV_ASSIGN_OR_RETURN(std::shared_ptr<const DeviceCodebook> dcb,
                        GetDeviceCodebook(spec.codebook));
  return std::unique_ptr<Codec>(new CudaRvqCodec(spec, std::move(dcb)));
}

absl::StatusOr<std::unique_ptr<Codec>> NewCudaScalarCodec(const CodecSpec& spec) {
  if (spec.scalar_bits != 2 && spec.scalar_bits != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("scalar-cuda codec: bits must be 2 or 4, got ", spec.scalar_bits));
  }
  if (spec.scalar_group < 1 || spec.scalar_group > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("scalar-cuda codec: group must be in [1, 4096], got ", spec.scalar_group));
  }
  if (!CudaDeviceAvailable()) {
    return absl::FailedPreconditionError("scalar-cuda codec: no CUDA device");
  }
  int device = 0;
  VQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device), "scalar-cuda: cudaGetDevice");
  return std::unique_ptr<Codec>(new CudaScalarCodec(spec, device));
}

bool RegisterCudaCodecs() {
  static const bool registered = [] {
    RegisterCodec("rvq-cuda", &NewCudaRvqCodec);
    RegisterCodec("scalar-cuda", &NewCudaScalarCodec);
    return true;
  }();
  (void)registered;
  return CudaDeviceAvailable();
}

absl::Status EncodeBatch(const Codec& codec, absl::Span<const KvBlockView> blocks,
                         std::vector<std::string>* out) {
  if (const auto* r = dynamic_cast<const CudaRvqCodec*>(&codec)) {
    return r->EncodeBatchImpl(blocks, out);
  }
  if (const auto* s = dynamic_cast<const CudaScalarCodec*>(&codec)) {
    return s->EncodeBatchImpl(blocks, out);
  }
  // A CPU codec (what rvq-cuda returns for beam search or a codebook with a code space).
  return codec.EncodeBatched(blocks, out);
}

absl::Status DecodeBatch(const Codec& codec, absl::Span<const std::string_view> payloads,
                         DType out_dtype, absl::Span<void* const> out,
                         absl::Span<const size_t> out_bytes) {
  if (const auto* r = dynamic_cast<const CudaRvqCodec*>(&codec)) {
    return r->DecodeBatchImpl(payloads, out_dtype, out, out_bytes);
  }
  if (const auto* s = dynamic_cast<const CudaScalarCodec*>(&codec)) {
    return s->DecodeBatchImpl(payloads, out_dtype, out, out_bytes);
  }
  return codec.DecodeBatched(payloads, out_dtype, out, out_bytes);
}

}  // namespace vqkv::kernels::cuda
