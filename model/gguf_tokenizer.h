// Builds a Tokenizer from GGUF metadata (tokenizer.ggml.*) for the "gpt2" tokenizer model:
// byte-level BPE over tokenizer.ggml.tokens and .merges, control / user-defined tokens
// (token_type 3 / 4) matched in text as added tokens, GPT-2 regex pre-tokenization with
// individual digits for the pre-tokenizer families that use it (tokenizer.ggml.pre "smollm",
// "starcoder", "refact", ...).
// BOS: when tokenizer.ggml.add_bos_token is false (SmolLM2) the model was trained on documents
// separated by "<|endoftext|>", so that token (when present) is the Tokenizer's bos_id() and
// starts each scored text (EncodeForScoring); otherwise tokenizer.ggml.bos_token_id.
// Thread-safety: plain functions.
#pragma once

#include "absl/status/statusor.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace vqkv::model {

// Unimplemented for a tokenizer.ggml.model other than "gpt2" or an unknown .pre;
// InvalidArgument (naming the key) for missing or inconsistent tokens/merges/ids.
absl::StatusOr<Tokenizer> LoadGgufTokenizer(const GgufFile& gguf);

}  // namespace vqkv::model
