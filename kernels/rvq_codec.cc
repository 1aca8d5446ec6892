// rvq: residual vector quantization of whole head vectors (VQKV).
// Body layout: one bit stream, for l in layers, c in {K, V}, t in non-sink tokens, h in heads,
// i in stages(l, c): code (log2 size(l, c) bits). Zero-padded to a byte at the end.
// With outliers = N > 0 (CodecSpec::outliers) the bit stream is followed, for l in layers, by
// min(N, non-sink tokens) entries (sink-like tokens first, then the worst coded; see
// AppendOutliers) in increasing token order: int32 token (index among the non-sink
// tokens), then for c in {K, V}, h in heads: fp16 scale and head_dim int8 values of the residual
// left after the stages (in the code space), added back on decode; a negative scale means the
// int8 values are the vector itself (in the code space), replacing the stages' reconstruction.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
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
    if (spec_.outliers > 0) absl::StrAppend(&s, "+outliers", spec_.outliers);
    return s;
  }
  CodecKind kind() const override { return CodecKind::kRvq; }

 protected:
  void FillHeader(PayloadHeader* h) const override {
    h->param = static_cast<uint8_t>(spec_.beam);
    h->group = spec_.outliers;
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
    const int64_t t1 = s.tokens - sinks;
    return CodeBytes(s, t1, first_layer) +
           int64_t{s.layers} * std::min<int64_t>(spec_.outliers, t1) * OutlierEntryBytes(s);
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
    std::vector<std::vector<float>> inputs(spec_.outliers > 0 ? size_t(s.layers) * 2 : 0);
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
        if (spec_.outliers > 0) inputs[l * 2 + c] = r;
        const int groups = cfg.per_head ? heads : 1;
        for (int g = 0; g < groups; ++g) {
          // With per-head codebooks each head is encoded against its own tables.
          auto rows = [&](int64_t v) { return cfg.per_head ? v * heads + g : v; };
          const int64_t m = cfg.per_head ? t1 : n;
          std::vector<float> sub;
          const float* rp = r.data();
          if (cfg.per_head) {
            sub.resize(m * dim);
            for (int64_t v = 0; v < m; ++v) std::memcpy(&sub[v * dim], &r[rows(v) * dim], dim * 4);
            rp = sub.data();
          }
          if (spec_.beam > 1) {
            std::vector<const float*> tabs, norms;
            std::vector<int> sizes;
            for (int i = 0; i < sc.stages; ++i) {
              tabs.push_back(cb_.Table(ml, c, g, i));
              norms.push_back(cb_.Norms(ml, c, g, i));
              sizes.push_back(sc.size);
            }
            std::vector<int32_t> bc(m * sc.stages);
            EncodeVectorsBeam(rp, m, dim, tabs, norms, sizes, spec_.beam, bc.data());
            for (int64_t v = 0; v < m; ++v) {
              std::copy(bc.begin() + v * sc.stages, bc.begin() + (v + 1) * sc.stages,
                        out.begin() + rows(v) * sc.stages);
            }
            continue;
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
    if (spec_.outliers > 0) {
      for (int l = 0; l < s.layers; ++l) {
        AppendOutliers(h, l, inputs[l * 2], inputs[l * 2 + 1], codes[l * 2], codes[l * 2 + 1],
                       body);
      }
    }
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
    if (h.group != spec_.outliers) {
      return absl::InvalidArgumentError(
          absl::StrCat("rvq codec: payload was encoded with outliers=", h.group,
                       ", this codec has outliers=", spec_.outliers));
    }
    const int64_t code_bytes = CodeBytes(s, t1, h.first_layer);
    const int n_out = int(std::min<int64_t>(spec_.outliers, t1));
    const int64_t entry = OutlierEntryBytes(s);
    if (int64_t(body.size()) != code_bytes + int64_t{s.layers} * n_out * entry) {
      return absl::InvalidArgumentError("rvq codec: body size does not match the shape");
    }
    // Outlier entries: validate every token index (increasing, in range) before writing anything.
    std::vector<int32_t> out_tokens(size_t(s.layers) * n_out);
    for (int l = 0; l < s.layers; ++l) {
      for (int j = 0; j < n_out; ++j) {
        const char* e = body.data() + code_bytes + (int64_t{l} * n_out + j) * entry;
        int32_t t;
        std::memcpy(&t, e, 4);
        if (t < 0 || t >= t1 || (j > 0 && t <= out_tokens[size_t(l) * n_out + j - 1])) {
          return absl::InvalidArgumentError(
              absl::StrCat("rvq codec: outlier entry ", j, " of layer ", l, " names token ", t,
                           " (must increase and lie in [0, ", t1, "))"));
        }
        out_tokens[size_t(l) * n_out + j] = t;
      }
    }
    BitReader rd(body.substr(0, code_bytes));
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
        for (int j = 0; j < n_out; ++j) {
          const int t = out_tokens[size_t(l) * n_out + j];
          const char* e = body.data() + code_bytes + (int64_t{l} * n_out + j) * entry + 4 +
                          int64_t{c} * s.kv_heads * (2 + dim);
          for (int hh = 0; hh < s.kv_heads; ++hh, e += 2 + dim) {
            uint16_t hs;
            std::memcpy(&hs, e, 2);
            const float scale = HalfToFloat(hs & 0x7fff);
            if (!std::isfinite(scale)) {
              return absl::InvalidArgumentError("rvq codec: outlier scale is not finite");
            }
            const auto* q = reinterpret_cast<const int8_t*>(e + 2);
            float* out = x + s.Offset(l, c, sinks + t, hh);
            if (hs & 0x8000) {  // the vector itself
              for (int d = 0; d < dim; ++d) out[d] = scale * float(q[d]);
            } else {  // the residual after the stages
              for (int d = 0; d < dim; ++d) out[d] += scale * float(q[d]);
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
  // Bytes of one outlier entry: token index, then per (kind, head) an fp16 scale and int8 values.
  static int64_t OutlierEntryBytes(const KvShape& s) {
    return 4 + int64_t{2} * s.kv_heads * (2 + s.head_dim);
  }
  // Code bits of one token of one head, summed over the block's layers and K/V.
  int64_t CodeBitsPerToken(const KvShape& s, int first_layer) const {
    const RvqConfig& c = cb_.config();
    int64_t bits = 0;
    for (int l = first_layer; l < first_layer + s.layers && l < c.layers; ++l) {
      bits += int64_t{c.k[l].stages} * c.k[l].bits() + int64_t{c.v[l].stages} * c.v[l].bits();
    }
    return bits;
  }

  // Bytes of the code bit stream of `t1` coded tokens (padded to a byte).
  int64_t CodeBytes(const KvShape& s, int64_t t1, int first_layer) const {
    return (t1 * s.kv_heads * CodeBitsPerToken(s, first_layer) + 7) / 8;
  }

  // Residual (code space) of `n` vectors after all stages of (layer ml, kind c).
  std::vector<float> Residual(int ml, int c, int heads, int dim, const std::vector<float>& in,
                              const std::vector<int32_t>& codes) const {
    const RvqConfig& cfg = cb_.config();
    const StageConfig& sc = cfg.at(ml, c);
    std::vector<float> res = in;
    const int64_t n = int64_t(in.size()) / dim;
    for (int64_t v = 0; v < n; ++v) {
      const int g = cfg.per_head ? int(v % heads) : 0;
      float* rv = res.data() + v * dim;
      for (int i = 0; i < sc.stages; ++i) {
        const float* cw = cb_.Table(ml, c, g, i) + int64_t{codes[v * sc.stages + i]} * dim;
        for (int d = 0; d < dim; ++d) rv[d] -= cw[d];
      }
    }
    return res;
  }

  // Sink-like: both norms below this fraction of the block's median (blocks of at least
  // kSinkMinTokens coded tokens); such tokens rank before all others (kSinkBonus exceeds any
  // sum of two relative energies worth keeping apart).
  static constexpr double kSinkNormRatio = 0.5;
  static constexpr int kSinkMinTokens = 8;
  static constexpr double kSinkBonus = 1e6;

  // Picks the min(outliers, tokens) coded tokens of block layer l: sink-like tokens first, then
  // the largest relative residual energy (K and V, all heads); appends their int8 residuals.
  void AppendOutliers(const PayloadHeader& h, int l, const std::vector<float>& k_in,
                      const std::vector<float>& v_in, const std::vector<int32_t>& k_codes,
                      const std::vector<int32_t>& v_codes, std::string* body) const {
    const KvShape s = HeaderShape(h);
    const int heads = s.kv_heads, dim = s.head_dim, t1 = s.tokens - h.sink_tokens;
    const int n_out = std::min(spec_.outliers, t1);
    if (n_out <= 0) return;
    const int ml = h.first_layer + l;
    const std::vector<float> res[2] = {Residual(ml, 0, heads, dim, k_in, k_codes),
                                       Residual(ml, 1, heads, dim, v_in, v_codes)};
    const std::vector<float>* in[2] = {&k_in, &v_in};
    std::vector<double> score(size_t(t1), 0.0);
    std::vector<double> norm2[2];
    for (int c = 0; c < 2; ++c) {
      double mean_energy = 0;
      for (float f : *in[c]) mean_energy += double(f) * f;
      mean_energy /= std::max(1, t1);
      const double floor = 1e-6 * mean_energy + 1e-30;
      norm2[c].resize(size_t(t1));
      for (int t = 0; t < t1; ++t) {
        double e = 0, x2 = 0;
        for (int64_t i = int64_t{t} * heads * dim; i < int64_t{t + 1} * heads * dim; ++i) {
          e += double(res[c][i]) * res[c][i];
          x2 += double((*in[c])[i]) * (*in[c])[i];
        }
        score[t] += e / std::max(x2, floor);
        norm2[c][t] = x2;
      }
    }
    // Sink-like tokens first: K and V both far smaller than the block's median (code space, all
    // heads). They draw much of the attention (the BOS of each story packed into a long
    // context: in SmolLM2's layers 12-29, 25-62% of all attention mass on 0.6% of the tokens,
    // with 0.2-0.4 times the median norms) while their relative error need not be the largest.
    if (t1 >= kSinkMinTokens) {
      double med[2];
      for (int c = 0; c < 2; ++c) {
        std::vector<double> x = norm2[c];
        std::nth_element(x.begin(), x.begin() + x.size() / 2, x.end());
        med[c] = x[x.size() / 2];
      }
      const double r2 = kSinkNormRatio * kSinkNormRatio;
      for (int t = 0; t < t1; ++t) {
        if (norm2[0][t] < r2 * med[0] && norm2[1][t] < r2 * med[1]) score[t] += kSinkBonus;
      }
    }
    std::vector<int32_t> order(static_cast<size_t>(t1));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + n_out, order.end(), [&](int32_t a, int32_t b) {
      return score[a] > score[b] || (score[a] == score[b] && a < b);
    });
    order.resize(n_out);
    std::sort(order.begin(), order.end());
    for (int32_t t : order) {
      body->append(reinterpret_cast<const char*>(&t), 4);
      for (int c = 0; c < 2; ++c) {
        for (int hh = 0; hh < heads; ++hh) {
          // The residual, or the vector itself when that is smaller (a vector far smaller than
          // the codewords leaves a residual larger than itself): the scale's sign says which.
          const int64_t at = (int64_t{t} * heads + hh) * dim;
          float amax_res = 0, amax_vec = 0;
          for (int d = 0; d < dim; ++d) {
            amax_res = std::max(amax_res, std::abs(res[c][at + d]));
            amax_vec = std::max(amax_vec, std::abs((*in[c])[at + d]));
          }
          const bool replace = amax_vec < amax_res;
          const float* rv = replace ? in[c]->data() + at : res[c].data() + at;
          const float amax = replace ? amax_vec : amax_res;
          uint16_t hs = FloatToHalf(amax / 127.f);
          float scale = HalfToFloat(hs);
          if (!std::isfinite(scale) || scale == 0) {  // beyond fp16 or all zero: leave it coded
            hs = 0;
            scale = 0;
          } else if (replace) {
            hs |= 0x8000;
          }
          body->append(reinterpret_cast<const char*>(&hs), 2);
          for (int d = 0; d < dim; ++d) {
            const float q = scale > 0 ? std::nearbyint(rv[d] / scale) : 0.f;
            body->push_back(static_cast<char>(static_cast<int8_t>(std::clamp(q, -127.f, 127.f))));
          }
        }
      }
    }
  }

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
  if (spec.outliers < 0 || spec.outliers > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("rvq codec: outliers must be in [0, 4096], got ", spec.outliers));
  }
  return std::unique_ptr<Codec>(new RvqCodec(spec));
}

}  // namespace vqkv::kernels
