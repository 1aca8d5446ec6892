// Compares the C++ tokenizer and forward pass with tests/model/reference_llama.py, an
// independent numpy implementation run as a subprocess.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "model/llama.h"
#include "model/text_data.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/model/model_test_util.h"

namespace vqkv::model {
namespace {

using json = nlohmann::json;
using testing::RealModel;
using testing::RealTokenizer;

constexpr int kGenerate = 40;

// max |a - b| / max |b|.
double RelMaxAbs(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// Runs the Python reference on `request`; returns its JSON (or fails the test).
json RunReference(const json& request) {
  const std::string req_path = testing::FreshDir("reference") + "/request.json";
  EXPECT_TRUE(WriteStringToFile(req_path, request.dump()).ok());
  const std::string cmd = std::string("'") + VQKV_TEST_PYTHON3 + "' '" +
                          VQKV_TEST_REFERENCE_SCRIPT + "' --model '" + testing::ModelDir() +
                          "' --input '" + req_path + "'";
  FILE* pipe = popen(cmd.c_str(), "r");
  EXPECT_NE(pipe, nullptr) << cmd;
  if (pipe == nullptr) return json();
  std::string out;
  char buf[1 << 16];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  const int rc = pclose(pipe);
  EXPECT_EQ(rc, 0) << "reference failed (needs python3 with numpy): " << cmd;
  const json j = json::parse(out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "unparseable reference output: " << out.substr(0, 500);
  return j.is_discarded() ? json() : j;
}

TEST(ReferenceTest, MatchesIndependentNumpyImplementation) {
  const auto& model = RealModel();
  const auto& tok = RealTokenizer();
  ASSERT_TRUE(model.ok()) << model.status() << " (is shared/ beside the repository?)";
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto stories = LoadStories(testing::DataFile());
  ASSERT_TRUE(stories.ok()) << stories.status();
  ASSERT_GT(stories->size(), 6u);

  std::vector<std::string> texts = {
      "Once upon a time, there was a little girl named Lily.",
      "Tom said, \"Let's play!\"\nThe end.",
      "  double  spaces and trailing ",
      "caf\xC3\xA9 \xF0\x9F\x99\x82 ok",
      "x <|end_story|> y<|start_story|>z",
      "",
  };
  for (int i = 0; i < 5; ++i) texts.push_back((*stories)[i]);
  const std::string prompt = (*stories)[1];
  const json request = {{"encode", texts}, {"prompt", prompt}, {"generate", kGenerate}};
  const json ref = RunReference(request);
  ASSERT_TRUE(ref.is_object());

  // Tokenizer: identical ids for every text, and for the scoring prompt.
  ASSERT_EQ(ref["encodings"].size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(tok->Encode(texts[i], false), ref["encodings"][i].get<std::vector<int>>())
        << "text " << i << ": " << texts[i].substr(0, 80);
  }
  std::vector<int> ids = tok->EncodeForScoring(prompt);
  ids.resize(std::min<size_t>(ids.size(), model->config().max_position_embeddings));
  ASSERT_EQ(ids, ref["prompt_ids"].get<std::vector<int>>());
  ASSERT_GT(ids.size(), 200u);

  // Forward: logits at the reference's positions, and post-RoPE Q/K/V of layers 0 and 1.
  KvCache cache;
  ForwardOptions opts;
  opts.capture = &cache;
  const auto logits = model->Forward(ids, opts);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const int vocab = model->config().vocab_size;
  for (const auto& [pos, row] : ref["logits"].items()) {
    const int t = std::stoi(pos);
    const std::vector<float> mine(logits->begin() + static_cast<size_t>(t) * vocab,
                                  logits->begin() + static_cast<size_t>(t + 1) * vocab);
    const double rel = RelMaxAbs(mine, row.get<std::vector<float>>());
    std::printf("logits at position %d: rel max-abs diff %.3g\n", t, rel);
    EXPECT_LT(rel, 1e-4) << "logits at position " << t;
  }
  for (const char* l : {"0", "1"}) {
    const int layer = std::stoi(l);
    const struct {
      const char* name;
      const std::vector<float>& mine;
    } parts[] = {{"q", cache.q[layer]}, {"k", cache.k[layer]}, {"v", cache.v[layer]}};
    for (const auto& p : parts) {
      const std::vector<float> theirs = ref[p.name][l].get<std::vector<float>>();
      ASSERT_EQ(p.mine.size(), theirs.size()) << p.name << " layer " << layer;
      const double rel = RelMaxAbs(p.mine, theirs);
      std::printf("%s layer %d: rel max-abs diff %.3g\n", p.name, layer, rel);
      EXPECT_LT(rel, 1e-4) << p.name << " layer " << layer;
    }
  }

  // Greedy generation from BOS: identical ids and text.
  const auto gen = model->Generate({tok->bos_id()}, kGenerate);
  ASSERT_TRUE(gen.ok()) << gen.status();
  EXPECT_EQ(*gen, ref["generated"].get<std::vector<int>>());
  const std::string text = tok->Decode(*gen);
  EXPECT_EQ(text, ref["generated_text"].get<std::string>());
  EXPECT_EQ(text.rfind("Once upon a time", 0), 0u) << text;
}

}  // namespace
}  // namespace vqkv::model
