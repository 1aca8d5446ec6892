#include "model/tokenizer.h"

#include <algorithm>
#include <queue>
#include <tuple>
#include <utility>

#include "model/byte_level.h"

namespace vqkv::model {
namespace {

// Length of the UTF-8 sequence starting at s[i]; a stray or truncated byte counts as one
// character so that byte fallback can still represent it.
size_t Utf8CharLen(const std::string& s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n = 1;
  if (c >= 0xF0 && c < 0xF8) {
    n = 4;
  } else if (c >= 0xE0) {
    n = c < 0xF0 ? 3 : 1;
  } else if (c >= 0xC0) {
    n = 2;
  }
  if (i + n > s.size()) return 1;
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 1;
  }
  return n;
}

bool IsValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    const size_t n = Utf8CharLen(s, i);
    if (n == 1) return false;
    // Reject overlong two-byte forms; enough for the byte-fallback use here.
    if (n == 2 && c < 0xC2) return false;
    i += n;
  }
  return true;
}

void ReplaceAll(std::string* s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  out.reserve(s->size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s->find(from, pos);
    if (hit == std::string::npos) break;
    out.append(*s, pos, hit - pos);
    out += to;
    pos = hit + from.size();
  }
  out.append(*s, pos, std::string::npos);
  *s = std::move(out);
}

// "<0xAB>" -> 0xAB, or -1.
int ParseByteToken(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  int v = 0;
  for (int i = 3; i < 5; ++i) {
    const char c = t[i];
    v *= 16;
    if (c >= '0' && c <= '9') {
      v += c - '0';
    } else if (c >= 'A' && c <= 'F') {
      v += c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      v += c - 'a' + 10;
    } else {
      return -1;
    }
  }
  return v;
}

}  // namespace

std::string Tokenizer::Normalize(const std::string& text) const {
  std::string s = text;
  for (const NormalizerOp& op : normalizer_) {
    if (op.prepend) {
      if (!s.empty()) s.insert(0, op.content);
    } else {
      ReplaceAll(&s, op.pattern, op.content);
    }
  }
  return s;
}

std::vector<Tokenizer::Piece> Tokenizer::SplitOnAdded(const std::vector<Piece>& in,
                                                      bool normalized) const {
  std::vector<Piece> out;
  for (const Piece& piece : in) {
    if (piece.id >= 0) {
      out.push_back(piece);
      continue;
    }
    const std::string& s = piece.text;
    size_t pos = 0;
    while (pos < s.size()) {
      size_t best = std::string::npos, best_len = 0;
      int best_id = -1;
      for (const AddedToken& t : added_) {
        if (t.normalized != normalized || t.match.empty()) continue;
        const size_t hit = s.find(t.match, pos);
        if (hit == std::string::npos) continue;
        if (hit < best || (hit == best && t.match.size() > best_len)) {
          best = hit;
          best_len = t.match.size();
          best_id = t.id;
        }
      }
      if (best_id < 0) break;
      if (best > pos) out.push_back({s.substr(pos, best - pos), -1});
      out.push_back({"", best_id});
      pos = best + best_len;
    }
    if (pos < s.size()) out.push_back({s.substr(pos), -1});
  }
  return out;
}

void Tokenizer::EncodeWord(const std::string& word, std::vector<int>* out) const {
  // Symbols form a doubly linked list so that a merge is O(1); candidate pairs sit in a
  // min-heap keyed by (merge rank, position) and are re-validated when popped, which is the
  // same order Hugging Face's BPE applies merges in.
  struct Symbol {
    int id, prev, next;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  bool last_unk = false;
  for (size_t i = 0; i < word.size();) {
    const size_t n = Utf8CharLen(word, i);
    const auto it = token_to_id_.find(word.substr(i, n));
    int id = it == token_to_id_.end() ? -1 : it->second;
    if (id < 0 && byte_fallback_) {
      bool all = true;
      for (size_t k = 0; k < n; ++k)
        all &= byte_token_id_[static_cast<unsigned char>(word[i + k])] >= 0;
      if (all) {
        for (size_t k = 0; k < n; ++k) {
          sym.push_back({byte_token_id_[static_cast<unsigned char>(word[i + k])], 0, 0});
        }
        last_unk = false;
        i += n;
        continue;
      }
    }
    i += n;
    if (id < 0) {
      if (unk_id_ < 0) continue;  // no unk token: the character is dropped, as HF does
      if (fuse_unk_ && last_unk) continue;
      sym.push_back({unk_id_, 0, 0});
      last_unk = true;
      continue;
    }
    sym.push_back({id, 0, 0});
    last_unk = false;
  }
  const int n = static_cast<int>(sym.size());
  for (int i = 0; i < n; ++i) {
    sym[i].prev = i - 1;
    sym[i].next = i + 1 < n ? i + 1 : -1;
  }
  using Cand = std::tuple<int, int, int, int>;  // rank, left position, left id, right id
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push_pair = [&](int left) {
    if (left < 0 || sym[left].next < 0) return;
    const int right = sym[left].next;
    const auto it = merges_.find(PairKey(sym[left].id, sym[right].id));
    if (it != merges_.end()) heap.emplace(it->second.rank, left, sym[left].id, sym[right].id);
  };
  for (int i = 0; i + 1 < n; ++i) push_pair(i);
  while (!heap.empty()) {
    const auto [rank, left, left_id, right_id] = heap.top();
    heap.pop();
    // Stale entries: the left symbol was merged away or changed, or its neighbour did.
    if (sym[left].id != left_id || sym[left].next < 0) continue;
    const int right = sym[left].next;
    if (sym[right].id != right_id) continue;
    sym[left].id = merges_.at(PairKey(left_id, right_id)).new_id;
    sym[left].next = sym[right].next;
    if (sym[right].next >= 0) sym[sym[right].next].prev = left;
    sym[right].id = -1;  // dead
    push_pair(sym[left].prev);
    push_pair(left);
  }
  for (int i = n > 0 ? 0 : -1; i >= 0; i = sym[i].next) out->push_back(sym[i].id);
}

std::vector<int> Tokenizer::Encode(const std::string& text, bool add_bos) const {
  std::vector<int> ids;
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
  std::vector<Piece> raw = SplitOnAdded({{text, -1}}, /*normalized=*/false);
  for (const Piece& p : raw) {
    if (p.id >= 0) {
      ids.push_back(p.id);
      continue;
    }
    for (const Piece& q : SplitOnAdded({{Normalize(p.text), -1}}, /*normalized=*/true)) {
      if (q.id >= 0) {
        ids.push_back(q.id);
      } else if (byte_level_) {
        for (const std::string& w : ByteLevelPreTokenize(q.text, split_digits_)) {
          EncodeWord(w, &ids);
        }
      } else {
        EncodeWord(q.text, &ids);
      }
    }
  }
  return ids;
}

std::vector<int> Tokenizer::EncodeForScoring(const std::string& text) const {
  std::vector<int> ids = Encode(text, /*add_bos=*/true);
  const size_t first = bos_id_ >= 0 ? 1 : 0;
  if (prepend_token_id_ >= 0 && ids.size() > first && ids[first] == prepend_token_id_) {
    ids.erase(ids.begin() + first);
  }
  return ids;
}

std::string Tokenizer::Decode(const std::vector<int>& ids) const {
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (int id : ids) {
    if (id < 0 || id >= vocab_size() || is_special_[id]) continue;
    toks.push_back(id_to_token_[id]);
  }
  for (const DecoderOp& op : decoder_) {
    switch (op.step) {
      case DecodeStep::kReplace:
        for (std::string& t : toks) ReplaceAll(&t, op.pattern, op.content);
        break;
      case DecodeStep::kByteFallback: {
        std::vector<std::string> out;
        std::string bytes;
        int nbytes = 0;
        auto flush = [&] {
          if (nbytes == 0) return;
          if (IsValidUtf8(bytes)) {
            out.push_back(bytes);
          } else {
            for (int k = 0; k < nbytes; ++k) out.push_back("\xEF\xBF\xBD");  // U+FFFD
          }
          bytes.clear();
          nbytes = 0;
        };
        for (std::string& t : toks) {
          const int b = ParseByteToken(t);
          if (b >= 0) {
            bytes.push_back(static_cast<char>(b));
            ++nbytes;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        toks = std::move(out);
        break;
      }
      case DecodeStep::kFuse: {
        std::string all;
        for (const std::string& t : toks) all += t;
        toks.assign(1, std::move(all));
        break;
      }
      case DecodeStep::kStrip:
        for (std::string& t : toks) {
          int cut = 0;
          size_t b = 0;
          while (cut < op.start && !op.content.empty() &&
                 t.compare(b, op.content.size(), op.content) == 0) {
            b += op.content.size();
            ++cut;
          }
          size_t e = t.size();
          cut = 0;
          while (cut < op.stop && !op.content.empty() && e >= b + op.content.size() &&
                 t.compare(e - op.content.size(), op.content.size(), op.content) == 0) {
            e -= op.content.size();
            ++cut;
          }
          t = t.substr(b, e - b);
        }
        break;
    }
  }
  std::string text;
  for (const std::string& t : toks) text += t;
  return byte_level_ ? ByteLevelDecode(text) : text;
}

std::string Tokenizer::IdToToken(int id) const {
  return id >= 0 && id < vocab_size() ? id_to_token_[id] : "";
}

int Tokenizer::TokenToId(const std::string& token) const {
  const auto it = token_to_id_.find(token);
  return it == token_to_id_.end() ? -1 : it->second;
}

}  // namespace vqkv::model
