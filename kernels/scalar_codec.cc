// scalar: KIVI-style asymmetric uniform quantization (the baseline rvq must beat).
// Keys are quantized per channel in groups of `group` consecutive tokens; values per token in
// groups of `group` consecutive channels (capped at head_dim). Each group stores an fp16 scale
// and an fp16 zero point (its minimum).
//
// Body layout (non-sink tokens only, T' = tokens - sinks, G = group, Gv = min(G, head_dim)):
//   K params: [layers, kv_heads, head_dim, ceil(T'/G)] x {scale, zero} fp16
//   V params: [layers, T', kv_heads, ceil(head_dim/Gv)] x {scale, zero} fp16
//   K codes:  [layers, kv_heads, head_dim, T'] packed `bits` each
//   V codes:  [layers, T', kv_heads, head_dim] packed `bits` each
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/bitpack.h"
#include "kernels/codec_impl.h"

namespace vqkv::kernels {
namespace {

class ScalarCodec final : public Codec {
 public:
  explicit ScalarCodec(const CodecSpec& spec) : Codec(spec) {}
  std::string Label() const override {
    return absl::StrCat("scalar-", spec_.scalar_bits, "/g", spec_.scalar_group);
  }
  CodecKind kind() const override { return CodecKind::kScalar; }

 protected:
  void FillHeader(PayloadHeader* h) const override {
    h->param = static_cast<uint8_t>(spec_.scalar_bits);
    h->group = spec_.scalar_group;
  }

  int64_t KGroups(const KvShape& s, int sinks) const {
    const int64_t t = s.tokens - sinks;
    return int64_t{s.layers} * s.kv_heads * s.head_dim * ((t + group_k() - 1) / group_k());
  }
  int64_t VGroups(const KvShape& s, int sinks) const {
    const int gv = group_v(s);
    return int64_t{s.layers} * (s.tokens - sinks) * s.kv_heads * ((s.head_dim + gv - 1) / gv);
  }
  int group_k() const { return spec_.scalar_group; }
  int group_v(const KvShape& s) const { return std::min(spec_.scalar_group, s.head_dim); }

  int64_t BodyBytes(const KvShape& s, int sinks, DType, int) const override {
    const int64_t n = int64_t{s.layers} * (s.tokens - sinks) * s.kv_heads * s.head_dim;
    return (KGroups(s, sinks) + VGroups(s, sinks)) * 4 + 2 * PackedBytes(n, spec_.scalar_bits);
  }

  // Quantizes `n` values read with `stride`; writes scale/zero (fp16) and appends codes.
  absl::Status QuantGroup(const float* x, int n, int64_t stride, uint16_t* params,
                          std::vector<uint8_t>* codes) const {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; ++i) {
      lo = std::min(lo, x[i * stride]);
      hi = std::max(hi, x[i * stride]);
    }
    const int levels = (1 << spec_.scalar_bits) - 1;
    params[0] = FloatToHalf((hi - lo) / levels);
    params[1] = FloatToHalf(lo);
    const float scale = HalfToFloat(params[0]), zero = HalfToFloat(params[1]);
    if (!std::isfinite(scale) || !std::isfinite(zero)) {
      return absl::InvalidArgumentError("scalar codec: values exceed the fp16 range of scale/zero");
    }
    for (int i = 0; i < n; ++i) {
      int q = scale > 0 ? static_cast<int>(std::lround((x[i * stride] - zero) / scale)) : 0;
      codes->push_back(static_cast<uint8_t>(std::clamp(q, 0, levels)));
    }
    return absl::OkStatus();
  }

  absl::Status EncodeBody(const PayloadHeader& h, const float* x,
                          std::string* body) const override {
    const KvShape s = HeaderShape(h);
    const int sinks = h.sink_tokens, t1 = s.tokens - sinks, gk = group_k(), gv = group_v(s);
    std::vector<uint16_t> kp(KGroups(s, sinks) * 2), vp(VGroups(s, sinks) * 2);
    std::vector<uint8_t> kc, vc;
    const int64_t n = int64_t{s.layers} * t1 * s.kv_heads * s.head_dim;
    kc.reserve(n);
    vc.reserve(n);
    uint16_t* p = kp.data();
    const int64_t tstride = int64_t{s.kv_heads} * s.head_dim;
    for (int l = 0; l < s.layers; ++l) {
      for (int hh = 0; hh < s.kv_heads; ++hh) {
        for (int d = 0; d < s.head_dim; ++d) {
          for (int t = 0; t < t1; t += gk) {
            const float* base = x + s.Offset(l, 0, sinks + t, hh) + d;
            auto st = QuantGroup(base, std::min(gk, t1 - t), tstride, p, &kc);
            if (!st.ok()) return st;
            p += 2;
          }
        }
      }
    }
    p = vp.data();
    for (int l = 0; l < s.layers; ++l) {
      for (int t = 0; t < t1; ++t) {
        for (int hh = 0; hh < s.kv_heads; ++hh) {
          for (int d = 0; d < s.head_dim; d += gv) {
            const float* base = x + s.Offset(l, 1, sinks + t, hh) + d;
            auto st = QuantGroup(base, std::min(gv, s.head_dim - d), 1, p, &vc);
            if (!st.ok()) return st;
            p += 2;
          }
        }
      }
    }
    body->append(reinterpret_cast<const char*>(kp.data()), kp.size() * 2);
    body->append(reinterpret_cast<const char*>(vp.data()), vp.size() * 2);
    {
      BitWriter w(body);
      for (uint8_t c : kc) w.Put(c, spec_.scalar_bits);
    }
    {
      BitWriter w(body);
      for (uint8_t c : vc) w.Put(c, spec_.scalar_bits);
    }
    return absl::OkStatus();
  }

  absl::Status DecodeBody(const PayloadHeader& h, std::string_view body, float* x) const override {
    if (h.param != spec_.scalar_bits || h.group != spec_.scalar_group) {
      return absl::InvalidArgumentError(absl::StrCat("payload: encoded with scalar-", int{h.param},
                                                     "/g", h.group, ", decoder is ", Label()));
    }
    const KvShape s = HeaderShape(h);
    const int sinks = h.sink_tokens, t1 = s.tokens - sinks, gk = group_k(), gv = group_v(s);
    const int bits = spec_.scalar_bits;
    const int64_t nkg = KGroups(s, sinks), nvg = VGroups(s, sinks);
    const int64_t n = int64_t{s.layers} * t1 * s.kv_heads * s.head_dim;
    std::vector<uint16_t> kp(nkg * 2), vp(nvg * 2);
    std::memcpy(kp.data(), body.data(), kp.size() * 2);
    std::memcpy(vp.data(), body.data() + kp.size() * 2, vp.size() * 2);
    const size_t codes_at = (kp.size() + vp.size()) * 2;
    BitReader rk(body.substr(codes_at, PackedBytes(n, bits)));
    BitReader rv(body.substr(codes_at + PackedBytes(n, bits)));
    const int64_t tstride = int64_t{s.kv_heads} * s.head_dim;
    const uint16_t* p = kp.data();
    for (int l = 0; l < s.layers; ++l) {
      for (int hh = 0; hh < s.kv_heads; ++hh) {
        for (int d = 0; d < s.head_dim; ++d) {
          for (int t = 0; t < t1; t += gk) {
            const float scale = HalfToFloat(p[0]), zero = HalfToFloat(p[1]);
            p += 2;
            float* base = x + s.Offset(l, 0, sinks + t, hh) + d;
            const int m = std::min(gk, t1 - t);
            for (int i = 0; i < m; ++i) base[i * tstride] = zero + scale * float(rk.Get(bits));
          }
        }
      }
    }
    p = vp.data();
    for (int l = 0; l < s.layers; ++l) {
      for (int t = 0; t < t1; ++t) {
        for (int hh = 0; hh < s.kv_heads; ++hh) {
          for (int d = 0; d < s.head_dim; d += gv) {
            const float scale = HalfToFloat(p[0]), zero = HalfToFloat(p[1]);
            p += 2;
            float* base = x + s.Offset(l, 1, sinks + t, hh) + d;
            const int m = std::min(gv, s.head_dim - d);
            for (int i = 0; i < m; ++i) base[i] = zero + scale * float(rv.Get(bits));
          }
        }
      }
    }
    return absl::OkStatus();
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Codec>> NewScalarCodec(const CodecSpec& spec) {
  if (spec.scalar_bits != 2 && spec.scalar_bits != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("scalar codec: bits must be 2 or 4, got ", spec.scalar_bits));
  }
  if (spec.scalar_group < 1 || spec.scalar_group > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("scalar codec: group must be in [1, 4096], got ", spec.scalar_group));
  }
  return std::unique_ptr<Codec>(new ScalarCodec(spec));
}

}  // namespace vqkv::kernels
