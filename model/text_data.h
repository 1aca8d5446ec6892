// Text corpora for scoring the model: the TinyStories dump keeps stories separated by
// "<|endoftext|>" lines; these helpers split it into stories to be tokenized one by one as
// BOS + story.
// Thread-safety: pure functions.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace vqkv::model {

inline constexpr std::string_view kStorySeparator = "<|endoftext|>";

// Splits `text` on kStorySeparator, trims ASCII whitespace from each piece and drops empty
// pieces. Pieces keep their inner newlines. Note that a dump cut from a larger file (such as
// shared/data/tinystories/valid-dev.txt) starts and ends mid-story: the first and last pieces
// may be fragments.
std::vector<std::string> SplitStories(std::string_view text);

// Reads `path` and splits it with SplitStories. NotFound (naming the path) if missing.
absl::StatusOr<std::vector<std::string>> LoadStories(const std::string& path);

}  // namespace vqkv::model
