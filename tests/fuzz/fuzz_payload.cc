// Fuzzes decoding of encoded blocks (what the store and the wire hand to a codec): any bytes must
// give a status, never a crash, a hang or an out-of-bounds access.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "kernels/codebook.h"
#include "kernels/codec.h"

namespace {
std::vector<std::unique_ptr<vqkv::kernels::Codec>> MakeCodecs() {
  using namespace vqkv::kernels;
  std::vector<std::unique_ptr<Codec>> out;
  for (const char* s : {"raw", "scalar-2", "scalar-4:group=7"})
    out.push_back(*CreateCodec(*ParseCodecSpec(s)));
  const RvqConfig cfg = RvqConfig::Uniform(2, 2, 8, {2, 16}, {1, 4});
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < 2; ++l) {
    tables.emplace_back(2 * 16 * 8, 0.5f);
    tables.emplace_back(1 * 4 * 8, -0.5f);
  }
  CodecSpec spec;
  spec.name = "rvq";
  spec.codebook = std::make_shared<const Codebook>(*Codebook::Create(cfg, tables));
  out.push_back(*CreateCodec(spec));
  spec.outliers = 2;  // the outlier entries (token indices, fp16 scales) are parsed too
  out.push_back(*CreateCodec(spec));
  return out;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto codecs = MakeCodecs();
  const std::string_view p(reinterpret_cast<const char*>(data), size);
  auto h = vqkv::kernels::ReadPayloadHeader(p);
  if (!h.ok() || vqkv::kernels::HeaderShape(*h).elements() > (1 << 20)) return 0;
  for (const auto& c : codecs) (void)c->DecodeToFloat(p);
  return 0;
}
