#include "model/scoring.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace vqkv::model {

absl::StatusOr<TokenScores> ScoreTokens(const std::vector<float>& logits,
                                        const std::vector<int>& tokens, int first_position) {
  const size_t n = tokens.size();
  if (n == 0 || logits.empty() || logits.size() % n != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "logits of size ", logits.size(), " do not hold one row per token (", n, " tokens)"));
  }
  if (first_position < 0) return absl::InvalidArgumentError("first_position must be >= 0");
  const size_t vocab = logits.size() / n;
  TokenScores s;
  s.argmax.resize(n);
  s.logprob.resize(n - 1);
  double nll = 0;
  for (size_t t = 0; t < n; ++t) {
    const float* row = logits.data() + t * vocab;
    const float* best = std::max_element(row, row + vocab);
    s.argmax[t] = static_cast<int>(best - row);
    if (t + 1 == n) break;
    const int next = tokens[t + 1];
    if (next < 0 || static_cast<size_t>(next) >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ", next, " at position ", t + 1, " outside [0, ", vocab, ")"));
    }
    // log-softmax in double: perplexity differences between codecs can be small.
    double sum = 0;
    for (size_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(row[i]) - *best);
    const double lp = static_cast<double>(row[next]) - *best - std::log(sum);
    s.logprob[t] = static_cast<float>(lp);
    if (static_cast<int64_t>(t) >= first_position) {
      nll -= lp;
      ++s.scored;
    }
  }
  if (s.scored > 0) s.mean_nll = nll / s.scored;
  s.perplexity = std::exp(s.mean_nll);
  return s;
}

absl::StatusOr<double> Top1Agreement(const std::vector<int>& a, const std::vector<int>& b,
                                     int first_position) {
  if (a.size() != b.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("argmax sequences differ in length: ", a.size(), " vs ", b.size()));
  }
  if (first_position < 0) return absl::InvalidArgumentError("first_position must be >= 0");
  int64_t same = 0, count = 0;
  for (size_t t = first_position; t < a.size(); ++t) {
    same += a[t] == b[t];
    ++count;
  }
  return count == 0 ? 1.0 : static_cast<double>(same) / count;
}

}  // namespace vqkv::model
