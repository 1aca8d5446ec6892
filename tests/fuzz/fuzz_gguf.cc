// Fuzzes the GGUF reader (model files users point --model at).
#include <cstddef>
#include <cstdint>
#include <string>

#include "model/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)vqkv::model::GgufFile::Parse(std::string(reinterpret_cast<const char*>(data), size),
                                     "fuzz");
  return 0;
}
