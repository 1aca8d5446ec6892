// Fuzzes the safetensors parser (codebook files, sample files, model weights).
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f =
      vqkv::SafetensorsFile::Parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!f.ok()) return 0;
  for (const auto& [name, info] : f->tensors()) {
    if (info.end - info.begin <= (1u << 20)) (void)f->ReadFloat(name);
  }
  return 0;
}
