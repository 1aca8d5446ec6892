// Offline codec commands: ratio, capture, fit, eval.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cpp/cli/commands.h"
#include "client/cpp/cli/flags.h"
#include "client/cpp/cli/model_setup.h"
#include "client/cpp/eval/fidelity_eval.h"
#include "client/cpp/eval/samples_io.h"
#include "common/progress.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "kernels/codebook.h"
#include "kernels/codec.h"
#include "kernels/fidelity.h"
#include "kernels/ratio.h"
#include "kernels/rvq_budget.h"
#include "kernels/rvq_fit.h"

namespace vqkv::cli {
namespace {

std::string Bytes(int64_t b) {
  if (b >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", double(b) / (1 << 30));
  if (b >= (int64_t{1} << 20)) return absl::StrFormat("%.2f MiB", double(b) / (1 << 20));
  if (b >= 1024) return absl::StrFormat("%.1f KiB", double(b) / 1024);
  return absl::StrCat(b, " B");
}

absl::Status Ratio(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(int64_t dim, f.Int("head-dim"));
  VQKV_ASSIGN_OR_RETURN(int64_t layers, f.Int("layers"));
  VQKV_ASSIGN_OR_RETURN(int64_t heads, f.Int("kv-heads"));
  VQKV_ASSIGN_OR_RETURN(int64_t context, f.Int("context"));
  VQKV_ASSIGN_OR_RETURN(int64_t block, f.Int("block-tokens"));
  VQKV_ASSIGN_OR_RETURN(int64_t sinks, f.Int("sinks"));
  VQKV_ASSIGN_OR_RETURN(int64_t amortise, f.Int("amortise-tokens"));
  if (dim <= 0 || layers <= 0 || heads <= 0 || context < 0 || block <= 0) {
    return absl::InvalidArgumentError(
        "ratio: --head-dim, --layers, --kv-heads, --block-tokens must be positive");
  }
  std::unique_ptr<kernels::Codec> codec;
  int64_t codebook_bytes = 0;
  const std::string scalar = f.Str("scalar");
  if (!scalar.empty()) {
    VQKV_ASSIGN_OR_RETURN(kernels::CodecSpec spec, kernels::ParseCodecSpec(scalar));
    spec.sink_tokens = int(sinks);
    VQKV_ASSIGN_OR_RETURN(codec, kernels::CreateCodec(spec));
    std::printf("setting: %s, head_dim %lld\n", codec->Label().c_str(), (long long)dim);
  } else {
    VQKV_ASSIGN_OR_RETURN(kernels::StageConfig k, kernels::ParseStageConfig(f.Str("k")));
    VQKV_ASSIGN_OR_RETURN(kernels::StageConfig v, kernels::ParseStageConfig(f.Str("v")));
    const auto cfg = kernels::RvqConfig::Uniform(int(layers), int(heads), int(dim), k, v);
    // The ratio needs only the sizes: zero tables stand in for a real codebook.
    std::vector<std::vector<float>> tables;
    for (int l = 0; l < layers; ++l) {
      tables.emplace_back(size_t(k.stages) * k.size * dim, 0.f);
      tables.emplace_back(size_t(v.stages) * v.size * dim, 0.f);
    }
    VQKV_ASSIGN_OR_RETURN(kernels::Codebook cb, kernels::Codebook::Create(cfg, std::move(tables)));
    kernels::CodecSpec spec;
    spec.name = "rvq";
    spec.sink_tokens = int(sinks);
    spec.codebook = std::make_shared<const kernels::Codebook>(std::move(cb));
    VQKV_ASSIGN_OR_RETURN(codec, kernels::CreateCodec(spec));
    codebook_bytes = cfg.CodebookBytes();
    const double kb = double(k.stages) * k.bits() / dim, vb = double(v.stages) * v.bits() / dim;
    std::printf("setting: head_dim %lld, K %dx%d (%d-bit codes), V %dx%d (%d-bit codes)\n",
                (long long)dim, k.stages, k.size, k.bits(), v.stages, v.size, v.bits());
    std::printf("bits/element: K %.3f, V %.3f, average %.3f\n", kb, vb, (kb + vb) / 2);
    std::printf("codebook size: %s per layer, %s for %lld layers (fp32 tables)\n",
                Bytes(codebook_bytes / layers).c_str(), Bytes(codebook_bytes).c_str(),
                (long long)layers);
  }
  kernels::RatioInputs in;
  in.layers = int(layers);
  in.kv_heads = int(heads);
  in.head_dim = int(dim);
  in.context_tokens = context;
  in.block_tokens = int(block);
  in.sink_tokens = int(sinks);
  in.amortise_tokens = amortise;
  const kernels::RatioReport r = kernels::ComputeRatio(*codec, in, codebook_bytes);
  std::printf(
      "codes-only ratio (paper's definition): %.1f%% (%.2f bits/element, %.2fx smaller than "
      "fp16)\n",
      100 * r.codes_only_ratio, r.codes_bits_per_element, 16 / r.codes_bits_per_element);
  if (context > 0) {
    std::printf(
        "\nall-in, %lld layers x %lld KV heads, context %lld tokens in %lld-token blocks, %lld "
        "sink tokens fp16,\n"
        "codebooks amortised over %lld tokens:\n",
        (long long)layers, (long long)heads, (long long)context, (long long)block, (long long)sinks,
        (long long)(amortise > 0 ? amortise : context));
    std::printf("  fp16 KV:        %s\n", Bytes(r.baseline_bytes).c_str());
    std::printf("  stored:         %s (%.3f bits/element)\n", Bytes(r.stored_bytes).c_str(),
                r.all_in_bits_per_element);
    std::printf("  real ratio:     %.1f%% (%.2fx smaller)\n", 100 * r.real_ratio,
                16 / r.all_in_bits_per_element);
    std::printf("  same memory as fp16 holds %.2fx the tokens (codebooks counted once)\n",
                r.longer_context);
  }
  return absl::OkStatus();
}

}  // namespace

int RunRatio(int argc, char** argv) {
  Flags f(
      "ratio",
      "Compression ratio of a codec setting: the paper's codes-only figure and the real one.",
      {{"head-dim", "128", "head dimension"},
       {"k", "56x1024", "key stages x codebook size"},
       {"v", "16x512", "value stages x codebook size"},
       {"scalar", "", "instead of rvq, a scalar codec: scalar-2 or scalar-4[:group=N]"},
       {"layers", "1", "model layers (for the all-in figures)"},
       {"kv-heads", "1", "KV heads per layer"},
       {"context", "0", "tokens per sequence; > 0 prints the all-in ratio"},
       {"block-tokens", "256", "tokens per stored block (one header each)"},
       {"sinks", "4", "leading tokens kept lossless (fp16)"},
       {"amortise-tokens", "0", "tokens sharing one codebook (0: the context alone pays for it)"}});
  if (int rc = ParseOrExit(f, argc, argv); rc >= 0) return rc;
  auto st = Ratio(f);
  return st.ok() ? 0 : Fail(st);
}

namespace {

absl::Status Capture(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(ModelSetup m, LoadModelSetup(f.Str("model"), f.Str("text")));
  VQKV_ASSIGN_OR_RETURN(int64_t max_tokens, f.Int("max-tokens"));
  VQKV_ASSIGN_OR_RETURN(int64_t max_seqs, f.Int("max-seqs"));
  const auto stories = SelectPart(m.stories, f.Str("part"));
  if (!stories.ok()) return stories.status();
  const eval::Corpus corpus =
      eval::BuildCorpus(m.tokenizer, *stories, int(max_tokens), 40, int(max_seqs), f.Bool("pack"));
  std::fprintf(stderr, "capturing K/V/Q of %zu sequences (%lld tokens)\n", corpus.seqs.size(),
               (long long)corpus.tokens());
  VQKV_ASSIGN_OR_RETURN(kernels::KvSamples s, eval::CaptureSamples(m.model, corpus));
  VQKV_ASSIGN_OR_RETURN(int64_t generate, f.Int("generate"));
  if (generate > 0) {
    // Model-written stories seeded by the selected ones, appended as more sequences.
    VQKV_ASSIGN_OR_RETURN(eval::GenerateOptions go, GenerateOptionsFromFlags(f, generate));
    ProgressBar bar("generate", generate);
    go.progress = [&](int64_t d, int64_t, const std::string& w) { bar.Update(d, w); };
    VQKV_ASSIGN_OR_RETURN(std::vector<std::string> gen,
                          eval::GenerateStories(m.model, m.tokenizer, *stories, go));
    bar.Finish(absl::StrCat(gen.size(), " model-written stories"));
    if (!f.Str("generate-out").empty()) {
      VQKV_RETURN_IF_ERROR(WriteStringToFile(f.Str("generate-out"), JoinStories(gen)));
    }
    const eval::Corpus gc =
        eval::BuildCorpus(m.tokenizer, gen, int(max_tokens), 40, 0, f.Bool("pack"));
    VQKV_ASSIGN_OR_RETURN(kernels::KvSamples gs, eval::CaptureSamples(m.model, gc));
    std::fprintf(stderr, "captured %lld model-written tokens in %zu sequences\n",
                 (long long)gs.tokens(0), gc.seqs.size());
    VQKV_ASSIGN_OR_RETURN(s, eval::ConcatSamples(s, gs));
  }
  VQKV_RETURN_IF_ERROR(eval::SaveSamples(s, f.Str("out")));
  std::printf("wrote %s: %d layers, %lld tokens, %d KV heads, head_dim %d, with queries\n",
              f.Str("out").c_str(), s.layers, (long long)s.tokens(0), s.kv_heads, s.head_dim);
  return absl::OkStatus();
}

}  // namespace

int RunCapture(int argc, char** argv) {
  std::vector<FlagSpec> specs = {
      {"model", DefaultModelDir(), "LLaMA-architecture safetensors folder or .gguf file"},
      {"text", DefaultTextPath(), "text file of stories separated by <|endoftext|>"},
      {"part", "first-half", "which stories: first-half, second-half or all"},
      {"max-tokens", "512", "truncate each sequence"},
      {"max-seqs", "0", "at most this many sequences (0: all)"},
      {"pack", "", "pack consecutive stories into sequences of up to --max-tokens", true},
      {"generate", "0",
       "also capture about this many tokens of model-written stories: each starts with a "
       "selected story's first tokens and continues with the model's own sampled tokens "
       "(more calibration data for `vqkv fit` than a small text holds)"},
      {"generate-out", "", "--generate: also write the model-written stories to this file"},
      {"out", "samples.safetensors", "output file"}};
  for (FlagSpec& g : GenerateFlags("--generate")) specs.push_back(std::move(g));
  Flags f("capture", "Run the model over stories and save post-RoPE K, V and Q as a samples file.",
          std::move(specs));
  if (int rc = ParseOrExit(f, argc, argv); rc >= 0) return rc;
  auto st = Capture(f);
  return st.ok() ? 0 : Fail(st);
}

namespace {

absl::StatusOr<kernels::FitOptions> FitOptionsFrom(const Flags& f, ProgressBar* bar) {
  kernels::FitOptions o;
  VQKV_ASSIGN_OR_RETURN(int64_t iters, f.Int("iters"));
  VQKV_ASSIGN_OR_RETURN(int64_t seed, f.Int("seed"));
  VQKV_ASSIGN_OR_RETURN(int64_t maxv, f.Int("max-vectors"));
  if (iters < 0 || maxv < 1)
    return absl::InvalidArgumentError("fit: --iters >= 0 and --max-vectors >= 1");
  o.iterations = int(iters);
  o.seed = uint64_t(seed);
  o.max_vectors = maxv;
  if (f.Str("init") == "sample") {
    o.init = kernels::FitOptions::Init::kSample;
  } else if (f.Str("init") != "kmeans++") {
    return absl::InvalidArgumentError("fit: --init must be kmeans++ or sample");
  }
  o.progress = [bar](int64_t done, int64_t total, const std::string& what) {
    (void)total;
    bar->Update(done, what);
  };
  return o;
}

absl::Status Fit(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(kernels::KvSamples s, eval::LoadSamples(f.Str("samples")));
  std::fprintf(stderr, "samples: %d layers, %lld tokens, %d KV heads, head_dim %d%s\n", s.layers,
               (long long)s.tokens(0), s.kv_heads, s.head_dim, s.q.empty() ? "" : ", with queries");
  const bool per_head = f.Bool("per-head");
  kernels::RvqConfig cfg;
  kernels::BudgetOptions budget;
  const bool choose = f.IsSet("bits");
  if (choose) {
    VQKV_ASSIGN_OR_RETURN(budget.bits_per_element, f.Double("bits"));
    VQKV_ASSIGN_OR_RETURN(int64_t ks, f.Int("k-size"));
    VQKV_ASSIGN_OR_RETURN(int64_t vs, f.Int("v-size"));
    budget.k_size = int(ks);
    budget.v_size = int(vs);
    budget.per_layer = !f.Bool("uniform-split");
    if (budget.bits_per_element <= 0 || budget.bits_per_element > 16) {
      return absl::InvalidArgumentError("fit: --bits must be in (0, 16]");
    }
    if (s.q.empty())
      return absl::InvalidArgumentError(
          "fit --bits needs samples with queries (from `vqkv capture`)");
    if (f.IsSet("layer-weights")) {
      VQKV_ASSIGN_OR_RETURN(std::string text, ReadFileToString(f.Str("layer-weights")));
      VQKV_ASSIGN_OR_RETURN(budget.layer_weights, kernels::ParseLayerWeights(text));
      if (int(budget.layer_weights.size()) != s.layers) {
        return absl::InvalidArgumentError(absl::StrCat(
            "fit: --layer-weights ", f.Str("layer-weights"), " holds ", budget.layer_weights.size(),
            " weights but the samples have ", s.layers, " layers"));
      }
    }
    cfg = kernels::MaxStagesConfig(s.layers, s.kv_heads, s.head_dim, budget, per_head);
  } else {
    VQKV_ASSIGN_OR_RETURN(kernels::StageConfig k, kernels::ParseStageConfig(f.Str("k")));
    VQKV_ASSIGN_OR_RETURN(kernels::StageConfig v, kernels::ParseStageConfig(f.Str("v")));
    cfg = kernels::RvqConfig::Uniform(s.layers, s.kv_heads, s.head_dim, k, v, per_head);
  }
  int64_t steps = 0;
  for (int l = 0; l < cfg.layers; ++l)
    steps += (cfg.k[l].stages + cfg.v[l].stages) * (per_head ? cfg.kv_heads : 1);
  ProgressBar bar("fit", steps);
  VQKV_ASSIGN_OR_RETURN(kernels::FitOptions opts, FitOptionsFrom(f, &bar));
  if (f.IsSet("key-rope-theta") || f.Bool("key-scale")) {
    kernels::CodeSpaceOptions co;
    if (f.IsSet("key-rope-theta")) {
      VQKV_ASSIGN_OR_RETURN(double theta, f.Double("key-rope-theta"));
      if (!(theta > 1) || s.head_dim % 2 != 0) {
        return absl::InvalidArgumentError(
            "fit: --key-rope-theta must be > 1 (the model's rope_theta) and head_dim even");
      }
      for (int i = 0; i < s.head_dim / 2; ++i) {
        co.key_rope_inv_freq.push_back(float(std::pow(theta, -2.0 * i / s.head_dim)));
      }
    }
    co.key_query_scale = f.Bool("key-scale");
    if (co.key_query_scale && s.q.empty()) {
      return absl::InvalidArgumentError("fit --key-scale needs samples with queries");
    }
    VQKV_ASSIGN_OR_RETURN(co.exponent, f.Double("scale-exponent"));
    VQKV_ASSIGN_OR_RETURN(opts.code_space, kernels::ComputeCodeSpace(s, co));
    std::fprintf(stderr, "code space: %s\n", opts.code_space.DebugString().c_str());
  }
  // With --bits, the split is chosen on sequences held out of the fit (when there are several).
  const kernels::KvSamples* fit_on = &s;
  const kernels::KvSamples* choose_on = &s;
  std::pair<kernels::KvSamples, kernels::KvSamples> parts;
  VQKV_ASSIGN_OR_RETURN(double holdout, f.Double("split-holdout"));
  if (choose && holdout > 0 && s.seq_lens.size() >= 2) {
    VQKV_ASSIGN_OR_RETURN(parts, kernels::HoldOutSequences(s, holdout));
    fit_on = &parts.first;
    choose_on = &parts.second;
    std::fprintf(stderr, "fitting on %zu sequences, choosing the split on the other %zu\n",
                 parts.first.seq_lens.size(), parts.second.seq_lens.size());
  }
  VQKV_ASSIGN_OR_RETURN(kernels::Codebook cb, kernels::FitCodebook(cfg, *fit_on, opts));
  bar.Finish();
  if (choose) {
    ProgressBar sbar("split", int64_t{cfg.layers} * cfg.k[0].stages);
    budget.progress = [&](int64_t d, int64_t, const std::string& w) { sbar.Update(d, w); };
    VQKV_ASSIGN_OR_RETURN(kernels::BudgetChoice choice,
                          kernels::ChooseSplit(cb, *choose_on, budget));
    sbar.Finish();
    VQKV_ASSIGN_OR_RETURN(cb, kernels::TruncateCodebook(cb, choice.config));
    std::printf("budget %.3f bits/element -> chosen split (%.3f bits/element codes):\n%s",
                budget.bits_per_element, choice.config.BitsPerElement(), choice.table.c_str());
  }
  VQKV_RETURN_IF_ERROR(cb.Save(f.Str("out")));
  std::printf("wrote %s: %s, %.3f bits/element (codes), codebook %s, code space %s, id %s\n",
              f.Str("out").c_str(), cb.config().ToString().c_str(), cb.config().BitsPerElement(),
              Bytes(cb.config().CodebookBytes()).c_str(), cb.code_space().DebugString().c_str(),
              cb.id().c_str());
  return absl::OkStatus();
}

}  // namespace

int RunFit(int argc, char** argv) {
  Flags f(
      "fit",
      "Fit rvq codebooks by residual k-means on K/V samples (.safetensors from `vqkv capture`, or "
      ".npy).",
      {{"samples", "samples.safetensors", "K/V samples file"},
       {"k", "7x1024", "key stages x codebook size"},
       {"v", "2x512", "value stages x codebook size"},
       {"bits", "",
        "instead of --k/--v: a code budget in bits/element; the split between K and V and across "
        "layers is chosen on the samples (needs queries)"},
       {"k-size", "1024", "with --bits: key codebook size"},
       {"layer-weights", "",
        "with --bits: a file of one weight per layer (as `vqkv fidelity --split-objective kl "
        "--layer-weights-out FILE` writes): minimise the weighted squared errors, i.e. the "
        "predicted KL, instead of the sum of errors"},
       {"v-size", "512", "with --bits: value codebook size"},
       {"uniform-split", "", "with --bits: the same split on every layer", true},
       {"split-holdout", "0.25",
        "with --bits: share of the sample sequences held out of the fit to choose the split on "
        "(0: choose on the fitting data)"},
       {"per-head", "", "one codebook per KV head instead of one per layer", true},
       {"iters", "10", "Lloyd iterations per stage"},
       {"seed", "1", "random seed (same seed and samples: same codebook)"},
       {"init", "kmeans++", "centroid initialisation: kmeans++ or sample"},
       {"max-vectors", "131072", "subsample each table's training vectors to this many"},
       {"key-rope-theta", "",
        "code keys before RoPE: the model's rope_theta (plain rotate-half RoPE); blocks must "
        "then be put with their sequence position"},
       {"key-scale", "", "weight key channels by the samples' query RMS (needs queries)", true},
       {"scale-exponent", "1", "with --key-scale: weights are energy^(exponent/2)"},
       {"out", "codebook.safetensors", "output codebook file"}});
  if (int rc = ParseOrExit(f, argc, argv); rc >= 0) return rc;
  auto st = Fit(f);
  return st.ok() ? 0 : Fail(st);
}

namespace {

absl::Status Eval(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(kernels::KvSamples s, eval::LoadSamples(f.Str("samples")));
  VQKV_ASSIGN_OR_RETURN(kernels::CodecSpec spec, kernels::ParseCodecSpec(f.Str("codec")));
  VQKV_ASSIGN_OR_RETURN(int64_t sinks, f.Int("sinks"));
  VQKV_ASSIGN_OR_RETURN(int64_t recent, f.Int("recent"));
  int64_t cb_bytes = 0;
  if (spec.name == "rvq") {
    if (f.Str("codebook").empty())
      return absl::InvalidArgumentError("eval: --codec rvq needs --codebook FILE");
    VQKV_ASSIGN_OR_RETURN(kernels::Codebook cb, kernels::Codebook::Load(f.Str("codebook")));
    cb_bytes = cb.config().CodebookBytes();
    spec.codebook = std::make_shared<const kernels::Codebook>(std::move(cb));
  }
  VQKV_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Codec> codec, kernels::CreateCodec(spec));
  eval::EvalOptions eo;
  eo.sink_tokens = int(sinks);
  eo.recent_tokens = int(recent);
  std::fprintf(stderr, "evaluating %s on %lld tokens x %d layers...\n", codec->Label().c_str(),
               (long long)s.tokens(0), s.layers);
  VQKV_ASSIGN_OR_RETURN(eval::EvalRow r, eval::EvaluateOnSamples(s, *codec, cb_bytes, eo));
  std::printf("codec %s on %lld tokens x %d layers (%.1f s)\n", codec->Label().c_str(),
              (long long)s.tokens(0), s.layers, r.seconds);
  std::printf(
      "  bits/element (fp16 basis, headers + sinks, codebook amortised over %lld tokens): %.3f\n",
      (long long)eo.amortise_tokens, r.bits_all_in);
  std::printf("  K relative error %.5f (cosine %.5f)   V relative error %.5f (cosine %.5f)\n",
              r.k.rel_error, r.k.cosine, r.v.rel_error, r.v.cosine);
  if (!s.q.empty()) {
    const auto& a = r.attention;
    std::printf(
        "  attention (sinks %lld + recent %lld exact): logit err %.5f, output err %.5f, top-8 "
        "agree %.4f, "
        "KL %.6f nats over %lld queries\n",
        (long long)sinks, (long long)recent, a.logit_rel_error, a.output_rel_error,
        a.topk_agreement, a.kl, (long long)a.queries);
  } else {
    std::printf("  (samples carry no queries: attention metrics skipped)\n");
  }
  return absl::OkStatus();
}

}  // namespace

int RunEval(int argc, char** argv) {
  Flags f("eval",
          "Fidelity of a codec on K/V samples: K/V error and, when the samples carry queries, "
          "attention metrics.",
          {{"samples", "samples.safetensors", "K/V samples file (.safetensors or .npy)"},
           {"codec", "rvq", "raw, scalar-2, scalar-4, rvq (with options, e.g. rvq:beam=4)"},
           {"codebook", "", "rvq codebook file"},
           {"sinks", "4", "leading tokens kept exact"},
           {"recent", "32", "most recent tokens kept exact (attention metrics)"}});
  if (int rc = ParseOrExit(f, argc, argv); rc >= 0) return rc;
  auto st = Eval(f);
  return st.ok() ? 0 : Fail(st);
}

}  // namespace vqkv::cli
