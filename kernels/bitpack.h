// Bit packing of unsigned codes at any width 1..16 bits, LSB-first, no padding between codes
// (a stream of n codes of w bits occupies ceil(n*w/8) bytes).
// Thread-safety: BitWriter/BitReader are single-threaded values.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace vqkv::kernels {

inline int64_t PackedBytes(int64_t count, int bits) { return (count * bits + 7) / 8; }

// Appends codes to a byte string.
class BitWriter {
 public:
  explicit BitWriter(std::string* out) : out_(out) {}
  ~BitWriter() { Flush(); }
  // Writes the low `bits` bits of `code`.
  void Put(uint32_t code, int bits) {
    acc_ |= static_cast<uint64_t>(code & ((1u << bits) - 1u)) << nacc_;
    nacc_ += bits;
    while (nacc_ >= 8) {
      out_->push_back(static_cast<char>(acc_ & 0xff));
      acc_ >>= 8;
      nacc_ -= 8;
    }
  }
  // Writes any partial byte (zero-padded). Called by the destructor.
  void Flush() {
    if (nacc_ > 0) out_->push_back(static_cast<char>(acc_ & 0xff));
    acc_ = 0;
    nacc_ = 0;
  }

 private:
  std::string* out_;
  uint64_t acc_ = 0;
  int nacc_ = 0;
};

// Reads codes back. The caller checks the stream length beforehand (PackedBytes); reading past
// the end returns zeros rather than touching memory outside `in`.
class BitReader {
 public:
  explicit BitReader(std::string_view in) : in_(in) {}
  uint32_t Get(int bits) {
    while (nacc_ < bits) {
      const uint64_t byte = pos_ < in_.size() ? static_cast<uint8_t>(in_[pos_]) : 0;
      ++pos_;
      acc_ |= byte << nacc_;
      nacc_ += 8;
    }
    const uint32_t v = static_cast<uint32_t>(acc_ & ((uint64_t{1} << bits) - 1));
    acc_ >>= bits;
    nacc_ -= bits;
    return v;
  }
  // Skips `n` bits.
  void Skip(int64_t n) {
    while (n > 0) {
      const int step = n > 16 ? 16 : static_cast<int>(n);
      Get(step);
      n -= step;
    }
  }

 private:
  std::string_view in_;
  size_t pos_ = 0;
  uint64_t acc_ = 0;
  int nacc_ = 0;
};

}  // namespace vqkv::kernels
