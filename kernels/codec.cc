#include "kernels/codec.h"

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "kernels/codec_impl.h"

namespace vqkv::kernels {
namespace {

constexpr char kMagic[4] = {'V', 'Q', 'K', 'B'};
constexpr int64_t kMaxElements = int64_t{1} << 34;  // 16 Gi elements: far past any real block

struct Registry {
  std::mutex mu;
  std::map<std::string, CodecFactory> factories;
  Registry() {
    factories["raw"] = &NewRawCodec;
    factories["scalar"] = &NewScalarCodec;
    factories["rvq"] = &NewRvqCodec;
  }
};

Registry& GetRegistry() {
  static Registry* r = new Registry;
  return *r;
}

int SinksOf(int sink_tokens, int64_t first_token, int tokens) {
  if (first_token >= sink_tokens) return 0;
  return static_cast<int>(std::min<int64_t>(sink_tokens - first_token, tokens));
}

// Copies tokens [0, sinks) of every (layer, kind) plane out of/into a block.
void CopySinks(const KvShape& s, int sinks, size_t esize, const char* block, char* sink_buf) {
  const size_t row = size_t(s.kv_heads) * s.head_dim * esize;
  for (int l = 0; l < s.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      std::memcpy(sink_buf + (size_t(l) * 2 + c) * sinks * row,
                  block + s.Offset(l, c, 0, 0) * esize, sinks * row);
    }
  }
}

// Index of the first NaN/Inf element (exponent bits all ones), or -1.
int64_t FirstNonFinite(DType dt, const void* data, int64_t n) {
  if (dt == DType::kF32) {
    const auto* p = static_cast<const uint32_t*>(data);
    for (int64_t i = 0; i < n; ++i) {
      if ((p[i] & 0x7f800000u) == 0x7f800000u) return i;
    }
    return -1;
  }
  const uint16_t mask = dt == DType::kF16 ? 0x7c00 : 0x7f80;
  const auto* p = static_cast<const uint16_t*>(data);
  for (int64_t i = 0; i < n; ++i) {
    if ((p[i] & mask) == mask) return i;
  }
  return -1;
}

}  // namespace

absl::Status Codec::EncodeBodyBytes(const PayloadHeader&, const char*, std::string*) const {
  return absl::UnimplementedError("codec has no byte-level encode");
}

absl::Status Codec::DecodeBodyBytes(const PayloadHeader&, std::string_view, char*) const {
  return absl::UnimplementedError("codec has no byte-level decode");
}

std::string KvShape::DebugString() const {
  return absl::StrCat("[layers=", layers, ", 2, tokens=", tokens, ", kv_heads=", kv_heads,
                      ", head_dim=", head_dim, "]");
}

absl::Status ValidateShape(const KvShape& s) {
  const std::pair<const char*, int32_t> dims[] = {{"layers", s.layers},
                                                  {"tokens", s.tokens},
                                                  {"kv_heads", s.kv_heads},
                                                  {"head_dim", s.head_dim}};
  for (const auto& [name, v] : dims) {
    if (v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("shape.", name, " must be positive, got ", v));
    }
  }
  if (s.elements() > kMaxElements) {
    return absl::InvalidArgumentError(absl::StrCat("shape ", s.DebugString(), " is too large"));
  }
  return absl::OkStatus();
}

absl::StatusOr<PayloadHeader> ReadPayloadHeader(std::string_view payload) {
  if (payload.size() < sizeof(PayloadHeader)) {
    return absl::InvalidArgumentError(
        absl::StrCat("payload: ", payload.size(), " bytes is shorter than its header"));
  }
  PayloadHeader h;
  std::memcpy(&h, payload.data(), sizeof h);
  if (std::memcmp(h.magic, kMagic, 4) != 0) {
    return absl::InvalidArgumentError("payload: bad magic (not a vqkv encoded block)");
  }
  if (h.version != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("payload: unsupported version ", int{h.version}));
  }
  if (h.kind > 2)
    return absl::InvalidArgumentError(absl::StrCat("payload: unknown codec kind ", int{h.kind}));
  if (h.dtype > 2)
    return absl::InvalidArgumentError(absl::StrCat("payload: unknown dtype ", int{h.dtype}));
  VQKV_RETURN_IF_ERROR(ValidateShape(HeaderShape(h)));
  if (h.sink_tokens < 0 || h.sink_tokens > h.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("payload: sink_tokens ", h.sink_tokens,
                                                   " outside [0, tokens=", h.tokens, "]"));
  }
  if (h.first_layer < 0) return absl::InvalidArgumentError("payload: negative first_layer");
  return h;
}

KvShape HeaderShape(const PayloadHeader& h) { return {h.layers, h.tokens, h.kv_heads, h.head_dim}; }

absl::StatusOr<CodecSpec> ParseCodecSpec(std::string_view text_in) {
  const std::string text(text_in);
  CodecSpec spec;
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  std::string name = parts[0];
  if (name == "scalar-2" || name == "scalar-4") {
    spec.scalar_bits = name.back() - '0';
    name = "scalar";
  }
  spec.name = name;
  for (size_t i = 1; i < parts.size(); ++i) {
    for (absl::string_view kv : absl::StrSplit(parts[i], ',')) {
      std::pair<std::string, std::string> p = absl::StrSplit(kv, absl::MaxSplits('=', 1));
      int v = 0;
      if (!absl::SimpleAtoi(p.second, &v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("codec '", text, "': '", kv, "' is not key=integer"));
      }
      if (p.first == "sinks") {
        spec.sink_tokens = v;
      } else if (p.first == "bits") {
        spec.scalar_bits = v;
      } else if (p.first == "group") {
        spec.scalar_group = v;
      } else if (p.first == "beam") {
        spec.beam = v;
      } else if (p.first == "outliers") {
        spec.outliers = v;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("codec '", text, "': unknown parameter '", p.first, "'"));
      }
    }
  }
  if (spec.sink_tokens < 0) return absl::InvalidArgumentError("codec: sinks must be >= 0");
  return spec;
}

std::string CodecSpecString(const CodecSpec& spec) {
  if (spec.name == "scalar") {
    return absl::StrCat("scalar-", spec.scalar_bits, ":group=", spec.scalar_group,
                        ",sinks=", spec.sink_tokens);
  }
  if (spec.name == "rvq") {
    return absl::StrCat("rvq:beam=", spec.beam, ",sinks=", spec.sink_tokens,
                        spec.outliers > 0 ? absl::StrCat(",outliers=", spec.outliers) : "");
  }
  return absl::StrCat(spec.name, ":sinks=", spec.sink_tokens);
}

bool RegisterCodec(const std::string& name, CodecFactory factory) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> l(r.mu);
  r.factories[name] = std::move(factory);
  return true;
}

std::vector<std::string> RegisteredCodecs() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> l(r.mu);
  std::vector<std::string> names;
  for (const auto& [k, v] : r.factories) names.push_back(k);
  return names;
}

absl::StatusOr<std::unique_ptr<Codec>> CreateCodec(const CodecSpec& spec) {
  CodecFactory f;
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> l(r.mu);
    auto it = r.factories.find(spec.name);
    if (it == r.factories.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("codec: unknown name '", spec.name, "' (known: raw, scalar, rvq)"));
    }
    f = it->second;
  }
  if (spec.sink_tokens < 0) return absl::InvalidArgumentError("codec: sink_tokens must be >= 0");
  return f(spec);
}

absl::Status Codec::CheckShape(const KvShape& shape, int first_layer) const {
  if (first_layer < 0) return absl::InvalidArgumentError("first_layer must be >= 0");
  return ValidateShape(shape);
}

void Codec::FillHeader(PayloadHeader* h) const { (void)h; }

int64_t Codec::PayloadBytes(const KvShape& shape, DType dtype, int64_t first_token,
                            int first_layer) const {
  const int sinks = SinksOf(spec_.sink_tokens, first_token, shape.tokens);
  return int64_t{sizeof(PayloadHeader)} +
         int64_t{shape.layers} * 2 * sinks * shape.kv_heads * shape.head_dim * DTypeSize(dtype) +
         BodyBytes(shape, sinks, dtype, first_layer);
}

absl::Status Codec::Encode(absl::Span<const KvBlockView> blocks,
                           std::vector<std::string>* out) const {
  std::vector<std::string> encoded;
  encoded.reserve(blocks.size());
  std::vector<float> x;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const KvBlockView& blk = blocks[b];
    VQKV_RETURN_IF_ERROR(CheckShape(blk.shape, blk.first_layer));
    if (static_cast<uint8_t>(blk.dtype) > 2) {
      return absl::InvalidArgumentError(absl::StrCat("block ", b, ": unsupported dtype"));
    }
    if (blk.data == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("block ", b, ": null data"));
    if (blk.first_token < 0) {
      return absl::InvalidArgumentError(absl::StrCat("block ", b, ": first_token must be >= 0"));
    }
    const int64_t n = blk.shape.elements();
    const bool bytes_path = BytePassthrough();
    if (const int64_t bad = FirstNonFinite(blk.dtype, blk.data, n); bad >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": value at element ", bad, " is NaN or Inf"));
    }
    if (!bytes_path) {
      x.resize(n);
      ToFloat(blk.dtype, blk.data, n, x.data());
    }
    const int sinks = SinksOf(spec_.sink_tokens, blk.first_token, blk.shape.tokens);
    PayloadHeader h{};
    std::memcpy(h.magic, kMagic, 4);
    h.version = 1;
    h.kind = static_cast<uint8_t>(kind());
    h.dtype = static_cast<uint8_t>(blk.dtype);
    h.layers = blk.shape.layers;
    h.tokens = blk.shape.tokens;
    h.kv_heads = blk.shape.kv_heads;
    h.head_dim = blk.shape.head_dim;
    h.sink_tokens = sinks;
    h.first_layer = blk.first_layer;
    h.first_token = HeaderFirstToken(blk.first_token);
    FillHeader(&h);
    std::string payload(reinterpret_cast<const char*>(&h), sizeof h);
    const size_t esize = DTypeSize(blk.dtype);
    const size_t sink_bytes =
        size_t(blk.shape.layers) * 2 * sinks * blk.shape.kv_heads * blk.shape.head_dim * esize;
    payload.resize(sizeof h + sink_bytes);
    if (sinks > 0) {
      CopySinks(blk.shape, sinks, esize, static_cast<const char*>(blk.data),
                payload.data() + sizeof h);
    }
    if (bytes_path) {
      VQKV_RETURN_IF_ERROR(EncodeBodyBytes(h, static_cast<const char*>(blk.data), &payload));
    } else {
      VQKV_RETURN_IF_ERROR(EncodeBody(h, x.data(), &payload));
    }
    encoded.push_back(std::move(payload));
  }
  for (auto& p : encoded) out->push_back(std::move(p));
  return absl::OkStatus();
}

absl::Status Codec::Decode(absl::Span<const std::string_view> payloads, DType out_dtype,
                           absl::Span<void* const> out, absl::Span<const size_t> out_bytes) const {
  if (out.size() != payloads.size() || out_bytes.size() != payloads.size()) {
    return absl::InvalidArgumentError("decode: payloads, outputs and sizes differ in count");
  }
  std::vector<float> x;
  std::vector<float> sink_f;
  for (size_t b = 0; b < payloads.size(); ++b) {
    VQKV_ASSIGN_OR_RETURN(PayloadHeader h, ReadPayloadHeader(payloads[b]));
    if (h.kind != static_cast<uint8_t>(kind())) {
      return absl::InvalidArgumentError(absl::StrCat("payload ", b, ": encoded by codec kind ",
                                                     int{h.kind}, ", not by ", Label()));
    }
    const KvShape shape = HeaderShape(h);
    VQKV_RETURN_IF_ERROR(CheckShape(shape, h.first_layer));
    const int64_t n = shape.elements();
    if (out[b] == nullptr || out_bytes[b] < size_t(n) * DTypeSize(out_dtype)) {
      return absl::InvalidArgumentError(absl::StrCat("payload ", b, ": output buffer holds ",
                                                     out_bytes[b], " bytes, needs ",
                                                     n * DTypeSize(out_dtype)));
    }
    const DType in_dtype = static_cast<DType>(h.dtype);
    const int sinks = h.sink_tokens;
    const size_t esize = DTypeSize(in_dtype);
    const size_t row = size_t(shape.kv_heads) * shape.head_dim;
    const size_t sink_bytes = size_t(shape.layers) * 2 * sinks * row * esize;
    const int64_t want = int64_t{sizeof(PayloadHeader)} + sink_bytes +
                         BodyBytes(shape, sinks, in_dtype, h.first_layer);
    if (int64_t(payloads[b].size()) != want) {
      return absl::InvalidArgumentError(absl::StrCat("payload ", b, ": ", payloads[b].size(),
                                                     " bytes, expected ", want, " for shape ",
                                                     shape.DebugString()));
    }
    const std::string_view body = payloads[b].substr(sizeof(PayloadHeader) + sink_bytes);
    if (BytePassthrough() && out_dtype == in_dtype) {
      char* o = static_cast<char*>(out[b]);
      const size_t row_bytes = row * esize;
      const char* sink_src = payloads[b].data() + sizeof(PayloadHeader);
      for (int l = 0; l < shape.layers; ++l) {
        for (int c = 0; c < 2; ++c) {
          std::memcpy(o + shape.Offset(l, c, 0, 0) * esize,
                      sink_src + (size_t(l) * 2 + c) * sinks * row_bytes, sinks * row_bytes);
        }
      }
      VQKV_RETURN_IF_ERROR(DecodeBodyBytes(h, body, o));
      continue;
    }
    x.assign(n, 0.f);
    VQKV_RETURN_IF_ERROR(DecodeBody(h, body, x.data()));
    if (sinks > 0) {
      sink_f.resize(size_t(shape.layers) * 2 * sinks * row);
      ToFloat(in_dtype, payloads[b].data() + sizeof(PayloadHeader), sink_f.size(), sink_f.data());
      for (int l = 0; l < shape.layers; ++l) {
        for (int c = 0; c < 2; ++c) {
          std::memcpy(x.data() + shape.Offset(l, c, 0, 0),
                      sink_f.data() + (size_t(l) * 2 + c) * sinks * row,
                      sinks * row * sizeof(float));
        }
      }
    }
    FromFloat(x.data(), n, out_dtype, out[b]);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Codec::DecodeToFloat(std::string_view payload) const {
  VQKV_ASSIGN_OR_RETURN(PayloadHeader h, ReadPayloadHeader(payload));
  std::vector<float> out(HeaderShape(h).elements());
  void* ptr = out.data();
  size_t bytes = out.size() * sizeof(float);
  VQKV_RETURN_IF_ERROR(Decode({&payload, 1}, DType::kF32, {&ptr, 1}, {&bytes, 1}));
  return out;
}

}  // namespace vqkv::kernels
