#include "model/text_data.h"

#include "common/safetensors.h"
#include "common/status_macros.h"

namespace vqkv::model {
namespace {

bool IsSpace(char c) {
  return c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\f' || c == '\v';
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

std::vector<std::string> SplitStories(std::string_view text) {
  std::vector<std::string> stories;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t hit = text.find(kStorySeparator, pos);
    if (hit == std::string_view::npos) hit = text.size();
    const std::string_view story = Trim(text.substr(pos, hit - pos));
    if (!story.empty()) stories.emplace_back(story);
    pos = hit + kStorySeparator.size();
  }
  return stories;
}

absl::StatusOr<std::vector<std::string>> LoadStories(const std::string& path) {
  VQKV_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return SplitStories(text);
}

}  // namespace vqkv::model
