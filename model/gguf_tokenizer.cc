#include "model/gguf_tokenizer.h"

#include <algorithm>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace vqkv::model {

// Fills the Tokenizer's private tables; a friend of Tokenizer.
class GgufTokenizerLoader {
 public:
  static absl::StatusOr<Tokenizer> Load(const GgufFile& g) {
    auto bad = [&](const std::string& msg) {
      return absl::InvalidArgumentError(absl::StrCat("gguf ", g.what(), ": ", msg));
    };
    VQKV_ASSIGN_OR_RETURN(std::string model, g.GetString("tokenizer.ggml.model"));
    if (model != "gpt2") {
      return absl::UnimplementedError(
          absl::StrCat("gguf ", g.what(), ": tokenizer.ggml.model '", model, "' (only gpt2)"));
    }
    std::string pre = "default";
    if (g.Find("tokenizer.ggml.pre") != nullptr) {
      VQKV_ASSIGN_OR_RETURN(pre, g.GetString("tokenizer.ggml.pre"));
    }
    // llama.cpp's pre-tokenizer families that are "digits one by one, then the GPT-2 regex"
    // or the plain GPT-2 regex; others use different regexes and are refused.
    static const std::set<std::string> kDigits = {
        "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"};
    static const std::set<std::string> kPlain = {"default", "gpt2", "mpt", "olmo", "jais"};
    const bool split_digits = kDigits.count(pre) != 0;
    if (!split_digits && kPlain.count(pre) == 0) {
      return absl::UnimplementedError(
          absl::StrCat("gguf ", g.what(), ": tokenizer.ggml.pre '", pre, "' is not supported"));
    }
    VQKV_ASSIGN_OR_RETURN(std::vector<std::string> tokens,
                          g.GetStringArray("tokenizer.ggml.tokens"));
    if (tokens.empty() || tokens.size() > (size_t{1} << 24)) {
      return bad(absl::StrCat("tokenizer.ggml.tokens has ", tokens.size(), " entries"));
    }
    std::vector<int> types(tokens.size(), 1);
    if (const GgufValue* tt = g.Find("tokenizer.ggml.token_type")) {
      if (tt->type != GgufType::kArray || tt->array.size() != tokens.size()) {
        return bad("tokenizer.ggml.token_type is not an array as long as the tokens");
      }
      for (size_t i = 0; i < tokens.size(); ++i) types[i] = static_cast<int>(tt->array[i].i);
    }

    Tokenizer tok;
    std::fill(std::begin(tok.byte_token_id_), std::end(tok.byte_token_id_), -1);
    tok.byte_level_ = true;
    tok.split_digits_ = split_digits;
    tok.id_to_token_ = tokens;
    tok.is_special_.assign(tokens.size(), false);
    for (size_t i = 0; i < tokens.size(); ++i) {
      tok.token_to_id_.emplace(tokens[i], static_cast<int>(i));
      if (types[i] == 3 || types[i] == 4) {  // control, user-defined: matched in raw text
        Tokenizer::AddedToken a;
        a.content = a.match = tokens[i];
        a.id = static_cast<int>(i);
        a.normalized = false;
        a.special = types[i] == 3;
        tok.is_special_[i] = a.special;
        if (!a.content.empty()) tok.added_.push_back(std::move(a));
      }
    }
    VQKV_ASSIGN_OR_RETURN(std::vector<std::string> merges,
                          g.GetStringArray("tokenizer.ggml.merges"));
    for (size_t r = 0; r < merges.size(); ++r) {
      const std::string& m = merges[r];
      const size_t sp = m.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == m.size() ||
          m.find(' ', sp + 1) != std::string::npos) {
        return bad(absl::StrCat("merge ", r, " is not 'a b': ", m.substr(0, 100)));
      }
      const std::string a = m.substr(0, sp), b = m.substr(sp + 1);
      const int ia = tok.TokenToId(a), ib = tok.TokenToId(b), im = tok.TokenToId(a + b);
      if (ia < 0 || ib < 0 || im < 0) {
        return bad(absl::StrCat("merge ", r, " (", m.substr(0, 100), ") not in the vocabulary"));
      }
      tok.merges_.emplace(Tokenizer::PairKey(ia, ib), Tokenizer::Merge{static_cast<int>(r), im});
    }
    auto id_of = [&](const char* key, int* out) -> absl::Status {
      if (g.Find(key) == nullptr) return absl::OkStatus();
      VQKV_ASSIGN_OR_RETURN(int64_t id, g.GetInt(key));
      if (id < 0 || id >= static_cast<int64_t>(tokens.size())) {
        return bad(absl::StrCat(key, " ", id, " is outside the vocabulary"));
      }
      *out = static_cast<int>(id);
      return absl::OkStatus();
    };
    VQKV_RETURN_IF_ERROR(id_of("tokenizer.ggml.bos_token_id", &tok.bos_id_));
    VQKV_RETURN_IF_ERROR(id_of("tokenizer.ggml.eos_token_id", &tok.eos_id_));
    VQKV_RETURN_IF_ERROR(id_of("tokenizer.ggml.unknown_token_id", &tok.unk_id_));
    bool add_bos = true;
    if (const GgufValue* v = g.Find("tokenizer.ggml.add_bos_token");
        v != nullptr && v->type == GgufType::kBool) {
      add_bos = v->i != 0;
    }
    if (!add_bos && tok.TokenToId("<|endoftext|>") >= 0) {
      tok.bos_id_ = tok.TokenToId("<|endoftext|>");
    }
    return tok;
  }
};

absl::StatusOr<Tokenizer> LoadGgufTokenizer(const GgufFile& gguf) {
  return GgufTokenizerLoader::Load(gguf);
}

}  // namespace vqkv::model
