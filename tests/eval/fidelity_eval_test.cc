// Fidelity on the real tinystories model (../shared): raw changes nothing; rvq fitted on the
// first half of the text beats scalar-2 on every quality column on the second half while
// spending fewer bits.
#include "client/cpp/eval/fidelity_eval.h"

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/codebook.h"
#include "kernels/rvq_budget.h"
#include "kernels/rvq_fit.h"
#include "model/text_data.h"

namespace vqkv::eval {
namespace {

const std::string kModel = std::string(VQKV_SHARED_DIR) + "/models/tinystories-656k";
const std::string kText = std::string(VQKV_SHARED_DIR) + "/data/tinystories/valid-dev.txt";

class FidelityEvalTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = model::LlamaModel::Load(kModel);
    ASSERT_TRUE(m.ok()) << m.status() << " (tests need ../shared beside the checkout)";
    model_ = new model::LlamaModel(std::move(*m));
    auto tok = model::Tokenizer::Load(kModel + "/tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    auto stories = model::LoadStories(kText);
    ASSERT_TRUE(stories.ok()) << stories.status();
    const size_t half = stories->size() / 2;
    std::vector<std::string> first(stories->begin(), stories->begin() + half);
    std::vector<std::string> second(stories->begin() + half, stories->end());
    calib_ = new Corpus(BuildCorpus(*tok, first, 512, 48, 24));
    eval_ = new Corpus(BuildCorpus(*tok, second, 512, 48, 12));
    ASSERT_GE(calib_->seqs.size(), 20u);
    ASSERT_GE(eval_->seqs.size(), 10u);
    auto r = ComputeReference(*model_, *eval_);
    ASSERT_TRUE(r.ok());
    ref_ = new Reference(std::move(*r));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete calib_;
    delete eval_;
    delete ref_;
  }
  static EvalRow Run(const std::string& spec_text,
                     std::shared_ptr<const kernels::Codebook> cb = nullptr) {
    auto spec = kernels::ParseCodecSpec(spec_text);
    EXPECT_TRUE(spec.ok());
    spec->codebook = cb;
    auto codec = kernels::CreateCodec(*spec);
    EXPECT_TRUE(codec.ok()) << codec.status();
    auto row = Evaluate(*model_, *eval_, *ref_, **codec, cb ? cb->config().CodebookBytes() : 0, {});
    EXPECT_TRUE(row.ok()) << row.status();
    return *row;
  }
  static model::LlamaModel* model_;
  static Corpus *calib_, *eval_;
  static Reference* ref_;
};
model::LlamaModel* FidelityEvalTest::model_ = nullptr;
Corpus* FidelityEvalTest::calib_ = nullptr;
Corpus* FidelityEvalTest::eval_ = nullptr;
Reference* FidelityEvalTest::ref_ = nullptr;

TEST_F(FidelityEvalTest, RawChangesNothing) {
  const EvalRow r = Run("raw");
  EXPECT_EQ(r.k.rel_error, 0);
  EXPECT_EQ(r.v.rel_error, 0);
  EXPECT_EQ(r.attention.output_rel_error, 0);
  EXPECT_DOUBLE_EQ(r.ppl, r.ppl_ref);
  EXPECT_EQ(r.top1_pct, 100);
  EXPECT_NEAR(r.kl, 0, 1e-12);
  EXPECT_GT(r.bits_all_in, 16.0);
}

TEST_F(FidelityEvalTest, RvqBeatsScalarTwoBitAtFewerBits) {
  auto samples = CaptureSamples(*model_, *calib_);
  ASSERT_TRUE(samples.ok());
  kernels::FitOptions fo;
  fo.iterations = 6;
  fo.max_vectors = 16384;
  kernels::BudgetOptions bo;
  bo.bits_per_element = 2.5;
  bo.k_size = 256;
  bo.v_size = 256;
  bo.max_share = 1.25;
  auto full = kernels::FitCodebook(kernels::MaxStagesConfig(2, 4, 16, bo, false), *samples, fo);
  ASSERT_TRUE(full.ok()) << full.status();
  auto choice = kernels::ChooseSplit(*full, *samples, bo);
  ASSERT_TRUE(choice.ok()) << choice.status();
  EXPECT_LE(choice->config.BitsPerElement(), 2.5 + 1e-9);
  auto cb = kernels::TruncateCodebook(*full, choice->config);
  ASSERT_TRUE(cb.ok());
  const EvalRow rvq = Run("rvq", std::make_shared<const kernels::Codebook>(std::move(*cb)));
  const EvalRow s2 = Run("scalar-2");
  EXPECT_LT(rvq.bits_all_in, s2.bits_all_in);
  EXPECT_LT(rvq.k.rel_error, s2.k.rel_error);
  EXPECT_LT(rvq.v.rel_error, s2.v.rel_error);
  EXPECT_LT(rvq.attention.output_rel_error, s2.attention.output_rel_error);
  EXPECT_LT(std::abs(rvq.ppl_delta_pct), std::abs(s2.ppl_delta_pct));
  EXPECT_GT(rvq.top1_pct, s2.top1_pct);
  EXPECT_LT(rvq.kl, s2.kl);
}

TEST(GenerateStoriesTest, ModelWrittenStoriesFromSeeds) {
  auto m = model::LlamaModel::Load(kModel);
  ASSERT_TRUE(m.ok()) << m.status();
  auto tok = model::Tokenizer::Load(kModel + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto stories = model::LoadStories(kText);
  ASSERT_TRUE(stories.ok()) << stories.status();
  const std::vector<std::string> seeds(stories->begin(), stories->begin() + 3);
  GenerateOptions go;
  go.tokens = 400;
  go.prompt_tokens = 6;
  go.max_story_tokens = 80;
  go.sample.batch = 4;
  int64_t last_done = 0;
  go.progress = [&](int64_t d, int64_t, const std::string&) { last_done = d; };
  const auto a = GenerateStories(*m, *tok, seeds, go);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(last_done, 400);
  int64_t tokens = 0;
  for (size_t i = 0; i < a->size(); ++i) {
    const std::vector<int> ids = tok->EncodeForScoring((*a)[i]);
    EXPECT_LE(ids.size(), 80u + 4) << (*a)[i];  // re-tokenizing may merge differently
    tokens += int64_t(ids.size());
    // Each story continues its seed's first words (seeds taken in turn).
    const std::string& seed = seeds[i % seeds.size()];
    EXPECT_EQ((*a)[i].substr(0, 8), seed.substr(0, 8)) << (*a)[i];
    EXPECT_EQ((*a)[i].find(model::kStorySeparator), std::string::npos);
  }
  EXPECT_GE(tokens, 360);
  EXPECT_LE(tokens, 400 + 4 * 84);
  // Written as a story file and read back, the stories are unchanged (trimmed, no separator).
  std::string file;
  for (const std::string& st : *a)
    absl::StrAppend(&file, st, "\n", std::string(model::kStorySeparator), "\n");
  EXPECT_EQ(model::SplitStories(file), *a);
  const auto b = GenerateStories(*m, *tok, seeds, go);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*a, *b);            // seeded
  EXPECT_NE((*a)[0], (*a)[3]);  // same seed story, other draws
  EXPECT_EQ(GenerateStories(*m, *tok, {}, go).status().code(), absl::StatusCode::kInvalidArgument);
  go.max_story_tokens = 6;
  EXPECT_EQ(GenerateStories(*m, *tok, seeds, go).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ConcatSamplesTest, JoinsSequencesAndChecksGeometry) {
  const kernels::KvSamples a = SyntheticSamples(2, 2, 4, 8, 3, 16, 1);
  kernels::KvSamples b = SyntheticSamples(2, 2, 4, 8, 2, 10, 2);
  const auto c = ConcatSamples(a, b);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->tokens(0), a.tokens(0) + b.tokens(0));
  ASSERT_EQ(c->seq_lens.size(), a.seq_lens.size() + b.seq_lens.size());
  EXPECT_EQ(c->seq_lens.back(), b.seq_lens.back());
  EXPECT_EQ(c->k[1].back(), b.k[1].back());
  EXPECT_EQ(c->v[0].front(), a.v[0].front());
  EXPECT_EQ(c->q[1].size(), a.q[1].size() + b.q[1].size());
  b.seq_starts.assign(b.seq_lens.size(), 100);
  const auto d = ConcatSamples(a, b);
  ASSERT_TRUE(d.ok());
  ASSERT_EQ(d->seq_starts.size(), d->seq_lens.size());
  EXPECT_EQ(d->seq_starts.front(), 0);
  EXPECT_EQ(d->seq_starts.back(), 100);
  b.q.clear();
  const auto e = ConcatSamples(a, b);
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->q.empty());  // queries only when both have them
  const kernels::KvSamples other = SyntheticSamples(2, 2, 4, 16, 1, 8, 3);
  EXPECT_EQ(ConcatSamples(a, other).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace vqkv::eval
