// raw: lossless passthrough. The body is the non-sink tokens in the input dtype.
#include <cstring>

#include "kernels/codec_impl.h"

namespace vqkv::kernels {
namespace {

class RawCodec final : public Codec {
 public:
  explicit RawCodec(const CodecSpec& spec) : Codec(spec) {}
  std::string Label() const override { return "raw"; }
  CodecKind kind() const override { return CodecKind::kRaw; }

 protected:
  absl::Status EncodeBody(const PayloadHeader& h, const float* x,
                          std::string* body) const override {
    const KvShape s = HeaderShape(h);
    const DType dt = static_cast<DType>(h.dtype);
    const size_t row = size_t(s.kv_heads) * s.head_dim;
    const size_t n = size_t(s.tokens - h.sink_tokens) * row;
    const size_t off = body->size();
    body->resize(off + size_t(BodyBytes(s, h.sink_tokens, dt, 0)));
    char* dst = body->data() + off;
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        FromFloat(x + s.Offset(l, c, h.sink_tokens, 0), n, dt, dst);
        dst += n * DTypeSize(dt);
      }
    }
    return absl::OkStatus();
  }
  absl::Status DecodeBody(const PayloadHeader& h, std::string_view body, float* x) const override {
    const KvShape s = HeaderShape(h);
    const DType dt = static_cast<DType>(h.dtype);
    const size_t n = size_t(s.tokens - h.sink_tokens) * s.kv_heads * s.head_dim;
    const char* src = body.data();
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        ToFloat(dt, src, n, x + s.Offset(l, c, h.sink_tokens, 0));
        src += n * DTypeSize(dt);
      }
    }
    return absl::OkStatus();
  }
  bool BytePassthrough() const override { return true; }

  absl::Status EncodeBodyBytes(const PayloadHeader& h, const char* block,
                               std::string* body) const override {
    const KvShape s = HeaderShape(h);
    const size_t esize = DTypeSize(static_cast<DType>(h.dtype));
    const size_t plane = size_t(s.tokens - h.sink_tokens) * s.kv_heads * s.head_dim * esize;
    const size_t off = body->size();
    body->resize(off + 2 * s.layers * plane);
    char* dst = body->data() + off;
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        std::memcpy(dst, block + s.Offset(l, c, h.sink_tokens, 0) * esize, plane);
        dst += plane;
      }
    }
    return absl::OkStatus();
  }

  absl::Status DecodeBodyBytes(const PayloadHeader& h, std::string_view body,
                               char* out) const override {
    const KvShape s = HeaderShape(h);
    const size_t esize = DTypeSize(static_cast<DType>(h.dtype));
    const size_t plane = size_t(s.tokens - h.sink_tokens) * s.kv_heads * s.head_dim * esize;
    const char* src = body.data();
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        std::memcpy(out + s.Offset(l, c, h.sink_tokens, 0) * esize, src, plane);
        src += plane;
      }
    }
    return absl::OkStatus();
  }

  int64_t BodyBytes(const KvShape& s, int sinks, DType dtype, int) const override {
    return int64_t{s.layers} * 2 * (s.tokens - sinks) * s.kv_heads * s.head_dim * DTypeSize(dtype);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Codec>> NewRawCodec(const CodecSpec& spec) {
  return std::unique_ptr<Codec>(new RawCodec(spec));
}

}  // namespace vqkv::kernels
