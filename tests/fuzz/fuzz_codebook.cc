// Fuzzes codebook loading (files users upload to the daemon).
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/codebook.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)vqkv::kernels::Codebook::FromBytes(std::string(reinterpret_cast<const char*>(data), size),
                                           "fuzz");
  return 0;
}
