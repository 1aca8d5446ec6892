// `vqkv fidelity`: fit codebooks on the first half of a text, evaluate every codec on the
// second half with the real model, print the table (docs/fidelity.md records its output).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/cpp/cli/commands.h"
#include "client/cpp/cli/flags.h"
#include "client/cpp/cli/model_setup.h"
#include "client/cpp/eval/fidelity_eval.h"
#include "common/progress.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "kernels/codebook.h"
#include "kernels/rvq_budget.h"
#include "kernels/rvq_fit.h"
#include "model/text_data.h"

namespace vqkv::cli {
namespace {

struct Candidate {
  std::string name, split;
  std::shared_ptr<const kernels::Codebook> codebook;  // rvq only
  std::string spec;                                   // codec spec text
  int64_t context = 0;                                // evaluated at this context only (0: all)
};

// A `fit --bits` budget, for every evaluation context or (CTX:BITS) for one.
struct Budget {
  double bits = 0;
  int64_t context = 0;
};

absl::StatusOr<std::vector<Budget>> ParseBudgets(const std::string& s) {
  std::vector<Budget> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    Budget b;
    absl::string_view bits = p;
    if (const size_t colon = p.find(':'); colon != absl::string_view::npos) {
      if (!absl::SimpleAtoi(p.substr(0, colon), &b.context) || b.context < 64) {
        return absl::InvalidArgumentError(
            absl::StrCat("--budgets: '", std::string(p), "': CONTEXT:BITS needs a context >= 64"));
      }
      bits = p.substr(colon + 1);
    }
    if (!absl::SimpleAtod(bits, &b.bits) || b.bits <= 0 || b.bits > 16) {
      return absl::InvalidArgumentError(
          absl::StrCat("--budgets: '", std::string(p), "' is not a number in (0, 16]"));
    }
    out.push_back(b);
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> ParseContexts(const std::string& s, int64_t fallback) {
  std::vector<int64_t> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(p, &v) || v < 64) {
      return absl::InvalidArgumentError(
          absl::StrCat("--contexts: '", std::string(p), "' is not a token count >= 64"));
    }
    out.push_back(v);
  }
  if (out.empty()) out.push_back(fallback);
  return out;
}

std::string SplitText(const kernels::RvqConfig& c) { return c.ToString(); }

// FNV-1a: a stable hash of the fit settings for --codebook-cache file names.
uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Per-layer weights for --split-objective kl (rvq_budget.h BudgetOptions::layer_weights):
// the split the plain objective picks at the largest budget, each layer compressed alone on the
// last `held` calibration sequences (those the codebook was not fitted on; with `pack` joined
// into one context), KL of next-token
// distributions over that layer's squared calibration attention-output error. `cache_path`
// (may be empty) keeps the measured KLs for a later run with the same settings.
absl::StatusOr<std::vector<double>> KlLayerWeights(
    const ModelSetup& setup, const eval::Corpus& calib_corpus, size_t held,
    const kernels::Codebook& full, const kernels::RvqConfig& full_cfg,
    const kernels::SplitErrors& errors, const kernels::BudgetOptions& bo,
    const eval::EvalOptions& eo, bool pack, const std::string& cache_path, const std::string& tag) {
  VQKV_ASSIGN_OR_RETURN(kernels::BudgetChoice base,
                        kernels::ChooseSplitFromErrors(full_cfg, errors, bo));
  const int L = full_cfg.layers;
  eval::Corpus held_out;
  held = std::min(held, calib_corpus.seqs.size());
  held_out.seqs.assign(calib_corpus.seqs.end() - int64_t(held), calib_corpus.seqs.end());
  if (pack) {
    // Long contexts, as long-context requests see the layers: attention spread over more
    // compressed tokens and more story starts.
    // Contexts stay within the model's context length.
    const size_t max_len = size_t(std::max(1, setup.model.config().max_position_embeddings));
    std::vector<std::vector<int>> packed(1);
    for (const auto& sq : held_out.seqs) {
      if (!packed.back().empty() && packed.back().size() + sq.size() > max_len)
        packed.emplace_back();
      packed.back().insert(packed.back().end(), sq.begin(), sq.end());
    }
    held_out.seqs = std::move(packed);
  }
  const std::string key =
      absl::StrCat(base.config.ToString(), "|", eo.sink_tokens, "|", eo.recent_tokens, "|",
                   eo.block_tokens, "|", held_out.tokens(), pack ? "|packed" : "");
  eval::LayerSensitivity sens;
  bool loaded = false;
  if (!cache_path.empty() && std::filesystem::exists(cache_path)) {
    auto text = ReadFileToString(cache_path);
    if (text.ok()) {
      std::vector<std::string> lines = absl::StrSplit(*text, '\n', absl::SkipEmpty());
      if (int(lines.size()) == L + 2 && lines[0] == key) {
        loaded = true;
        for (int l = 0; l <= L && loaded; ++l) {
          double v = 0;
          loaded = absl::SimpleAtod(lines[l + 1], &v);
          if (l < L)
            sens.kl.push_back(v);
          else
            sens.all_kl = v;
        }
      }
    }
    if (loaded) std::fprintf(stderr, "layer sensitivity: loaded %s\n", cache_path.c_str());
  }
  if (!loaded) {
    sens = {};
    VQKV_ASSIGN_OR_RETURN(kernels::Codebook cb, kernels::TruncateCodebook(full, base.config));
    kernels::CodecSpec spec;
    VQKV_ASSIGN_OR_RETURN(spec, kernels::ParseCodecSpec("rvq"));
    spec.sink_tokens = eo.sink_tokens;
    spec.codebook = std::make_shared<const kernels::Codebook>(std::move(cb));
    VQKV_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Codec> codec, kernels::CreateCodec(spec));
    VQKV_ASSIGN_OR_RETURN(eval::Reference ref, eval::ComputeReference(setup.model, held_out));
    ProgressBar bar(absl::StrCat("layer sensitivity", tag), L + 1);
    VQKV_ASSIGN_OR_RETURN(sens,
                          eval::MeasureLayerSensitivity(
                              setup.model, held_out, ref, *codec, eo,
                              [&](int64_t d, int64_t, const std::string& w) { bar.Update(d, w); }));
    bar.Finish();
    if (!cache_path.empty()) {
      std::string text = key + "\n";
      for (double v : sens.kl) absl::StrAppend(&text, absl::StrFormat("%.17g\n", v));
      absl::StrAppend(&text, absl::StrFormat("%.17g\n", sens.all_kl));
      std::filesystem::create_directories(std::filesystem::path(cache_path).parent_path());
      VQKV_RETURN_IF_ERROR(WriteStringToFile(cache_path, text));
    }
  }
  std::vector<double> w(L);
  double sum = 0;
  std::fprintf(
      stderr,
      "layer sensitivity%s on %zu held-out sequences%s (%lld tokens), split of fit "
      "--bits %g:\n",
      tag.c_str(), held,
      pack ? absl::StrCat(" joined into ", held_out.seqs.size(), " context(s)").c_str() : "",
      (long long)held_out.tokens(), bo.bits_per_element);
  for (int l = 0; l < L; ++l) {
    const double e = errors.err[l][base.config.k[l].stages - 1][base.config.v[l].stages - 1];
    w[l] = e > 0 ? sens.kl[l] / (e * e) : 0;
    sum += sens.kl[l];
    std::fprintf(stderr, "  layer %2d: K %2d V %2d attn-out err %.4f  KL alone %.6f  weight %.4g\n",
                 l, base.config.k[l].stages, base.config.v[l].stages, e, sens.kl[l], w[l]);
  }
  std::fprintf(stderr, "  sum of per-layer KL %.6f, KL with every layer compressed %.6f\n", sum,
               sens.all_kl);
  return w;
}

// Every input that shapes the model-written stories (cache keys).
std::string GenerateKey(const std::string& model_dir, const std::string& text_path,
                        double calib_fraction, const eval::GenerateOptions& go) {
  return absl::StrCat(model_dir, "|", text_path, "|", calib_fraction, "|", go.tokens, "|",
                      go.prompt_tokens, "|", go.sample.temperature, "|", go.sample.top_p, "|",
                      go.sample.seed, "|", go.max_story_tokens);
}

// --calib-generate: K/V/Q of model-written stories seeded by the calibration stories, packed
// like the calibration text. The stories are cached as a text file in `cache_dir` (when given),
// keyed by every input that shapes them.
absl::StatusOr<kernels::KvSamples> GeneratedSamples(
    const ModelSetup& setup, const std::vector<std::string>& seeds, eval::GenerateOptions go,
    int max_tokens, int min_tokens, bool pack, const std::string& text_path, double calib_fraction,
    const std::string& cache_dir) {
  const std::string key = GenerateKey(setup.model_dir, text_path, calib_fraction, go);
  const std::string path = cache_dir.empty()
                               ? std::string()
                               : absl::StrCat(cache_dir, "/gen-", absl::Hex(Fnv1a(key)), ".txt");
  std::vector<std::string> stories;
  if (!path.empty() && std::filesystem::exists(path)) {
    VQKV_ASSIGN_OR_RETURN(stories, model::LoadStories(path));
    std::fprintf(stderr, "calib-generate: loaded %zu model-written stories from %s\n",
                 stories.size(), path.c_str());
  } else {
    ProgressBar gbar("calib-generate", go.tokens);
    go.progress = [&](int64_t d, int64_t, const std::string& w) { gbar.Update(d, w); };
    VQKV_ASSIGN_OR_RETURN(stories, eval::GenerateStories(setup.model, setup.tokenizer, seeds, go));
    gbar.Finish(absl::StrCat(stories.size(), " model-written stories"));
    if (!path.empty()) {
      std::filesystem::create_directories(cache_dir);
      VQKV_RETURN_IF_ERROR(WriteStringToFile(path, JoinStories(stories)));
    }
  }
  if (!stories.empty()) {
    std::fprintf(stderr, "calib-generate: first story: %.300s%s\n", stories[0].c_str(),
                 stories[0].size() > 300 ? "..." : "");
  }
  const eval::Corpus corpus =
      eval::BuildCorpus(setup.tokenizer, stories, max_tokens, min_tokens, 0, pack);
  ProgressBar cbar("capture generated", 1);
  VQKV_ASSIGN_OR_RETURN(kernels::KvSamples s, eval::CaptureSamples(setup.model, corpus));
  cbar.Finish(absl::StrCat("captured K/V/Q of ", s.tokens(0), " model-written tokens in ",
                           corpus.seqs.size(), " sequences"));
  return s;
}

absl::Status Fidelity(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(int64_t max_tokens, f.Int("max-tokens"));
  VQKV_ASSIGN_OR_RETURN(int64_t calib_seqs, f.Int("calib-seqs"));
  VQKV_ASSIGN_OR_RETURN(int64_t calib_generate, f.Int("calib-generate"));
  VQKV_ASSIGN_OR_RETURN(const eval::GenerateOptions generate_opts,
                        GenerateOptionsFromFlags(f, calib_generate));
  VQKV_ASSIGN_OR_RETURN(int64_t eval_seqs, f.Int("eval-seqs"));
  VQKV_ASSIGN_OR_RETURN(int64_t iters, f.Int("iters"));
  VQKV_ASSIGN_OR_RETURN(int64_t max_vectors, f.Int("max-vectors"));
  VQKV_ASSIGN_OR_RETURN(int64_t sinks, f.Int("sinks"));
  VQKV_ASSIGN_OR_RETURN(int64_t recent, f.Int("recent"));
  VQKV_ASSIGN_OR_RETURN(int64_t beam, f.Int("beam"));
  std::vector<int> outlier_counts;
  for (absl::string_view o : absl::StrSplit(f.Str("outliers"), ',', absl::SkipEmpty())) {
    int n = 0;
    if (!absl::SimpleAtoi(o, &n) || n < 0 || n > 4096) {
      return absl::InvalidArgumentError("--outliers must be counts in [0, 4096], e.g. 1,2");
    }
    if (n > 0) outlier_counts.push_back(n);
  }
  const std::vector<std::string> objectives =
      absl::StrSplit(f.Str("split-objective"), ',', absl::SkipEmpty());
  if (objectives.empty()) return absl::InvalidArgumentError("--split-objective is empty");
  for (const std::string& o : objectives) {
    if (o != "attn" && o != "kl") {
      return absl::InvalidArgumentError(
          absl::StrCat("--split-objective: '", o, "': use attn, kl or attn,kl"));
    }
  }
  const bool want_kl = std::find(objectives.begin(), objectives.end(), "kl") != objectives.end();
  VQKV_ASSIGN_OR_RETURN(int64_t eval_tokens, f.Int("eval-tokens"));
  double calib_fraction = 0;
  if (!absl::SimpleAtod(f.Str("calib-fraction"), &calib_fraction) || calib_fraction <= 0 ||
      calib_fraction >= 1) {
    return absl::InvalidArgumentError("--calib-fraction must be a number in (0, 1)");
  }
  VQKV_ASSIGN_OR_RETURN(int64_t attn_queries, f.Int("attn-queries"));
  VQKV_ASSIGN_OR_RETURN(int64_t split_queries, f.Int("split-queries"));
  int64_t max_k_stages = 0, max_v_stages = 0;
  if (!f.Str("max-stages").empty()) {
    const std::vector<std::string> ms = absl::StrSplit(f.Str("max-stages"), ',');
    if (ms.size() != 2 || !absl::SimpleAtoi(ms[0], &max_k_stages) ||
        !absl::SimpleAtoi(ms[1], &max_v_stages) || max_k_stages < 1 || max_v_stages < 1) {
      return absl::InvalidArgumentError("--max-stages must be K,V stage counts >= 1, e.g. 32,16");
    }
  }
  VQKV_ASSIGN_OR_RETURN(std::vector<Budget> budgets, ParseBudgets(f.Str("budgets")));
  VQKV_ASSIGN_OR_RETURN(std::vector<int64_t> contexts,
                        ParseContexts(f.Str("contexts"), max_tokens));
  for (const Budget& b : budgets) {
    if (b.context > 0 && std::find(contexts.begin(), contexts.end(), b.context) == contexts.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--budgets: ", b.context, ":", b.bits, " names a context that --contexts does not list"));
    }
  }
  if (eval_tokens < 0 || attn_queries < 0) {
    return absl::InvalidArgumentError("--eval-tokens and --attn-queries must be >= 0");
  }
  const bool pack = !f.Bool("per-story");
  // The paper's split for head_dim 128 (keys 56x1024, values 16x512), scaled to the model's
  // head_dim once it is known, unless given explicitly.
  const bool paper_auto = f.Str("paper") == "auto";
  kernels::StageConfig pk{56, 1024}, pv{16, 512};
  if (!paper_auto) {
    const std::vector<std::string> paper = absl::StrSplit(f.Str("paper"), ',');
    if (paper.size() != 2) {
      return absl::InvalidArgumentError(
          "--paper must be auto or KxSIZE,VxSIZE (e.g. 28x1024,8x512)");
    }
    VQKV_ASSIGN_OR_RETURN(pk, kernels::ParseStageConfig(paper[0]));
    VQKV_ASSIGN_OR_RETURN(pv, kernels::ParseStageConfig(paper[1]));
  }

  eval::EvalOptions eo;
  eo.sink_tokens = int(sinks);
  eo.recent_tokens = int(recent);
  eo.max_attention_queries = attn_queries;
  kernels::FitOptions fo;
  fo.iterations = int(iters);
  fo.max_vectors = max_vectors;
  const std::vector<std::string> code_spaces =
      absl::StrSplit(f.Str("code-spaces"), ',', absl::SkipEmpty());
  for (const std::string& cs : code_spaces) {
    for (absl::string_view part : absl::StrSplit(cs, '+')) {
      if (part != "none" && part != "rope" && part != "kscale" && part != "vscale") {
        return absl::InvalidArgumentError(absl::StrCat(
            "--code-spaces: '", cs, "': use none or rope, kscale, vscale joined by '+'"));
      }
    }
  }
  if (code_spaces.empty()) return absl::InvalidArgumentError("--code-spaces is empty");
  double scale_exponent = 1;
  if (!absl::SimpleAtod(f.Str("scale-exponent"), &scale_exponent) || !(scale_exponent > 0) ||
      scale_exponent > 4) {
    return absl::InvalidArgumentError("--scale-exponent must be a number in (0, 4]");
  }

  auto setup = LoadModelSetup(f.Str("model"), f.Str("text"));
  const bool synthetic = !setup.ok();
  if (synthetic) {
    std::fprintf(
        stderr,
        "WARNING: %s\nWARNING: falling back to SYNTHETIC K/V (random, LLaMA-like structure); "
        "every figure below is labelled SYNTHETIC and says nothing about a real model.\n",
        std::string(setup.status().message()).c_str());
  }
  kernels::KvSamples calib;
  kernels::KvSamples generated;  // --calib-generate: model-written calibration text (fit only)
  eval::Corpus calib_corpus;
  std::vector<eval::Corpus> eval_corpora;  // one per context
  kernels::KvSamples synth_eval;
  if (!synthetic) {
    // Calibration stories first, evaluation stories after: no story is in both.
    const size_t split =
        std::clamp<size_t>(size_t(std::lround(calib_fraction * double(setup->stories.size()))), 1,
                           setup->stories.size() - 1);
    const std::vector<std::string> first_part(setup->stories.begin(),
                                              setup->stories.begin() + split);
    const std::vector<std::string> second_part(setup->stories.begin() + split,
                                               setup->stories.end());
    const auto* first = &first_part;
    const auto* second = &second_part;
    calib_corpus = eval::BuildCorpus(setup->tokenizer, *first, int(max_tokens),
                                     int(sinks + recent + 8), int(calib_seqs), pack);
    std::fprintf(stderr, "model %s: %d layers, %d KV heads, head_dim %d, context %d\n",
                 setup->model_dir.c_str(), setup->model.config().num_hidden_layers,
                 setup->model.config().num_key_value_heads, setup->model.config().head_dim,
                 setup->model.config().max_position_embeddings);
    std::fprintf(stderr, "calibration: %zu sequences, %lld tokens (first %zu of %zu stories)\n",
                 calib_corpus.seqs.size(), (long long)calib_corpus.tokens(), split,
                 setup->stories.size());
    for (int64_t ctx : contexts) {
      if (ctx > setup->model.config().max_position_embeddings) {
        return absl::InvalidArgumentError(
            absl::StrCat("--contexts: ", ctx, " exceeds the model's context ",
                         setup->model.config().max_position_embeddings));
      }
      // Packed contexts must be nearly full to measure that length; per-story ones need only
      // more tokens than the exact sinks and recent window.
      const int min_tokens =
          pack ? int(std::max<int64_t>(sinks + recent + 8, ctx * 3 / 4)) : int(sinks + recent + 8);
      const int64_t seqs = eval_tokens > 0 ? std::max<int64_t>(1, eval_tokens / ctx) : eval_seqs;
      eval_corpora.push_back(
          eval::BuildCorpus(setup->tokenizer, *second, int(ctx), min_tokens, int(seqs), pack));
      if (eval_corpora.back().seqs.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the evaluation stories have no ", pack ? "packed context" : "story", " of ",
            min_tokens, "+ tokens for context ", ctx, "; give --text a longer file"));
      }
      std::fprintf(
          stderr, "evaluation at context %lld: %zu sequences, %lld tokens (the other stories)\n",
          (long long)ctx, eval_corpora.back().seqs.size(), (long long)eval_corpora.back().tokens());
    }
    ProgressBar cbar("capture", 1);
    VQKV_ASSIGN_OR_RETURN(calib, eval::CaptureSamples(setup->model, calib_corpus));
    cbar.Finish(absl::StrCat("captured K/V/Q of ", calib.tokens(0), " calibration tokens"));
    if (calib_generate > 0) {
      VQKV_ASSIGN_OR_RETURN(
          generated, GeneratedSamples(*setup, first_part, generate_opts, int(max_tokens),
                                      int(sinks + recent + 8), pack, f.Str("text"), calib_fraction,
                                      f.Str("codebook-cache")));
    }
  } else {
    if (calib_generate > 0) {
      return absl::InvalidArgumentError("--calib-generate needs a model");
    }
    calib = eval::SyntheticSamples(2, 4, 8, 16, 24, 256, 1);
    synth_eval = eval::SyntheticSamples(2, 4, 8, 16, 16, 256, 2);
  }

  if (paper_auto) {
    pk.stages = std::max(1, 56 * calib.head_dim / 128);
    pv.stages = std::max(1, 16 * calib.head_dim / 128);
  }
  // One codebook with the most stages any candidate uses; every candidate is a prefix of it.
  double max_budget = 0;
  for (const Budget& b : budgets) max_budget = std::max(max_budget, b.bits);
  kernels::BudgetOptions bo;
  bo.k_size = pk.size;
  bo.v_size = pv.size;
  bo.bits_per_element = max_budget > 0 ? max_budget : 1;
  bo.sink_tokens = int(sinks);
  bo.recent_tokens = int(recent);
  bo.max_queries = split_queries;
  kernels::RvqConfig full_cfg = kernels::MaxStagesConfig(calib.layers, calib.kv_heads,
                                                         calib.head_dim, bo, f.Bool("per-head"));
  for (int l = 0; l < full_cfg.layers; ++l) {
    if (max_k_stages > 0) full_cfg.k[l].stages = std::min<int>(full_cfg.k[l].stages, max_k_stages);
    if (max_v_stages > 0) full_cfg.v[l].stages = std::min<int>(full_cfg.v[l].stages, max_v_stages);
    full_cfg.k[l].stages = std::max(full_cfg.k[l].stages, pk.stages);
    full_cfg.v[l].stages = std::max(full_cfg.v[l].stages, pv.stages);
  }
  int64_t steps = 0;
  for (int l = 0; l < full_cfg.layers; ++l) {
    steps +=
        (full_cfg.k[l].stages + full_cfg.v[l].stages) * (full_cfg.per_head ? full_cfg.kv_heads : 1);
  }

  // Codebooks are fitted on `fit_set`; the split chooser measures on `choose_set`, sequences
  // the codebooks never saw (rvq_budget.h HoldOutSequences), unless --split-holdout is 0.
  double holdout = 0;
  if (!absl::SimpleAtod(f.Str("split-holdout"), &holdout) || holdout < 0 || holdout >= 1) {
    return absl::InvalidArgumentError("--split-holdout must be a number in [0, 1)");
  }
  const bool refit = f.Bool("refit");
  kernels::KvSamples fit_set, choose_set;
  if (holdout > 0 && !budgets.empty()) {
    VQKV_ASSIGN_OR_RETURN(auto parts, kernels::HoldOutSequences(calib, holdout));
    fit_set = std::move(parts.first);
    choose_set = std::move(parts.second);
    std::fprintf(stderr,
                 "split chooser: codebooks fitted on %zu sequences (%lld tokens), splits chosen on "
                 "the other %zu (%lld tokens)\n",
                 fit_set.seq_lens.size(), (long long)fit_set.tokens(0), choose_set.seq_lens.size(),
                 (long long)choose_set.tokens(0));
  } else {
    fit_set = calib;
    choose_set = calib;
  }
  // Model-written text joins the fitting samples (and the refit), never the held-out ones.
  kernels::KvSamples refit_set = calib;
  if (generated.tokens(0) > 0) {
    VQKV_ASSIGN_OR_RETURN(fit_set, eval::ConcatSamples(fit_set, generated));
    VQKV_ASSIGN_OR_RETURN(refit_set, eval::ConcatSamples(calib, generated));
    std::fprintf(stderr, "fitting on %lld tokens: %lld of calibration text + %lld model-written\n",
                 (long long)fit_set.tokens(0), (long long)(fit_set.tokens(0) - generated.tokens(0)),
                 (long long)generated.tokens(0));
  }

  std::vector<Candidate> cands = {{"raw", "", nullptr, "raw"},
                                  {"scalar-2", "", nullptr, "scalar-2"},
                                  {"scalar-4", "", nullptr, "scalar-4"}};
  const bool baselines = f.Bool("baselines");
  if (!baselines) cands.resize(1);
  // Every code space gets its own fit, paper split and `fit --bits` rows.
  for (const std::string& space : code_spaces) {
    kernels::FitOptions sfo = fo;
    if (space != "none") {
      if (synthetic) {
        return absl::InvalidArgumentError("--code-spaces other than none need a model");
      }
      const kernels::CodeSpaceOptions cso = CodeSpaceForModel(
          setup->model, absl::StrContains(space, "rope"), absl::StrContains(space, "kscale"),
          absl::StrContains(space, "vscale"), scale_exponent);
      VQKV_ASSIGN_OR_RETURN(sfo.code_space, kernels::ComputeCodeSpace(fit_set, cso));
    }
    const std::string tag = space == "none" ? "" : absl::StrCat(" [", space, "]");
    // --codebook-cache: a fit is a pure function of the samples and settings below, so a run
    // with the same ones loads it instead of fitting again (the slow step on a small machine).
    const std::string cache_key = absl::StrCat(
        setup.ok() ? setup->model_dir : "synthetic", "|", f.Str("text"), "|", calib_fraction, "|",
        max_tokens, "|", calib_seqs, "|", pack, "|", full_cfg.ToString(), "|", full_cfg.per_head,
        "|", iters, "|", max_vectors, "|", space, "|", scale_exponent, "|", holdout, "|",
        fit_set.tokens(0),
        generated.tokens(0) > 0 ? absl::StrCat("|gen:", GenerateKey("", "", 0, generate_opts))
                                : std::string());
    auto cached = [&](const std::string& stage) {
      return f.Str("codebook-cache").empty()
                 ? std::string()
                 : absl::StrCat(f.Str("codebook-cache"), "/", stage, "-",
                                absl::Hex(Fnv1a(absl::StrCat(cache_key, "|", stage))),
                                ".safetensors");
    };
    auto fit_or_load = [&](const std::string& stage, const kernels::KvSamples& samples,
                           ProgressBar* bar) -> absl::StatusOr<kernels::Codebook> {
      const std::string path = cached(stage);
      if (!path.empty() && std::filesystem::exists(path)) {
        auto cb = kernels::Codebook::Load(path);
        if (cb.ok()) {
          std::fprintf(stderr, "%s: loaded %s (--codebook-cache)\n", stage.c_str(), path.c_str());
          return cb;
        }
        std::fprintf(stderr, "%s: ignoring %s: %s\n", stage.c_str(), path.c_str(),
                     std::string(cb.status().message()).c_str());
      }
      sfo.progress = [&](int64_t d, int64_t, const std::string& w) { bar->Update(d, w); };
      VQKV_ASSIGN_OR_RETURN(kernels::Codebook cb, kernels::FitCodebook(full_cfg, samples, sfo));
      if (!path.empty()) {
        std::filesystem::create_directories(f.Str("codebook-cache"));
        VQKV_RETURN_IF_ERROR(WriteStringToFile(path, cb.Serialize()));
      }
      return cb;
    };
    ProgressBar bar(absl::StrCat("fit", tag), steps);
    VQKV_ASSIGN_OR_RETURN(kernels::Codebook full, fit_or_load("fit", fit_set, &bar));
    bar.Finish(absl::StrCat("fitted ", full_cfg.ToString(), " on ", fit_set.tokens(0),
                            " tokens, code space ", full.code_space().DebugString()));
    kernels::SplitErrors split_errors;
    if (!budgets.empty()) {
      ProgressBar sbar(absl::StrCat("split errors", tag),
                       int64_t{full_cfg.layers} * full_cfg.k[0].stages);
      bo.progress = [&](int64_t d, int64_t, const std::string& w) { sbar.Update(d, w); };
      VQKV_ASSIGN_OR_RETURN(split_errors, kernels::MeasureSplitErrors(full, choose_set, bo));
      sbar.Finish();
    }
    // --split-objective kl: weigh each layer by how much compressing it alone moves the model's
    // next-token distributions on the held-out calibration sequences.
    std::vector<double> layer_weights;
    if (want_kl && !budgets.empty()) {
      if (synthetic) return absl::InvalidArgumentError("--split-objective kl needs a model");
      VQKV_ASSIGN_OR_RETURN(
          layer_weights,
          KlLayerWeights(*setup, calib_corpus, choose_set.seq_lens.size(), full, full_cfg,
                         split_errors, bo, eo, f.Bool("sensitivity-pack"),
                         f.Str("codebook-cache").empty()
                             ? ""
                             : cached(f.Bool("sensitivity-pack") ? "sens-packed" : "sens") + ".txt",
                         tag));
      if (!f.Str("layer-weights-out").empty()) {
        VQKV_RETURN_IF_ERROR(WriteStringToFile(
            f.Str("layer-weights-out"),
            kernels::FormatLayerWeights(
                layer_weights,
                absl::StrCat("vqkv fidelity --split-objective kl", tag,
                             ": KL per squared "
                             "attention-output error, one line per layer (model ",
                             setup->model_dir, "); for vqkv fit --bits B --layer-weights"))));
        std::fprintf(stderr, "wrote layer weights to %s\n", f.Str("layer-weights-out").c_str());
      }
    }
    struct Chosen {
      size_t budget;
      bool kl;
      kernels::RvqConfig config;
    };
    std::vector<Chosen> chosen;
    for (size_t bi = 0; bi < budgets.size(); ++bi) {
      for (const std::string& obj : objectives) {
        kernels::BudgetOptions ob = bo;
        ob.bits_per_element = budgets[bi].bits;
        if (obj == "kl") ob.layer_weights = layer_weights;
        VQKV_ASSIGN_OR_RETURN(kernels::BudgetChoice choice,
                              kernels::ChooseSplitFromErrors(full_cfg, split_errors, ob));
        std::fprintf(stderr, "fit --bits %g%s (objective %s) chose:\n%s", budgets[bi].bits,
                     tag.c_str(), obj.c_str(), choice.table.c_str());
        chosen.push_back({bi, obj == "kl", choice.config});
      }
    }
    if (refit && fit_set.tokens(0) < refit_set.tokens(0)) {
      // The splits are chosen; fit again on every calibration sequence (the same stage-wise
      // k-means: each chosen split is a prefix of this codebook too).
      ProgressBar rbar(absl::StrCat("refit on all", tag), steps);
      VQKV_ASSIGN_OR_RETURN(full, fit_or_load("refit", refit_set, &rbar));
      rbar.Finish(absl::StrCat("refitted on ", refit_set.tokens(0), " tokens"));
    }
    const auto paper_cfg = kernels::RvqConfig::Uniform(calib.layers, calib.kv_heads, calib.head_dim,
                                                       pk, pv, f.Bool("per-head"));
    VQKV_ASSIGN_OR_RETURN(kernels::Codebook paper_cb, kernels::TruncateCodebook(full, paper_cfg));
    if (baselines) {
      cands.push_back({absl::StrCat("rvq paper split", tag),
                       absl::StrCat("paper: ", SplitText(paper_cfg)),
                       std::make_shared<const kernels::Codebook>(std::move(paper_cb)), "rvq"});
    }
    for (const Chosen& ch : chosen) {
      VQKV_ASSIGN_OR_RETURN(kernels::Codebook cb, kernels::TruncateCodebook(full, ch.config));
      const Budget& b = budgets[ch.budget];
      const Candidate base{
          absl::StrCat("rvq fit --bits ", b.bits, ch.kl ? " kl-weighted" : "", tag),
          absl::StrCat("chosen: ", SplitText(ch.config)),
          std::make_shared<const kernels::Codebook>(std::move(cb)), "rvq", b.context};
      cands.push_back(base);
      // The same codebook with beam search and/or outlier tokens (beam alone only without
      // --outliers).
      if (beam > 1 && outlier_counts.empty()) {
        Candidate c = base;
        c.name += absl::StrCat(" beam ", beam);
        c.spec = absl::StrCat("rvq:beam=", beam);
        cands.push_back(c);
      }
      for (int n : outlier_counts) {
        Candidate c = base;
        c.name += absl::StrCat(beam > 1 ? absl::StrCat(" beam ", beam) : "", " outliers ", n);
        c.spec = absl::StrCat("rvq:beam=", beam, ",outliers=", n);
        cands.push_back(c);
      }
    }
  }

  // Diagnostic: tokens read exact in every layer (after the split chooser and the sensitivity
  // pass, which never see it).
  std::string exact_label;
  if (!f.Str("exact-tokens").empty()) {
    if (synthetic) return absl::InvalidArgumentError("--exact-tokens needs a model");
    for (absl::string_view p : absl::StrSplit(f.Str("exact-tokens"), ',', absl::SkipEmpty())) {
      int id = -1;
      if (p == "bos") {
        id = setup->tokenizer.bos_id();
      } else if (!absl::SimpleAtoi(p, &id) || id < 0 || id >= setup->model.config().vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--exact-tokens: '", std::string(p), "' is neither bos nor a token id of the model"));
      }
      if (id < 0) return absl::InvalidArgumentError("--exact-tokens bos: the model has no BOS");
      eo.exact_token_ids.push_back(id);
    }
    exact_label = absl::StrCat(" [diagnostic: token ids ", absl::StrJoin(eo.exact_token_ids, ","),
                               " read exact]");
  }

  std::vector<eval::EvalRow> rows;
  const size_t n_ctx = synthetic ? 1 : eval_corpora.size();
  ProgressBar ebar("eval", int64_t(cands.size() * n_ctx));
  for (size_t ci = 0; ci < n_ctx; ++ci) {
    eval::Reference ref;
    if (!synthetic) {
      ebar.Update(int64_t(ci * cands.size()), absl::StrCat("reference, context ", contexts[ci]));
      VQKV_ASSIGN_OR_RETURN(ref, eval::ComputeReference(setup->model, eval_corpora[ci]));
    }
    for (size_t i = 0; i < cands.size(); ++i) {
      if (cands[i].context > 0 && (synthetic || cands[i].context != contexts[ci])) {
        ebar.Update(int64_t(ci * cands.size() + i) + 1, "");
        continue;
      }
      VQKV_ASSIGN_OR_RETURN(kernels::CodecSpec spec, kernels::ParseCodecSpec(cands[i].spec));
      spec.sink_tokens = int(sinks);
      spec.codebook = cands[i].codebook;
      VQKV_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Codec> codec, kernels::CreateCodec(spec));
      const int64_t cb_bytes = cands[i].codebook ? cands[i].codebook->config().CodebookBytes() : 0;
      eval::EvalRow row;
      if (synthetic) {
        VQKV_ASSIGN_OR_RETURN(row, eval::EvaluateOnSamples(synth_eval, *codec, cb_bytes, eo));
        row.codec = absl::StrCat("SYNTHETIC ", row.codec);
      } else {
        VQKV_ASSIGN_OR_RETURN(
            row, eval::Evaluate(setup->model, eval_corpora[ci], ref, *codec, cb_bytes, eo));
        if (contexts.size() > 1) row.context = contexts[ci];
      }
      row.split = cands[i].split;
      if (cands[i].codebook) {
        row.codec = absl::StrFormat("%s%s", synthetic ? "SYNTHETIC " : "", cands[i].name);
      }
      row.codec += exact_label;
      rows.push_back(std::move(row));
      ebar.Update(
          int64_t(ci * cands.size() + i) + 1,
          absl::StrCat(rows.back().codec, synthetic ? "" : absl::StrCat(" @", contexts[ci])));
    }
  }
  ebar.Finish();
  const std::string table = eval::FormatTable(rows);
  std::printf("\n%s%s\n",
              synthetic ? "SYNTHETIC K/V (no model found) -- not a model measurement\n" : "",
              table.c_str());
  if (!synthetic) {
    for (const auto& r : rows) {
      if (r.codec == "raw" || r.codec.rfind("raw", 0) == 0) {
        std::printf(
            "context %lld: reference perplexity (fp32 cache) %.3f over %lld scored "
            "predictions\n",
            (long long)(r.context > 0 ? r.context : contexts.front()), r.ppl_ref,
            (long long)r.scored);
      }
    }
    std::printf(
        "positions >= sinks + recent (%lld) scored; bits/element on an fp16 basis with headers, "
        "sinks and codebooks amortised over %lld tokens%s.\n",
        (long long)(sinks + recent), (long long)eo.amortise_tokens,
        attn_queries > 0 ? absl::StrCat("; attention metrics on <= ", attn_queries,
                                        " query positions per sequence")
                               .c_str()
                         : "");
  }
  if (!f.Str("markdown").empty()) VQKV_RETURN_IF_ERROR(WriteStringToFile(f.Str("markdown"), table));
  return absl::OkStatus();
}

}  // namespace

int RunFidelity(int argc, char** argv) {
  std::vector<FlagSpec> specs = {
      {"model", DefaultModelDir(), "LLaMA-architecture safetensors folder or .gguf file"},
      {"text", DefaultTextPath(), "stories separated by <|endoftext|>"},
      {"max-tokens", "512",
       "tokens per calibration context (and per evaluation context without --contexts)"},
      {"contexts", "", "evaluate at each of these context lengths, e.g. 512,2048,8192"},
      {"eval-tokens", "0",
       "with --contexts: about this many evaluation tokens per context (0: --eval-seqs)"},
      {"max-stages", "",
       "cap the stages fitted for the split chooser at K,V (e.g. 32,16; the paper split is "
       "always fitted); default: as many as the largest budget could use"},
      {"split-holdout", "0.25",
       "share of the calibration sequences held out of the fit for the split chooser (0: "
       "choose on the fitting data, which favours stages that memorise it)"},
      {"refit", "true",
       "after choosing splits on the held-out sequences, fit again on all calibration "
       "sequences (--refit=false keeps the codebook the splits were measured on)",
       true},
      {"split-queries", "0",
       "split chooser: at most this many query positions per calibration sequence (0: every "
       "4th)"},
      {"attn-queries", "0",
       "attention metrics on at most this many query positions per sequence (0: all)"},
      {"per-story", "",
       "one story per sequence instead of packing stories into max-tokens contexts", true},
      {"calib-fraction", "0.5",
       "share of the stories (from the start) used for calibration; the rest evaluates"},
      {"calib-seqs", "0", "calibration sequences (0: all calibration stories)"},
      {"calib-generate", "0",
       "also fit the codebooks on about this many tokens of model-written text: stories that "
       "start with a calibration story's first tokens and continue with the model's own sampled "
       "tokens (never the evaluation stories; the split chooser still measures on held-out "
       "calibration text). Deep stages memorise a small calibration text; this gives them more "
       "to learn from. Cached with --codebook-cache"},
      {"eval-seqs", "0", "evaluation sequences (0: all evaluation stories)"},
      {"paper", "auto",
       "the paper's split (head_dim 128: K 56x1024, V 16x512); auto scales the stages to the "
       "model's head_dim, or give K stages x size, V stages x size"},
      {"budgets", "2.75,2.5",
       "code budgets (bits/element) for which `fit --bits` chooses a split; CONTEXT:BITS "
       "evaluates that budget at one --contexts length only (e.g. 512:2.2,8192:2.3: the "
       "fixed overheads differ with length)"},
      {"iters", "10", "Lloyd iterations per stage"},
      {"max-vectors", "65536", "training vectors per table (subsampled)"},
      {"sinks", "4", "leading tokens kept exact"},
      {"recent", "32", "most recent tokens kept exact"},
      {"per-head", "", "one codebook per KV head (default: shared by a layer's heads)", true},
      {"code-spaces", "none",
       "rvq code spaces to fit and compare, comma-separated: none, or rope (keys coded "
       "before RoPE, so codebooks calibrated on short contexts hold at long ones), kscale "
       "(key channels weighted by the calibration queries' RMS), vscale (value channels "
       "weighted by the output projection's column norms) joined by '+', e.g. "
       "none,rope,rope+kscale"},
      {"scale-exponent", "1", "channel weights are energy^(exponent/2)"},
      {"beam", "1",
       "> 1: beam search of this width in the --outliers rows, or (without --outliers) a "
       "beam row after each `fit --bits` row"},
      {"outliers", "",
       "comma-separated counts: each adds every `fit --bits` row again with this many "
       "outlier tokens per block and layer (their residual stored as int8; see "
       "CodecSpec::outliers)"},
      {"baselines", "true",
       "evaluate scalar-2, scalar-4 and the paper split too (--baselines=false: raw and the "
       "chosen rvq rows only, for quicker comparisons)",
       true},
      {"split-objective", "attn",
       "what `fit --bits` minimises across layers: attn (the sum of attention-output "
       "errors), kl (each layer's squared error weighted by how much compressing that layer "
       "alone moves the model's next-token distributions on the held-out calibration "
       "sequences; costs one model pass per layer), or attn,kl (rows for both)"},
      {"sensitivity-pack", "",
       "--split-objective kl: measure the layers' sensitivity on the held-out calibration "
       "sequences joined into long contexts (up to the model's context length; default: each on "
       "its own)",
       true},
      {"layer-weights-out", "",
       "--split-objective kl: also write the layer weights to this file (for `vqkv fit "
       "--bits B --layer-weights FILE`)"},
      {"codebook-cache", "",
       "folder: save each fit there and load it in a later run with the same samples and "
       "settings instead of fitting again"},
      {"exact-tokens", "",
       "diagnostic: positions holding these token ids (comma-separated; bos for the model's "
       "BOS) read their exact K/V in every layer of the rvq rows, though stored and counted as "
       "coded: how much of the error such tokens cause (e.g. each packed story's BOS)"},
      {"markdown", "", "also write the table to this file"}};
  for (FlagSpec& g : GenerateFlags("--calib-generate")) specs.push_back(std::move(g));
  Flags f("fidelity",
          "Fit rvq codebooks on the first part of a text's stories (--calib-fraction) and compare "
          "raw, scalar-2/4 and rvq on the rest with the real model (K/V error, attention error, "
          "perplexity, top-1 agreement, KL).",
          std::move(specs));
  if (int rc = ParseOrExit(f, argc, argv); rc >= 0) return rc;
  auto st = Fidelity(f);
  return st.ok() ? 0 : Fail(st);
}

}  // namespace vqkv::cli
