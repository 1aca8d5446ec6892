#include "client/cpp/eval/samples_io.h"

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/safetensors.h"
#include "common/status_macros.h"

namespace vqkv::eval {
namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Minimal .npy (format 1.0/2.0) reader for little-endian f4/f2 C-order arrays.
absl::StatusOr<kernels::KvSamples> LoadNpy(const std::string& path) {
  VQKV_ASSIGN_OR_RETURN(std::string b, ReadFileToString(path));
  auto bad = [&](const std::string& m) {
    return absl::InvalidArgumentError(absl::StrCat("npy '", path, "': ", m));
  };
  if (b.size() < 10 || b.compare(0, 6, "\x93NUMPY") != 0) return bad("not a .npy file");
  const int major = static_cast<uint8_t>(b[6]);
  size_t hlen, hoff;
  if (major == 1) {
    hlen = static_cast<uint8_t>(b[8]) | (static_cast<uint8_t>(b[9]) << 8);
    hoff = 10;
  } else {
    if (b.size() < 12) return bad("truncated header");
    uint32_t n;
    std::memcpy(&n, b.data() + 8, 4);
    hlen = n;
    hoff = 12;
  }
  if (hoff + hlen > b.size()) return bad("header runs past the end");
  const std::string h = b.substr(hoff, hlen);
  DType dt;
  if (h.find("'<f4'") != std::string::npos) {
    dt = DType::kF32;
  } else if (h.find("'<f2'") != std::string::npos) {
    dt = DType::kF16;
  } else {
    return bad("dtype must be <f4 or <f2");
  }
  if (h.find("'fortran_order': False") == std::string::npos) return bad("must be C order");
  const size_t p0 = h.find('('), p1 = h.find(')');
  if (p0 == std::string::npos || p1 == std::string::npos) return bad("no shape");
  std::vector<int64_t> shape;
  for (absl::string_view d : absl::StrSplit(h.substr(p0 + 1, p1 - p0 - 1), ',')) {
    std::string t(d);
    t.erase(std::remove(t.begin(), t.end(), ' '), t.end());
    if (t.empty()) continue;
    int64_t v;
    if (!absl::SimpleAtoi(t, &v) || v <= 0) return bad("bad shape entry");
    shape.push_back(v);
  }
  if (shape.size() != 5 || shape[1] != 2)
    return bad("shape must be [layers, 2, n, kv_heads, head_dim]");
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  const size_t data_off = hoff + hlen;
  if (b.size() - data_off != size_t(count) * DTypeSize(dt))
    return bad("data size does not match the shape");
  kernels::KvSamples s;
  s.layers = int(shape[0]);
  s.kv_heads = int(shape[3]);
  s.head_dim = int(shape[4]);
  const int64_t plane = shape[2] * shape[3] * shape[4];
  for (int l = 0; l < s.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      std::vector<float> x(plane);
      ToFloat(dt, b.data() + data_off + (size_t(l) * 2 + c) * plane * DTypeSize(dt), plane,
              x.data());
      (c == 0 ? s.k : s.v).push_back(std::move(x));
    }
  }
  return s;
}

}  // namespace

absl::StatusOr<kernels::KvSamples> LoadSamples(const std::string& path) {
  if (EndsWith(path, ".npy")) return LoadNpy(path);
  VQKV_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(path));
  auto bad = [&](const std::string& m) {
    return absl::InvalidArgumentError(absl::StrCat("samples '", path, "': ", m));
  };
  kernels::KvSamples s;
  while (f.Has(absl::StrCat("layer", s.layers, ".k"))) ++s.layers;
  if (s.layers == 0) return bad("no tensor 'layer0.k' (expected layer{l}.k / layer{l}.v)");
  for (int l = 0; l < s.layers; ++l) {
    for (int c = 0; c < 3; ++c) {
      const std::string name = absl::StrCat("layer", l, c == 0 ? ".k" : c == 1 ? ".v" : ".q");
      if (c == 2 && !f.Has(name)) {
        if (l > 0 && !s.q.empty())
          return bad(absl::StrCat("'", name, "' missing while layer 0 has queries"));
        continue;
      }
      VQKV_ASSIGN_OR_RETURN(TensorInfo info, f.Info(name));
      if (info.shape.size() != 3)
        return bad(absl::StrCat("'", name, "' must be [n, heads, head_dim]"));
      if (c < 2) {
        if (l == 0 && c == 0) {
          s.kv_heads = int(info.shape[1]);
          s.head_dim = int(info.shape[2]);
        }
        if (info.shape[1] != s.kv_heads || info.shape[2] != s.head_dim ||
            info.shape[0] != f.Info(absl::StrCat("layer", l, ".k"))->shape[0]) {
          return bad(absl::StrCat("'", name, "' shape disagrees with layer0.k"));
        }
      } else {
        if (l == 0) s.q_heads = int(info.shape[1]);
        if (info.shape[1] != s.q_heads || info.shape[2] != s.head_dim)
          return bad(absl::StrCat("'", name, "' shape disagrees"));
      }
      VQKV_ASSIGN_OR_RETURN(std::vector<float> x, f.ReadFloat(name));
      (c == 0 ? s.k : c == 1 ? s.v : s.q).push_back(std::move(x));
    }
  }
  if (f.metadata().count("seq_lens")) {
    int64_t total = 0;
    for (absl::string_view p : absl::StrSplit(f.metadata().at("seq_lens"), ',')) {
      int64_t v;
      if (!absl::SimpleAtoi(p, &v) || v <= 0)
        return bad("metadata 'seq_lens' is not a list of positive integers");
      s.seq_lens.push_back(v);
      total += v;
    }
    if (total != s.tokens(0)) return bad("metadata 'seq_lens' does not add up to the token count");
  }
  return s;
}

absl::Status SaveSamples(const kernels::KvSamples& s, const std::string& path) {
  SafetensorsWriter w;
  for (int l = 0; l < s.layers; ++l) {
    const int64_t n = s.tokens(l);
    w.AddF32(absl::StrCat("layer", l, ".k"), {n, s.kv_heads, s.head_dim}, s.k[l].data());
    w.AddF32(absl::StrCat("layer", l, ".v"), {n, s.kv_heads, s.head_dim}, s.v[l].data());
    if (!s.q.empty())
      w.AddF32(absl::StrCat("layer", l, ".q"), {n, s.q_heads, s.head_dim}, s.q[l].data());
  }
  if (!s.seq_lens.empty()) w.SetMetadata("seq_lens", absl::StrJoin(s.seq_lens, ","));
  w.SetMetadata("format", "vqkv-kv-samples");
  return w.WriteFile(path);
}

}  // namespace vqkv::eval
