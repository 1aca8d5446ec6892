// GPT-2 style byte-level BPE pre-tokenization (as Hugging Face's ByteLevel pre-tokenizer with
// use_regex, preceded by Digits(individual_digits) as SmolLM / StarCoder tokenizers do): the
// text is split into words by the GPT-2 regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// and each word's bytes are mapped to the printable code points of GPT-2's bytes_to_unicode
// table, the alphabet of the BPE vocabulary ("Ġ" for a space).
// Unicode classes: \p{L} and \s come from the C library's classification in the C.UTF-8 locale,
// \p{N} is a decimal digit or another alphanumeric that is not a letter; this matches Hugging
// Face on ASCII and common Latin/Greek/Cyrillic/CJK text, and may differ on rare code points.
// Thread-safety: pure functions.
#pragma once

#include <string>
#include <vector>

namespace vqkv::model {

// Words of `text` (UTF-8), each already mapped to the byte-level alphabet (UTF-8 of the mapped
// code points). With `split_digits`, every numeric character is a word of its own first.
std::vector<std::string> ByteLevelPreTokenize(const std::string& text, bool split_digits);

// The byte-level alphabet spelling of raw bytes `bytes`.
std::string ByteLevelEncode(const std::string& bytes);

// Inverse of ByteLevelEncode: code points outside the table are kept as their UTF-8.
std::string ByteLevelDecode(const std::string& mapped);

}  // namespace vqkv::model
