// Tokenizer::Load: interpreting the parts of tokenizer.json.
#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "model/json_util.h"
#include "model/tokenizer.h"

namespace vqkv::model {
namespace {

using json = json_util::json;

std::string TokenContent(const json* j) {
  if (j == nullptr) return "";
  if (j->is_string()) return j->get<std::string>();
  return json_util::StringOr(*j, "content", "");
}

absl::Status Invalid(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer ", path, ": ", what));
}

absl::Status Unsupported(const std::string& path, const std::string& what, const json& j) {
  return absl::UnimplementedError(
      absl::StrCat("tokenizer ", path, ": unsupported ", what, " ", j.dump().substr(0, 200)));
}

// The elements of a "Sequence" component (under `list_key`), or the component itself.
std::vector<const json*> Components(const json* j, const char* list_key) {
  std::vector<const json*> out;
  if (j == nullptr) return out;
  if (json_util::StringOr(*j, "type", "") == "Sequence") {
    const json* list = json_util::Field(*j, list_key);
    if (list != nullptr && list->is_array()) {
      for (const json& e : *list) out.push_back(&e);
    } else {
      out.push_back(j);  // malformed Sequence: rejected by the caller as unsupported
    }
  } else {
    out.push_back(j);
  }
  return out;
}

}  // namespace

// Parses the parts of tokenizer.json into a Tokenizer; a friend so that Load() stays short.
class TokenizerLoader {
 public:
  static absl::Status Model(const json& root, const std::string& path, Tokenizer* tok) {
    const json* model = json_util::Field(root, "model");
    if (model == nullptr || !model->is_object()) return Invalid(path, "no model object");
    const std::string type = json_util::StringOr(*model, "type", "BPE");
    if (type != "BPE") return Unsupported(path, "model type", (*model)["type"]);
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (const json* f = json_util::Field(*model, key)) return Unsupported(path, key, *f);
    }
    const json* vocab = json_util::Field(*model, "vocab");
    if (vocab == nullptr || !vocab->is_object()) return Invalid(path, "no vocab object");
    constexpr int64_t kMaxId = int64_t{1} << 24;
    int max_id = -1;
    for (const auto& [token, id] : vocab->items()) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxId) {
        return Invalid(path, absl::StrCat("bad id for vocab entry ", token));
      }
      tok->token_to_id_[token] = id.get<int>();
      max_id = std::max(max_id, id.get<int>());
    }
    std::vector<Tokenizer::AddedToken> added;
    if (const json* list = json_util::Field(root, "added_tokens"); list && list->is_array()) {
      for (const json& a : *list) {
        Tokenizer::AddedToken t;
        t.id = json_util::IntOr(a, "id", -1);
        t.content = json_util::StringOr(a, "content", "");
        if (t.id < 0 || t.id > kMaxId || t.content.empty()) {
          return Invalid(path, absl::StrCat("malformed added token ", a.dump().substr(0, 100)));
        }
        t.normalized = json_util::BoolOr(a, "normalized", true);
        t.special = json_util::BoolOr(a, "special", false);
        max_id = std::max(max_id, t.id);
        added.push_back(std::move(t));
      }
    }
    tok->id_to_token_.assign(max_id + 1, "");
    tok->is_special_.assign(max_id + 1, false);
    for (const auto& [token, id] : tok->token_to_id_) tok->id_to_token_[id] = token;
    for (const Tokenizer::AddedToken& t : added) {
      tok->id_to_token_[t.id] = t.content;
      tok->is_special_[t.id] = t.special;
      tok->token_to_id_.emplace(t.content, t.id);
    }
    tok->added_ = std::move(added);

    if (const json* merges = json_util::Field(*model, "merges")) {
      if (!merges->is_array()) return Invalid(path, "merges is not an array");
      int rank = 0;
      for (const json& m : *merges) {
        std::string a, b;
        if (m.is_string()) {
          const std::string s = m.get<std::string>();
          const size_t sp = s.find(' ');
          if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
            return Invalid(path, absl::StrCat("merge ", rank, " is not 'a b': ", s));
          }
          a = s.substr(0, sp);
          b = s.substr(sp + 1);
        } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
          a = m[0].get<std::string>();
          b = m[1].get<std::string>();
        } else {
          return Invalid(path, absl::StrCat("merge ", rank, " malformed"));
        }
        const int ia = tok->TokenToId(a), ib = tok->TokenToId(b), im = tok->TokenToId(a + b);
        if (ia < 0 || ib < 0 || im < 0) {
          return Invalid(path, absl::StrCat("merge ", rank, " (", a, " ", b, ") not in vocab"));
        }
        tok->merges_.emplace(Tokenizer::PairKey(ia, ib), Tokenizer::Merge{rank, im});
        ++rank;
      }
    }
    tok->byte_fallback_ = json_util::BoolOr(*model, "byte_fallback", false);
    tok->fuse_unk_ = json_util::BoolOr(*model, "fuse_unk", false);
    tok->unk_id_ = tok->TokenToId(json_util::StringOr(*model, "unk_token", ""));
    for (int b = 0; b < 256; ++b) {
      static const char kHex[] = "0123456789ABCDEF";
      tok->byte_token_id_[b] = tok->TokenToId({'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'});
    }
    return absl::OkStatus();
  }

  // Normalizer: Prepend / Replace (string pattern), possibly inside a Sequence; no
  // pre-tokenizer.
  static absl::Status Normalizer(const json& root, const std::string& path, Tokenizer* tok) {
    for (const json* n : Components(json_util::Field(root, "normalizer"), "normalizers")) {
      const std::string type = json_util::StringOr(*n, "type", "");
      Tokenizer::NormalizerOp op;
      const json* pattern = json_util::Field(*n, "pattern");
      if (type == "Prepend" && json_util::Field(*n, "prepend") != nullptr) {
        op.prepend = true;
        op.content = json_util::StringOr(*n, "prepend", "");
      } else if (type == "Replace" && pattern != nullptr &&
                 !json_util::StringOr(*pattern, "String", "").empty()) {
        op.pattern = json_util::StringOr(*pattern, "String", "");
        op.content = json_util::StringOr(*n, "content", "");
      } else {
        return Unsupported(path, "normalizer", *n);
      }
      tok->normalizer_.push_back(std::move(op));
    }
    for (const Tokenizer::NormalizerOp& op : tok->normalizer_) {
      if (op.prepend) tok->prepend_token_id_ = tok->TokenToId(op.content);
    }
    if (const json* pre = json_util::Field(root, "pre_tokenizer")) {
      return Unsupported(path, "pre_tokenizer (only null)", *pre);
    }
    // Added tokens are matched after normalising their content the same way as the text.
    for (Tokenizer::AddedToken& t : tok->added_) {
      t.match = t.normalized ? tok->Normalize(t.content) : t.content;
    }
    return absl::OkStatus();
  }

  // BOS from the post-processor template; BOS (as fallback) and EOS from
  // tokenizer_config.json next to the file when present.
  static void SpecialIds(const json& root, const std::string& path, Tokenizer* tok) {
    const json* pp = json_util::Field(root, "post_processor");
    const json* single = pp ? json_util::Field(*pp, "single") : nullptr;
    if (pp != nullptr && json_util::StringOr(*pp, "type", "") == "TemplateProcessing" &&
        single != nullptr && single->is_array() && !single->empty()) {
      if (const json* st = json_util::Field((*single)[0], "SpecialToken")) {
        const std::string name = json_util::StringOr(*st, "id", "");
        const json* specials = json_util::Field(*pp, "special_tokens");
        const json* entry = specials ? json_util::Field(*specials, name.c_str()) : nullptr;
        const json* ids = entry ? json_util::Field(*entry, "ids") : nullptr;
        if (ids != nullptr && ids->is_array() && !ids->empty() && (*ids)[0].is_number_integer()) {
          tok->bos_id_ = (*ids)[0].get<int>();
        } else {
          tok->bos_id_ = tok->TokenToId(name);
        }
      }
    }
    const std::filesystem::path cfg_path =
        std::filesystem::path(path).parent_path() / "tokenizer_config.json";
    if (!std::filesystem::exists(cfg_path)) return;
    const auto text = ReadFileToString(cfg_path.string());
    if (!text.ok()) return;
    const json cfg = json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (tok->bos_id_ < 0)
      tok->bos_id_ = tok->TokenToId(TokenContent(json_util::Field(cfg, "bos_token")));
    tok->eos_id_ = tok->TokenToId(TokenContent(json_util::Field(cfg, "eos_token")));
  }

  static absl::Status Decoder(const json& root, const std::string& path, Tokenizer* tok) {
    for (const json* d : Components(json_util::Field(root, "decoder"), "decoders")) {
      const std::string type = json_util::StringOr(*d, "type", "");
      Tokenizer::DecoderOp op;
      const json* pattern = json_util::Field(*d, "pattern");
      if (type == "Replace" && pattern != nullptr &&
          !json_util::StringOr(*pattern, "String", "").empty()) {
        op.step = Tokenizer::DecodeStep::kReplace;
        op.pattern = json_util::StringOr(*pattern, "String", "");
        op.content = json_util::StringOr(*d, "content", "");
      } else if (type == "ByteFallback") {
        op.step = Tokenizer::DecodeStep::kByteFallback;
      } else if (type == "Fuse") {
        op.step = Tokenizer::DecodeStep::kFuse;
      } else if (type == "Strip") {
        op.step = Tokenizer::DecodeStep::kStrip;
        op.content = json_util::StringOr(*d, "content", " ");
        op.start = json_util::IntOr(*d, "start", 0);
        op.stop = json_util::IntOr(*d, "stop", 0);
      } else {
        return Unsupported(path, "decoder", *d);
      }
      tok->decoder_.push_back(std::move(op));
    }
    return absl::OkStatus();
  }
};

absl::StatusOr<Tokenizer> Tokenizer::Load(const std::string& path) {
  if (!std::filesystem::exists(path)) {
    return absl::NotFoundError(absl::StrCat("tokenizer file not found: ", path));
  }
  VQKV_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  const json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) return Invalid(path, "not a JSON object");
  Tokenizer tok;
  std::fill(std::begin(tok.byte_token_id_), std::end(tok.byte_token_id_), -1);
  VQKV_RETURN_IF_ERROR(TokenizerLoader::Model(root, path, &tok));
  VQKV_RETURN_IF_ERROR(TokenizerLoader::Normalizer(root, path, &tok));
  TokenizerLoader::SpecialIds(root, path, &tok);
  VQKV_RETURN_IF_ERROR(TokenizerLoader::Decoder(root, path, &tok));
  return tok;
}

}  // namespace vqkv::model
