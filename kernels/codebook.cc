#include "kernels/codebook.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/hash.h"
#include "common/safetensors.h"
#include "common/status_macros.h"

namespace vqkv::kernels {
namespace {

std::string TensorName(int l, int c, int h, bool per_head) {
  std::string s = absl::StrCat("layer", l, c == 0 ? ".k" : ".v");
  if (per_head) absl::StrAppend(&s, ".head", h);
  return s;
}

absl::StatusOr<std::vector<int>> ParseIntList(const std::string& s, const char* field) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    int v;
    if (!absl::SimpleAtoi(p, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("codebook metadata '", field, "': '", p, "' is not an integer"));
    }
    out.push_back(v);
  }
  return out;
}

std::string ScaleName(int l, int c) {
  return absl::StrCat("layer", l, c == 0 ? ".k" : ".v", ".scale");
}

// Rotates rows by -angle (back) or +angle (forward) with LLaMA's rotate-half pairing.
void Rotate(const std::vector<float>& inv_freq, int kv_heads, int head_dim,
            absl::Span<const int64_t> positions, float* x, bool forward) {
  const int half = head_dim / 2;
  std::vector<float> cs(half), sn(half);
  for (size_t t = 0; t < positions.size(); ++t) {
    const double pos = double(positions[t]);
    for (int i = 0; i < half; ++i) {
      cs[i] = static_cast<float>(std::cos(pos * double(inv_freq[i])));
      const float s = static_cast<float>(std::sin(pos * double(inv_freq[i])));
      sn[i] = forward ? s : -s;
    }
    for (int h = 0; h < kv_heads; ++h) {
      float* v = x + (int64_t(t) * kv_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

}  // namespace

bool CodeSpace::empty() const { return key_rope_inv_freq.empty() && !scaled(); }

bool CodeSpace::scaled() const {
  for (const auto& s : scale) {
    if (!s.empty()) return true;
  }
  return false;
}

std::string CodeSpace::DebugString() const {
  if (empty()) return "identity";
  if (key_rope_inv_freq.empty()) return "scale";
  return scaled() ? "rope+scale" : "rope";
}

absl::Status CodeSpace::Validate(int layers, int kv_heads, int head_dim) const {
  if (!key_rope_inv_freq.empty()) {
    if (head_dim % 2 != 0 || int(key_rope_inv_freq.size()) != head_dim / 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "code space: key_rope_inv_freq has ", key_rope_inv_freq.size(), " values, head_dim ",
          head_dim, " needs ", head_dim / 2, " (and an even head_dim)"));
    }
    for (float f : key_rope_inv_freq) {
      if (!std::isfinite(f) || f < 0) {
        return absl::InvalidArgumentError("code space: key_rope_inv_freq must be finite, >= 0");
      }
    }
  }
  if (scale.empty()) return absl::OkStatus();
  if (int(scale.size()) != layers * 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("code space: ", scale.size(), " scale vectors, expected ", layers * 2));
  }
  for (size_t i = 0; i < scale.size(); ++i) {
    if (scale[i].empty()) continue;
    if (int64_t(scale[i].size()) != int64_t{kv_heads} * head_dim) {
      return absl::InvalidArgumentError(absl::StrCat("code space: scale ", i, " has ",
                                                     scale[i].size(), " values, expected ",
                                                     int64_t{kv_heads} * head_dim));
    }
    for (float f : scale[i]) {
      if (!std::isfinite(f) || !(f > 0)) {
        return absl::InvalidArgumentError("code space: scales must be finite and positive");
      }
    }
  }
  return absl::OkStatus();
}

namespace {

// Multiplies (or divides, when `divide`) rows of (layer, kind) by their channel weights.
void ApplyScale(const CodeSpace& cs, int layer, int kind, int kv_heads, int head_dim, size_t rows,
                float* x, bool divide) {
  const size_t si = size_t(layer) * 2 + kind;
  if (si >= cs.scale.size() || cs.scale[si].empty()) return;
  const float* s = cs.scale[si].data();
  const int64_t row = int64_t{kv_heads} * head_dim;
  for (size_t t = 0; t < rows; ++t) {
    float* v = x + int64_t(t) * row;
    for (int64_t j = 0; j < row; ++j) v[j] = divide ? v[j] / s[j] : v[j] * s[j];
  }
}

}  // namespace

void ToCodeSpace(const CodeSpace& cs, int layer, int kind, int kv_heads, int head_dim,
                 absl::Span<const int64_t> positions, float* x) {
  if (kind == 0 && !cs.key_rope_inv_freq.empty()) {
    Rotate(cs.key_rope_inv_freq, kv_heads, head_dim, positions, x, /*forward=*/false);
  }
  ApplyScale(cs, layer, kind, kv_heads, head_dim, positions.size(), x, /*divide=*/false);
}

void FromCodeSpace(const CodeSpace& cs, int layer, int kind, int kv_heads, int head_dim,
                   absl::Span<const int64_t> positions, float* x) {
  ApplyScale(cs, layer, kind, kv_heads, head_dim, positions.size(), x, /*divide=*/true);
  if (kind == 0 && !cs.key_rope_inv_freq.empty()) {
    Rotate(cs.key_rope_inv_freq, kv_heads, head_dim, positions, x, /*forward=*/true);
  }
}

std::vector<int64_t> SamplePositions(const KvSamples& samples) {
  std::vector<int64_t> pos;
  const int64_t n = samples.tokens(0);
  pos.reserve(n);
  std::vector<int64_t> lens = samples.seq_lens;
  if (lens.empty()) lens.push_back(n);
  for (size_t i = 0; i < lens.size(); ++i) {
    const int64_t start = i < samples.seq_starts.size() ? samples.seq_starts[i] : 0;
    for (int64_t t = 0; t < lens[i] && int64_t(pos.size()) < n; ++t) pos.push_back(start + t);
  }
  while (int64_t(pos.size()) < n) pos.push_back(int64_t(pos.size()));
  return pos;
}

KvSamples SamplesInCodeSpace(const CodeSpace& cs, const KvSamples& samples) {
  KvSamples out = samples;
  if (cs.empty()) return out;
  const std::vector<int64_t> pos = SamplePositions(samples);
  for (int l = 0; l < samples.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      std::vector<float>& x = c == 0 ? out.k[l] : out.v[l];
      const int64_t n = int64_t(x.size()) / (int64_t{samples.kv_heads} * samples.head_dim);
      ToCodeSpace(cs, l, c, samples.kv_heads, samples.head_dim,
                  absl::MakeConstSpan(pos).subspan(0, std::min<size_t>(pos.size(), size_t(n))),
                  x.data());
    }
  }
  return out;
}

int StageConfig::bits() const {
  int b = 0;
  while ((1 << b) < size) ++b;
  return b;
}

absl::StatusOr<StageConfig> ParseStageConfig(std::string_view text_in) {
  const std::string text(text_in);
  std::vector<std::string> p = absl::StrSplit(text, 'x');
  StageConfig c;
  if (p.size() != 2 || !absl::SimpleAtoi(p[0], &c.stages) || !absl::SimpleAtoi(p[1], &c.size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage config '", text, "': expected STAGESxSIZE, e.g. 7x1024"));
  }
  RvqConfig probe = RvqConfig::Uniform(1, 1, 1, c, c);
  VQKV_RETURN_IF_ERROR(probe.Validate());
  return c;
}

RvqConfig RvqConfig::Uniform(int layers, int kv_heads, int head_dim, StageConfig k, StageConfig v,
                             bool per_head) {
  RvqConfig c;
  c.layers = layers;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.per_head = per_head;
  c.k.assign(layers, k);
  c.v.assign(layers, v);
  return c;
}

int64_t RvqConfig::CodeBitsPerToken() const {
  int64_t bits = 0;
  for (int l = 0; l < layers; ++l) {
    bits += int64_t{k[l].stages} * k[l].bits() + int64_t{v[l].stages} * v[l].bits();
  }
  return bits * kv_heads;
}

double RvqConfig::BitsPerElement() const {
  return double(CodeBitsPerToken()) / (double(layers) * 2 * kv_heads * head_dim);
}

int64_t RvqConfig::CodebookBytes() const {
  int64_t n = 0;
  for (int l = 0; l < layers; ++l) {
    n += int64_t{k[l].stages} * k[l].size + int64_t{v[l].stages} * v[l].size;
  }
  return n * head_dim * 4 * (per_head ? kv_heads : 1);
}

std::string RvqConfig::ToString() const {
  bool uniform = true;
  for (int l = 1; l < layers; ++l) uniform = uniform && k[l] == k[0] && v[l] == v[0];
  auto one = [](const StageConfig& s) { return absl::StrCat(s.stages, "x", s.size); };
  if (uniform && layers > 0) return absl::StrCat("k=", one(k[0]), ",v=", one(v[0]));
  std::vector<std::string> parts;
  for (int l = 0; l < layers; ++l)
    parts.push_back(absl::StrCat("L", l, ":k=", one(k[l]), ",v=", one(v[l])));
  return absl::StrJoin(parts, " ");
}

absl::Status RvqConfig::Validate() const {
  if (layers <= 0 || kv_heads <= 0 || head_dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rvq config: layers/kv_heads/head_dim must be positive (got ", layers, "/",
                     kv_heads, "/", head_dim, ")"));
  }
  if (head_dim > 4096) return absl::InvalidArgumentError("rvq config: head_dim above 4096");
  if (int(k.size()) != layers || int(v.size()) != layers) {
    return absl::InvalidArgumentError("rvq config: need one K and one V stage config per layer");
  }
  for (int l = 0; l < layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const StageConfig& s = at(l, c);
      const char* kind = c == 0 ? "k" : "v";
      if (s.stages < 1 || s.stages > 1024) {
        return absl::InvalidArgumentError(absl::StrCat("rvq config: layer ", l, " ", kind,
                                                       " stages ", s.stages, " outside [1, 1024]"));
      }
      if (s.size < 2 || s.size > 65536 || (s.size & (s.size - 1)) != 0) {
        return absl::InvalidArgumentError(absl::StrCat("rvq config: layer ", l, " ", kind,
                                                       " codebook size ", s.size,
                                                       " is not a power of two in [2, 65536]"));
      }
    }
  }
  return absl::OkStatus();
}

int Codebook::TableIndex(int layer, int kind, int head) const {
  const int h = config_.per_head ? config_.kv_heads : 1;
  return (layer * 2 + kind) * h + (config_.per_head ? head : 0);
}

const float* Codebook::Table(int layer, int kind, int head, int stage) const {
  const StageConfig& s = config_.at(layer, kind);
  return tables_[TableIndex(layer, kind, head)].data() + size_t(stage) * s.size * config_.head_dim;
}

const float* Codebook::Norms(int layer, int kind, int head, int stage) const {
  const StageConfig& s = config_.at(layer, kind);
  return norms_[TableIndex(layer, kind, head)].data() + size_t(stage) * s.size;
}

absl::StatusOr<Codebook> Codebook::Create(RvqConfig config, std::vector<std::vector<float>> tables,
                                          CodeSpace code_space) {
  VQKV_RETURN_IF_ERROR(config.Validate());
  VQKV_RETURN_IF_ERROR(code_space.Validate(config.layers, config.kv_heads, config.head_dim));
  if (code_space.scaled()) {
    code_space.scale.resize(size_t(config.layers) * 2);  // every entry present, some may be 1s
    for (auto& s : code_space.scale) {
      if (s.empty()) s.assign(size_t(config.kv_heads) * config.head_dim, 1.f);
    }
  } else {
    code_space.scale.clear();
  }
  const int heads = config.per_head ? config.kv_heads : 1;
  if (int(tables.size()) != config.layers * 2 * heads) {
    return absl::InvalidArgumentError(absl::StrCat("codebook: expected ", config.layers * 2 * heads,
                                                   " tables, got ", tables.size()));
  }
  Codebook cb;
  cb.config_ = std::move(config);
  const int dim = cb.config_.head_dim;
  std::string hash_input = absl::StrCat(cb.config_.ToString(), "|", cb.config_.layers, "|",
                                        cb.config_.kv_heads, "|", dim, "|", cb.config_.per_head);
  for (int l = 0; l < cb.config_.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      for (int h = 0; h < heads; ++h) {
        const auto& t = tables[(l * 2 + c) * heads + h];
        const StageConfig& s = cb.config_.at(l, c);
        const size_t want = size_t(s.stages) * s.size * dim;
        const std::string name = TensorName(l, c, h, cb.config_.per_head);
        if (t.size() != want) {
          return absl::InvalidArgumentError(
              absl::StrCat("codebook table '", name, "': ", t.size(), " values, expected ", want));
        }
        std::vector<float> norms(size_t(s.stages) * s.size);
        for (size_t j = 0; j < norms.size(); ++j) {
          double acc = 0;
          for (int d = 0; d < dim; ++d) {
            const float v = t[j * dim + d];
            if (!std::isfinite(v)) {
              return absl::InvalidArgumentError(
                  absl::StrCat("codebook table '", name, "': NaN or Inf value"));
            }
            acc += double(v) * v;
          }
          norms[j] = static_cast<float>(acc);
        }
        hash_input.append(reinterpret_cast<const char*>(t.data()), t.size() * 4);
        cb.norms_.push_back(std::move(norms));
      }
    }
  }
  if (!code_space.empty()) {
    absl::StrAppend(&hash_input, "|code space ", code_space.DebugString(), "|");
    const auto& f = code_space.key_rope_inv_freq;
    hash_input.append(reinterpret_cast<const char*>(f.data()), f.size() * 4);
    for (const auto& s : code_space.scale) {
      hash_input.append(reinterpret_cast<const char*>(s.data()), s.size() * 4);
    }
  }
  cb.tables_ = std::move(tables);
  cb.code_space_ = std::move(code_space);
  cb.id_ = Sha256Hex(hash_input, 16);
  return cb;
}

std::string Codebook::Serialize() const {
  SafetensorsWriter w;
  const int heads = config_.per_head ? config_.kv_heads : 1;
  std::vector<std::string> stages, sizes;
  for (int l = 0; l < config_.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      stages.push_back(absl::StrCat(config_.at(l, c).stages));
      sizes.push_back(absl::StrCat(config_.at(l, c).size));
      for (int h = 0; h < heads; ++h) {
        const StageConfig& s = config_.at(l, c);
        w.AddF32(TensorName(l, c, h, config_.per_head), {s.stages, s.size, config_.head_dim},
                 tables_[TableIndex(l, c, h)].data());
      }
    }
  }
  const CodeSpace& cs = code_space_;
  if (!cs.key_rope_inv_freq.empty()) {
    w.AddF32("key_rope.inv_freq", {int64_t(cs.key_rope_inv_freq.size())},
             cs.key_rope_inv_freq.data());
  }
  for (size_t i = 0; i < cs.scale.size(); ++i) {
    w.AddF32(ScaleName(int(i / 2), int(i % 2)), {config_.kv_heads, config_.head_dim},
             cs.scale[i].data());
  }
  w.SetMetadata("format", "vqkv-codebook");
  w.SetMetadata("version", cs.empty() ? "1" : "2");
  if (!cs.empty()) {
    w.SetMetadata("key_rope", cs.key_rope_inv_freq.empty() ? "none" : "rotate_half");
    w.SetMetadata("scaled", cs.scaled() ? "1" : "0");
  }
  w.SetMetadata("layers", absl::StrCat(config_.layers));
  w.SetMetadata("kv_heads", absl::StrCat(config_.kv_heads));
  w.SetMetadata("head_dim", absl::StrCat(config_.head_dim));
  w.SetMetadata("per_head", config_.per_head ? "1" : "0");
  w.SetMetadata("stages", absl::StrJoin(stages, ","));
  w.SetMetadata("sizes", absl::StrJoin(sizes, ","));
  w.SetMetadata("id", id_);
  return w.Serialize();
}

absl::Status Codebook::Save(const std::string& path) const {
  return WriteStringToFile(path, Serialize());
}

absl::StatusOr<Codebook> Codebook::Load(const std::string& path) {
  VQKV_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  return FromBytes(std::move(bytes), path);
}

absl::StatusOr<Codebook> Codebook::FromBytes(std::string bytes, const std::string& what) {
  VQKV_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Parse(std::move(bytes), what));
  auto bad = [&](absl::string_view msg) {
    return absl::InvalidArgumentError(absl::StrCat("codebook '", what, "': ", msg));
  };
  const auto& md = f.metadata();
  for (const char* key : {"format", "version", "layers", "kv_heads", "head_dim", "per_head",
                          "stages", "sizes", "id"}) {
    if (!md.count(key)) return bad(absl::StrCat("metadata field '", key, "' is missing"));
  }
  if (md.at("format") != "vqkv-codebook") return bad("metadata 'format' is not vqkv-codebook");
  if (md.at("version") != "1" && md.at("version") != "2")
    return bad(absl::StrCat("unsupported version '", md.at("version"), "'"));
  RvqConfig config;
  if (!absl::SimpleAtoi(md.at("layers"), &config.layers) ||
      !absl::SimpleAtoi(md.at("kv_heads"), &config.kv_heads) ||
      !absl::SimpleAtoi(md.at("head_dim"), &config.head_dim)) {
    return bad("metadata layers/kv_heads/head_dim are not integers");
  }
  if (config.layers <= 0 || config.layers > 4096) return bad("metadata 'layers' out of range");
  config.per_head = md.at("per_head") == "1";
  VQKV_ASSIGN_OR_RETURN(std::vector<int> stages, ParseIntList(md.at("stages"), "stages"));
  VQKV_ASSIGN_OR_RETURN(std::vector<int> sizes, ParseIntList(md.at("sizes"), "sizes"));
  if (int(stages.size()) != 2 * config.layers || int(sizes.size()) != 2 * config.layers) {
    return bad("metadata 'stages'/'sizes' need two entries per layer");
  }
  for (int l = 0; l < config.layers; ++l) {
    config.k.push_back({stages[2 * l], sizes[2 * l]});
    config.v.push_back({stages[2 * l + 1], sizes[2 * l + 1]});
  }
  auto valid = config.Validate();
  if (!valid.ok()) return bad(valid.message());
  const int heads = config.per_head ? config.kv_heads : 1;
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < config.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      for (int h = 0; h < heads; ++h) {
        const std::string name = TensorName(l, c, h, config.per_head);
        auto info = f.Info(name);
        if (!info.ok()) return bad(absl::StrCat("tensor '", name, "' is missing"));
        const StageConfig& s = config.at(l, c);
        const std::vector<int64_t> want = {s.stages, s.size, config.head_dim};
        if (info->dtype != "F32" || info->shape != want) {
          return bad(absl::StrCat("tensor '", name, "' must be F32 [", s.stages, ", ", s.size, ", ",
                                  config.head_dim, "]"));
        }
        VQKV_ASSIGN_OR_RETURN(std::vector<float> t, f.ReadFloat(name));
        tables.push_back(std::move(t));
      }
    }
  }
  CodeSpace cs;
  if (md.at("version") == "2") {
    const auto rope = md.find("key_rope");
    const auto scaled = md.find("scaled");
    if (rope == md.end() || scaled == md.end()) {
      return bad("version 2 needs metadata 'key_rope' and 'scaled'");
    }
    if (rope->second == "rotate_half") {
      auto info = f.Info("key_rope.inv_freq");
      if (!info.ok() || info->dtype != "F32" ||
          info->shape != std::vector<int64_t>{config.head_dim / 2}) {
        return bad(
            absl::StrCat("tensor 'key_rope.inv_freq' must be F32 [", config.head_dim / 2, "]"));
      }
      VQKV_ASSIGN_OR_RETURN(cs.key_rope_inv_freq, f.ReadFloat("key_rope.inv_freq"));
    } else if (rope->second != "none") {
      return bad(absl::StrCat("unknown key_rope '", rope->second, "'"));
    }
    if (scaled->second == "1") {
      for (int l = 0; l < config.layers; ++l) {
        for (int c = 0; c < 2; ++c) {
          const std::string name = ScaleName(l, c);
          auto info = f.Info(name);
          if (!info.ok() || info->dtype != "F32" ||
              info->shape != std::vector<int64_t>{config.kv_heads, config.head_dim}) {
            return bad(absl::StrCat("tensor '", name, "' must be F32 [", config.kv_heads, ", ",
                                    config.head_dim, "]"));
          }
          VQKV_ASSIGN_OR_RETURN(std::vector<float> s, f.ReadFloat(name));
          cs.scale.push_back(std::move(s));
        }
      }
    } else if (scaled->second != "0") {
      return bad(absl::StrCat("metadata 'scaled' must be 0 or 1, got '", scaled->second, "'"));
    }
    if (cs.empty()) return bad("version 2 without a code space");
  }
  auto cb = Create(std::move(config), std::move(tables), std::move(cs));
  if (!cb.ok()) return bad(cb.status().message());
  if (cb->id() != md.at("id")) {
    return bad(absl::StrCat("content hash ", cb->id(), " does not match the recorded id ",
                            md.at("id"), " (file damaged or edited)"));
  }
  return cb;
}

}  // namespace vqkv::kernels
