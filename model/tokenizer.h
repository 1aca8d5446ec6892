// A Hugging Face tokenizer.json BPE tokenizer (the SentencePiece-style "LLaMA" flavour):
// normalizer Prepend/Replace, no pre-tokenizer, merges by priority, byte fallback, added
// (special) tokens, and the Replace/ByteFallback/Fuse/Strip decoder chain. Other tokenizer
// families (WordPiece, Unigram, and byte-level BPE in tokenizer.json) are rejected at Load() with
// Unimplemented. GPT-2 style byte-level BPE is built from GGUF metadata by LoadGgufTokenizer
// (model/gguf_tokenizer.h).
// Thread-safety: a Tokenizer is immutable after Load(); all methods are const and may be called
// from any number of threads.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::model {

class Tokenizer {
 public:
  // Parses the tokenizer.json at `path`. NotFound (naming the path) when the file is missing;
  // InvalidArgument for malformed JSON or inconsistent vocab/merges; Unimplemented for
  // model/normalizer/pre-tokenizer/decoder types this class does not implement.
  static absl::StatusOr<Tokenizer> Load(const std::string& path);

  // Token ids of `text` (UTF-8). Added-token strings in `text` (e.g. "<|end_story|>") become
  // their ids, as Hugging Face does by default. When `add_bos` and the tokenizer has a BOS
  // token (bos_id() >= 0), it is prepended. Characters missing from the vocab become byte
  // tokens "<0xXX>" when the vocab has them, else the unk token (consecutive unks fused when
  // the tokenizer says fuse_unk).
  std::vector<int> Encode(const std::string& text, bool add_bos) const;

  // BOS + Encode(text) without the standalone prepend token (the lone "▁", id 80 for
  // tinystories-656k) that the normaliser puts at the start of every text and that the model
  // never saw after BOS in training. Use this to score text with the model.
  std::vector<int> EncodeForScoring(const std::string& text) const;

  // Text of `ids` through the tokenizer's decoder (for LLaMA: "▁" -> " ", <0xXX> bytes fused
  // into UTF-8, one leading space stripped). Special added tokens (BOS, EOS, unk, ...) are
  // skipped; out-of-range ids are skipped.
  std::string Decode(const std::vector<int>& ids) const;

  // String of one token id ("" when out of range), without decoding.
  std::string IdToToken(int id) const;
  // Id of token string `token`, or -1.
  int TokenToId(const std::string& token) const;

  int vocab_size() const { return static_cast<int>(id_to_token_.size()); }
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  // Id of the normaliser's prepended string as a lone token ("▁"), or -1.
  int prepend_token_id() const { return prepend_token_id_; }

 private:
  friend class TokenizerLoader;
  friend class GgufTokenizerLoader;

  struct AddedToken {
    std::string content;
    std::string match;  // what is searched for: content, normalized when `normalized`
    int id = -1;
    bool normalized = true;
    bool special = false;
  };
  struct Merge {
    int rank = 0;
    int new_id = 0;
  };
  struct NormalizerOp {
    bool prepend = false;  // true: prepend `content` to non-empty text; false: Replace
    std::string pattern, content;
  };
  enum class DecodeStep : uint8_t { kReplace, kByteFallback, kFuse, kStrip };
  struct DecoderOp {
    DecodeStep step = DecodeStep::kFuse;
    std::string pattern, content;  // kReplace: pattern -> content; kStrip: content char
    int start = 0, stop = 0;       // kStrip: how many to strip from each end
  };

  Tokenizer() = default;

  static uint64_t PairKey(int a, int b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  std::string Normalize(const std::string& text) const;
  // A run of text still to be tokenized (id -1) or an added token already matched (id >= 0).
  struct Piece {
    std::string text;
    int id = -1;
  };
  // Splits the unmatched pieces of `in` on added tokens whose `normalized` flag equals
  // `normalized` (matching against their normalized content), leftmost-longest.
  std::vector<Piece> SplitOnAdded(const std::vector<Piece>& in, bool normalized) const;
  // BPE over one word (already normalized), appended to `out`.
  void EncodeWord(const std::string& word, std::vector<int>* out) const;

  std::unordered_map<std::string, int> token_to_id_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> is_special_;
  std::unordered_map<uint64_t, Merge> merges_;  // key: (left id << 32) | right id
  std::vector<AddedToken> added_;
  std::vector<NormalizerOp> normalizer_;  // applied in order
  std::vector<DecoderOp> decoder_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  int unk_id_ = -1;
  int bos_id_ = -1;
  int eos_id_ = -1;
  int prepend_token_id_ = -1;
  int byte_token_id_[256] = {};  // id of "<0xXX>" or -1 (set by Load)
  // GPT-2 byte-level BPE (model/byte_level.h): words come from ByteLevelPreTokenize and
  // Decode() maps the byte alphabet back to bytes.
  bool byte_level_ = false;
  bool split_digits_ = false;  // byte-level only: every digit is a word of its own
};

}  // namespace vqkv::model
