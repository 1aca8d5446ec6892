// Teacher-forced scoring of logits: per-position log-probabilities of the next token,
// perplexity and argmax ids, to compare a model run on a compressed K/V cache with the exact
// run (perplexity change, top-1 agreement).
// Thread-safety: pure functions.
#pragma once

#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::model {

struct TokenScores {
  // logprob[t] = log p(tokens[t + 1] | tokens[0..t]) for t in [0, tokens - 1).
  std::vector<float> logprob;
  // argmax[t] = most likely next token after tokens[0..t], for t in [0, tokens).
  std::vector<int> argmax;
  int scored = 0;         // predictions counted in mean_nll: positions [first_position, n - 1)
  double mean_nll = 0;    // mean of -logprob over the scored positions (0 when none)
  double perplexity = 1;  // exp(mean_nll)
};

// Scores `logits` [n, vocab] (as returned by LlamaModel::Forward) against `tokens` [n].
// Only predictions made at positions >= `first_position` enter mean_nll/perplexity (e.g. to
// skip positions that a codec leaves exact); logprob and argmax always cover every position.
// InvalidArgument when sizes disagree, a token is outside [0, vocab), or first_position < 0.
absl::StatusOr<TokenScores> ScoreTokens(const std::vector<float>& logits,
                                        const std::vector<int>& tokens, int first_position = 0);

// Fraction of positions t >= first_position where a[t] == b[t] (1 when there are none).
// InvalidArgument when the sizes differ or first_position < 0.
absl::StatusOr<double> Top1Agreement(const std::vector<int>& a, const std::vector<int>& b,
                                     int first_position = 0);

}  // namespace vqkv::model
