#include "kernels/ratio.h"

#include <algorithm>

namespace vqkv::kernels {

RatioReport ComputeRatio(const Codec& codec, const RatioInputs& in, int64_t codebook_bytes) {
  RatioReport r;
  const int64_t per_token_elems = int64_t{in.layers} * 2 * in.kv_heads * in.head_dim;
  const double base_bits = in.baseline_bits;
  // Codes only: a block with no sinks and no header, per element.
  const KvShape big{in.layers, 4096, in.kv_heads, in.head_dim};
  const int64_t body =
      codec.PayloadBytes(big, DType::kF16, in.sink_tokens) - int64_t{sizeof(PayloadHeader)};
  r.codes_bits_per_element = double(body) * 8 / double(big.elements());
  r.codes_only_ratio = 1 - r.codes_bits_per_element / base_bits;

  int64_t stored = 0;
  for (int64_t t0 = 0; t0 < in.context_tokens; t0 += in.block_tokens) {
    const int tokens = static_cast<int>(std::min<int64_t>(in.block_tokens, in.context_tokens - t0));
    stored += codec.PayloadBytes({in.layers, tokens, in.kv_heads, in.head_dim}, DType::kF16, t0);
  }
  const int64_t amortise = in.amortise_tokens > 0 ? in.amortise_tokens : in.context_tokens;
  const double cb_share =
      amortise > 0 ? double(codebook_bytes) * double(in.context_tokens) / double(amortise) : 0;
  r.codebook_bytes = codebook_bytes;
  r.baseline_bytes = in.context_tokens * per_token_elems * in.baseline_bits / 8;
  r.stored_bytes = stored + static_cast<int64_t>(cb_share);
  const double elems = double(in.context_tokens) * per_token_elems;
  r.all_in_bits_per_element = elems > 0 ? double(r.stored_bytes) * 8 / elems : 0;
  r.real_ratio = 1 - r.all_in_bits_per_element / base_bits;
  // Memory that holds context_tokens of fp16 KV: the codebooks take their full size once, the
  // rest holds compressed blocks at the per-token cost of this context.
  if (in.context_tokens > 0 && stored > 0) {
    const double per_token = double(stored) / double(in.context_tokens);
    const double room = double(r.baseline_bytes) - double(codebook_bytes);
    r.longer_context = room > 0 ? room / per_token / double(in.context_tokens) : 0;
  }
  return r;
}

}  // namespace vqkv::kernels
