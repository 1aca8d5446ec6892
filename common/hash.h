// Content hashes: SHA-256 (codebook ids, stable across machines) and CRC32C (stored-block
// integrity, Castagnoli polynomial, as in iSCSI/LevelDB).
// Thread-safety: pure functions.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace vqkv {

std::array<uint8_t, 32> Sha256(std::string_view data);
// Lower-case hex of the first `bytes` bytes of SHA-256(data).
std::string Sha256Hex(std::string_view data, int bytes = 32);

// CRC32C of `data`, continuing from `crc` (0 to start).
uint32_t Crc32c(std::string_view data, uint32_t crc = 0);

}  // namespace vqkv
