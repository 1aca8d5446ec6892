#include "model/byte_level.h"

#include <locale.h>
#include <wctype.h>

#include <array>
#include <unordered_map>

namespace vqkv::model {
namespace {

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100 onwards in byte order.
struct ByteTable {
  std::array<std::string, 256> to_utf8;
  std::unordered_map<uint32_t, unsigned char> from_cp;
};

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

const ByteTable& Table() {
  static const ByteTable* table = [] {
    auto* t = new ByteTable;
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? b : next++;
      AppendUtf8(cp, &t->to_utf8[b]);
      t->from_cp[cp] = static_cast<unsigned char>(b);
    }
    return t;
  }();
  return *table;
}

// Decodes one code point at s[i]; *len gets its byte length. Malformed bytes decode as
// themselves (length 1), which classifies them as punctuation.
uint32_t NextCodePoint(const std::string& s, size_t i, size_t* len) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  int n = c < 0x80 ? 1 : c >= 0xF0 && c < 0xF8 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
  if (n == 0 || i + n > s.size()) {
    *len = 1;
    return c;
  }
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k < n; ++k) {
    const unsigned char cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) {
      *len = 1;
      return c;
    }
    cp = (cp << 6) | (cc & 0x3F);
  }
  *len = n;
  return cp;
}

enum class Cls { kLetter, kNumber, kSpace, kOther };

locale_t Utf8Locale() {
  static const locale_t loc = [] {
    locale_t l = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
    return l != static_cast<locale_t>(0) ? l
                                         : newlocale(LC_CTYPE_MASK, "C", static_cast<locale_t>(0));
  }();
  return loc;
}

Cls Classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return Cls::kLetter;
    if (cp >= '0' && cp <= '9') return Cls::kNumber;
    if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return Cls::kSpace;
    return Cls::kOther;
  }
  const locale_t loc = Utf8Locale();
  const auto wc = static_cast<wint_t>(cp);
  if (iswspace_l(wc, loc) || cp == 0x85 || cp == 0xA0) return Cls::kSpace;
  if (iswalpha_l(wc, loc)) return Cls::kLetter;
  if (iswalnum_l(wc, loc) || iswdigit_l(wc, loc)) return Cls::kNumber;
  return Cls::kOther;
}

struct Char {
  size_t begin, len;
  Cls cls;
  uint32_t cp;
};

// Applies the GPT-2 regex to chars[b, e), appending matched byte ranges of `s` to `out`.
void SplitRegex(const std::string& s, const std::vector<Char>& ch, size_t b, size_t e,
                std::vector<std::string>* out) {
  auto emit = [&](size_t i, size_t j) {
    const size_t from = ch[i].begin, to = ch[j - 1].begin + ch[j - 1].len;
    out->push_back(s.substr(from, to - from));
  };
  auto run = [&](size_t i, Cls cls) {
    while (i < e && ch[i].cls == cls) ++i;
    return i;
  };
  size_t i = b;
  while (i < e) {
    // 's 't 're 've 'm 'll 'd
    if (ch[i].cp == '\'' && i + 1 < e) {
      const uint32_t c1 = ch[i + 1].cp, c2 = i + 2 < e ? ch[i + 2].cp : 0;
      size_t n = 0;
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        n = 2;
      } else if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
        n = 3;
      }
      if (n > 0) {
        emit(i, i + n);
        i += n;
        continue;
      }
    }
    const size_t j = ch[i].cp == ' ' && i + 1 < e ? i + 1 : i;  // optional leading space
    if (ch[j].cls == Cls::kLetter || ch[j].cls == Cls::kNumber) {
      const size_t k = run(j, ch[j].cls);
      emit(i, k);
      i = k;
      continue;
    }
    if (ch[j].cls == Cls::kOther) {
      const size_t k = run(j, Cls::kOther);
      emit(i, k);
      i = k;
      continue;
    }
    // Whitespace: \s+(?!\S) leaves the last space of a run to the word after it; \s+ takes a
    // single space that precedes a non-space.
    const size_t k = run(i, Cls::kSpace);
    if (k == e || k - i == 1) {
      emit(i, k);
      i = k;
    } else {
      emit(i, k - 1);
      i = k - 1;
    }
  }
}

}  // namespace

std::string ByteLevelEncode(const std::string& bytes) {
  const ByteTable& t = Table();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) out += t.to_utf8[c];
  return out;
}

std::string ByteLevelDecode(const std::string& mapped) {
  const ByteTable& t = Table();
  std::string out;
  out.reserve(mapped.size());
  for (size_t i = 0; i < mapped.size();) {
    size_t len;
    const uint32_t cp = NextCodePoint(mapped, i, &len);
    const auto it = t.from_cp.find(cp);
    if (it != t.from_cp.end() && len > 0) {
      out.push_back(static_cast<char>(it->second));
    } else {
      out.append(mapped, i, len);
    }
    i += len;
  }
  return out;
}

std::vector<std::string> ByteLevelPreTokenize(const std::string& text, bool split_digits) {
  std::vector<Char> ch;
  for (size_t i = 0; i < text.size();) {
    size_t len;
    const uint32_t cp = NextCodePoint(text, i, &len);
    ch.push_back({i, len, Classify(cp), cp});
    i += len;
  }
  std::vector<std::string> words;
  size_t b = 0;
  for (size_t i = 0; i <= ch.size(); ++i) {
    if (i < ch.size() && !(split_digits && ch[i].cls == Cls::kNumber)) continue;
    SplitRegex(text, ch, b, i, &words);
    if (i < ch.size()) words.push_back(text.substr(ch[i].begin, ch[i].len));
    b = i + 1;
  }
  for (std::string& w : words) w = ByteLevelEncode(w);
  return words;
}

}  // namespace vqkv::model
