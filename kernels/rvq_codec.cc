// rvq: residual vector quantization of whole head vectors (VQKV).
// Body layout: one bit stream, for l in layers, c in {K, V}, t in non-sink tokens, h in heads,
// i in stages(l, c): code (log2 size(l, c) bits). Zero-padded to a byte at the end.
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/status_macros.h"
#include "kernels/bitpack.h"
#include "kernels/codebook.h"
#include "kernels/codec_impl.h"
#include "kernels/vq_search.h"

namespace vqkv::kernels {
namespace {

class RvqCodec final : public Codec {
 public:
  explicit RvqCodec(const CodecSpec& spec) : Codec(spec), cb_(*spec.codebook) {
    const std::string raw = absl::HexStringToBytes(cb_.id());
    std::memcpy(tag_, raw.data(), 8);
  }
  std::string Label() const override {
    std::string s = absl::StrCat("rvq(", cb_.config().ToString(), ")");
    if (spec_.beam > 1) absl::StrAppend(&s, "+beam", spec_.beam);
    return s;
  }
  CodecKind kind() const override { return CodecKind::kRvq; }

 protected:
  void FillHeader(PayloadHeader* h) const override {
    h->param = static_cast<uint8_t>(spec_.beam);
    std::memcpy(h->codebook_tag, tag_, 8);
  }

  absl::Status CheckShape(const KvShape& s, int first_layer) const override {
    if (auto st = Codec::CheckShape(s, first_layer); !st.ok()) return st;
    const RvqConfig& c = cb_.config();
    if (first_layer + s.layers > c.layers || s.kv_heads != c.kv_heads || s.head_dim != c.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("rvq codec: block shape ", s.DebugString(), " at first_layer ", first_layer,
                       " does not match codebook ", cb_.id(), " (layers=", c.layers,
                       ", kv_heads=", c.kv_heads, ", head_dim=", c.head_dim, ")"));
    }
    return absl::OkStatus();
  }

  int64_t BodyBytes(const KvShape& s, int sinks, DType, int first_layer) const override {
    const RvqConfig& c = cb_.config();
    int64_t bits = 0;
    for (int l = first_layer; l < first_layer + s.layers && l < c.layers; ++l) {
      bits += int64_t{c.k[l].stages} * c.k[l].bits() + int64_t{c.v[l].stages} * c.v[l].bits();
    }
    return (int64_t{s.tokens - sinks} * s.kv_heads * bits + 7) / 8;
  }

  absl::Status EncodeBody(const PayloadHeader& h, const float* x,
                          std::string* body) const override {
    const KvShape s = HeaderShape(h);
    const RvqConfig& cfg = cb_.config();
    const int sinks = h.sink_tokens, t1 = s.tokens - sinks, dim = s.head_dim, heads = s.kv_heads;
    const int64_t n = int64_t{t1} * heads;
    VQKV_ASSIGN_OR_RETURN(const std::vector<int64_t> positions, Positions(h));
    // codes[l][c]: [t1 * heads, stages]
    std::vector<std::vector<int32_t>> codes(size_t(s.layers) * 2);
    std::vector<float> r, dist;
    std::vector<int32_t> idx;
    for (int l = 0; l < s.layers; ++l) {
      const int ml = h.first_layer + l;
      for (int c = 0; c < 2; ++c) {
        const StageConfig& sc = cfg.at(ml, c);
        auto& out = codes[l * 2 + c];
        out.assign(n * sc.stages, 0);
        r.assign(x + s.Offset(l, c, sinks, 0), x + s.Offset(l, c, sinks, 0) + n * dim);
        ToCodeSpace(cb_.code_space(), ml, c, heads, dim, positions, r.data());
        const int groups = cfg.per_head ? heads : 1;
        for (int g = 0; g < groups; ++g) {
          // With per-head codebooks each head is encoded against its own tables.
          auto rows = [&](int64_t v) { return cfg.per_head ? v * heads + g : v; };
          const int64_t m = cfg.per_head ? t1 : n;
          if (spec_.beam > 1) {
            std::vector<const float*> tabs, norms;
            std::vector<int> sizes;
            for (int i = 0; i < sc.stages; ++i) {
              tabs.push_back(cb_.Table(ml, c, g, i));
              norms.push_back(cb_.Norms(ml, c, g, i));
              sizes.push_back(sc.size);
            }
            ParallelFor(m, 16, [&](int64_t b, int64_t e) {
              for (int64_t v = b; v < e; ++v) {
                const int64_t row = rows(v);
                EncodeVector(r.data() + row * dim, dim, tabs, norms, sizes, spec_.beam,
                             out.data() + row * sc.stages);
              }
            });
            continue;
          }
          std::vector<float> sub;
          const float* rp = r.data();
          if (cfg.per_head) {
            sub.resize(m * dim);
            for (int64_t v = 0; v < m; ++v) std::memcpy(&sub[v * dim], &r[rows(v) * dim], dim * 4);
            rp = sub.data();
          }
          float* rw = const_cast<float*>(rp);
          idx.resize(m);
          for (int i = 0; i < sc.stages; ++i) {
            const float* tab = cb_.Table(ml, c, g, i);
            NearestCodewords(rw, m, dim, tab, cb_.Norms(ml, c, g, i), sc.size, idx.data(), nullptr);
            for (int64_t v = 0; v < m; ++v) {
              out[rows(v) * sc.stages + i] = idx[v];
              const float* cw = tab + int64_t{idx[v]} * dim;
              float* rv = rw + v * dim;
              for (int d = 0; d < dim; ++d) rv[d] -= cw[d];
            }
          }
        }
      }
    }
    BitWriter w(body);
    for (int l = 0; l < s.layers; ++l) {
      for (int c = 0; c < 2; ++c) {
        const int bits = cfg.at(h.first_layer + l, c).bits();
        for (int32_t code : codes[l * 2 + c]) w.Put(static_cast<uint32_t>(code), bits);
      }
    }
    w.Flush();
    return absl::OkStatus();
  }

  absl::Status DecodeBody(const PayloadHeader& h, std::string_view body, float* x) const override {
    if (std::memcmp(h.codebook_tag, tag_, 8) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("payload was encoded with codebook ",
                       absl::BytesToHexString(
                           absl::string_view(reinterpret_cast<const char*>(h.codebook_tag), 8)),
                       "..., decoder has ", cb_.id()));
    }
    const KvShape s = HeaderShape(h);
    const RvqConfig& cfg = cb_.config();
    const int sinks = h.sink_tokens, t1 = s.tokens - sinks, dim = s.head_dim;
    VQKV_ASSIGN_OR_RETURN(const std::vector<int64_t> positions, Positions(h));
    BitReader rd(body);
    for (int l = 0; l < s.layers; ++l) {
      const int ml = h.first_layer + l;
      for (int c = 0; c < 2; ++c) {
        const StageConfig& sc = cfg.at(ml, c);
        const int bits = sc.bits();
        for (int t = 0; t < t1; ++t) {
          for (int hh = 0; hh < s.kv_heads; ++hh) {
            float* out = x + s.Offset(l, c, sinks + t, hh);
            const int g = cfg.per_head ? hh : 0;
            for (int i = 0; i < sc.stages; ++i) {
              const uint32_t code = rd.Get(bits);
              // Codes are < size by construction (size is a power of two and bits = log2 size).
              const float* cw = cb_.Table(ml, c, g, i) + int64_t{code} * dim;
              for (int d = 0; d < dim; ++d) out[d] += cw[d];
            }
          }
        }
        FromCodeSpace(cb_.code_space(), ml, c, s.kv_heads, dim, positions,
                      x + s.Offset(l, c, sinks, 0));
      }
    }
    return absl::OkStatus();
  }

 private:
  // Sequence positions of the coded (non-sink) tokens; empty when the code space has no RoPE.
  absl::StatusOr<std::vector<int64_t>> Positions(const PayloadHeader& h) const {
    const int t1 = h.tokens - h.sink_tokens;
    std::vector<int64_t> pos;
    if (cb_.code_space().key_rope_inv_freq.empty()) {
      pos.assign(size_t(t1), 0);  // unused by the scale-only transform except for the count
      return pos;
    }
    if (h.first_token < 0) {
      return absl::InvalidArgumentError(
          "rvq codec: the codebook codes keys before RoPE, which needs the block's position, "
          "but the block starts past position 2^31 (or the payload has none)");
    }
    pos.resize(size_t(t1));
    for (int t = 0; t < t1; ++t) pos[t] = int64_t{h.first_token} + h.sink_tokens + t;
    return pos;
  }

  const Codebook& cb_;
  uint8_t tag_[8];
};

}  // namespace

absl::StatusOr<std::unique_ptr<Codec>> NewRvqCodec(const CodecSpec& spec) {
  if (!spec.codebook) {
    return absl::FailedPreconditionError("rvq codec: no codebook (fit or upload one first)");
  }
  if (spec.beam < 1 || spec.beam > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("rvq codec: beam must be in [1, 64], got ", spec.beam));
  }
  return std::unique_ptr<Codec>(new RvqCodec(spec));
}

}  // namespace vqkv::kernels
