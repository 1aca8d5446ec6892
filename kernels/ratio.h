// Compression ratio accounting: the paper's codes-only figure and the real one (codes + per-block
// headers + lossless sink tokens + codebooks amortised over a stated number of tokens).
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/codec.h"

namespace vqkv::kernels {

struct RatioInputs {
  int layers = 1, kv_heads = 1, head_dim = 128;
  int64_t context_tokens = 0;   // tokens in one sequence
  int block_tokens = 256;       // tokens per stored block
  int sink_tokens = 4;          // kept lossless (fp16)
  int64_t amortise_tokens = 0;  // codebooks are shared by this many tokens (0: by context_tokens)
  int baseline_bits = 16;       // fp16 KV
};

struct RatioReport {
  double codes_bits_per_element = 0;   // codes only
  double codes_only_ratio = 0;         // 1 - codes / baseline
  double all_in_bits_per_element = 0;  // codes + headers + sinks + amortised codebooks
  double real_ratio = 0;               // 1 - all-in / baseline
  int64_t baseline_bytes = 0;          // fp16 bytes of context_tokens
  int64_t stored_bytes = 0;            // all-in bytes of context_tokens (codebook share included)
  int64_t codebook_bytes = 0;
  double longer_context = 0;  // tokens that fit in baseline_bytes when compressed / context_tokens
};

// Accounting for any codec: `payload_bytes(tokens, first_token)` gives one block's payload size.
// Works for rvq (via its codebook config) and scalar/raw (codebook_bytes 0).
RatioReport ComputeRatio(const Codec& codec, const RatioInputs& in, int64_t codebook_bytes);

}  // namespace vqkv::kernels
