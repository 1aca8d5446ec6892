// `vqkv demo`: the service demo. Against a running vqkvd it registers the model, fits rvq
// codebooks on the daemon from calibration K/V, stores the real K/V of a few stories as chained
// blocks, looks them up, gets them back reconstructed, and measures what the model sees when its
// attention reads the fetched cache (perplexity, top-1 agreement) next to ratio and timing.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cpp/cli/commands.h"
#include "client/cpp/cli/flags.h"
#include "client/cpp/cli/model_setup.h"
#include "client/cpp/client.h"
#include "client/cpp/eval/fidelity_eval.h"
#include "common/status_macros.h"
#include "kernels/fidelity.h"
#include "model/scoring.h"

namespace vqkv::cli {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// [layers, 2, tokens, heads, dim] fp16 block of tokens [t0, t0 + n) from a captured cache.
std::string BlockFromCache(const model::KvCache& c, int t0, int n) {
  const int64_t row = int64_t{c.kv_heads} * c.head_dim;
  std::vector<float> x(size_t(c.layers) * 2 * n * row);
  for (int l = 0; l < c.layers; ++l) {
    std::memcpy(&x[(size_t(l) * 2) * n * row], &c.k[l][t0 * row], n * row * 4);
    std::memcpy(&x[(size_t(l) * 2 + 1) * n * row], &c.v[l][t0 * row], n * row * 4);
  }
  std::string out(x.size() * 2, '\0');
  FromFloat(x.data(), x.size(), DType::kF16, out.data());
  return out;
}

absl::Status Demo(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(int64_t n_stories, f.Int("stories"));
  VQKV_ASSIGN_OR_RETURN(int64_t calib_stories, f.Int("calib-stories"));
  VQKV_ASSIGN_OR_RETURN(int64_t block_tokens, f.Int("block-tokens"));
  VQKV_ASSIGN_OR_RETURN(int64_t iters, f.Int("iters"));
  VQKV_ASSIGN_OR_RETURN(ModelSetup m, LoadModelSetup(f.Str("model"), f.Str("text")));
  const auto& cfg = m.model.config();
  client::ClientOptions co;
  co.target = f.Str("target");
  VQKV_ASSIGN_OR_RETURN(int64_t timeout_s, f.Int("timeout"));
  if (timeout_s <= 0) return absl::InvalidArgumentError("--timeout must be > 0 seconds");
  co.timeout = absl::Seconds(timeout_s);  // the daemon's codebook fit is the longest call
  VQKV_ASSIGN_OR_RETURN(std::unique_ptr<client::Client> cl, client::Client::Connect(co));
  VQKV_RETURN_IF_ERROR(cl->WaitReady(absl::Seconds(10)));
  std::printf("connected to vqkvd at %s\n", co.target.c_str());

  client::ModelInfo info;
  // Default id: the model's file or folder name ("SmolLM2-135M-Instruct.Q4_1", "tinystories-656k").
  std::filesystem::path model_path(m.model_dir);
  if (!model_path.has_filename()) model_path = model_path.parent_path();  // "dir/"
  info.model_id = f.Str("model-id").empty() ? model_path.filename().replace_extension().string()
                                            : f.Str("model-id");
  if (info.model_id.empty()) info.model_id = "demo-model";
  info.layers = cfg.num_hidden_layers;
  info.kv_heads = cfg.num_key_value_heads;
  info.head_dim = cfg.head_dim;
  info.dtype = DType::kF16;
  info.block_tokens = int32_t(block_tokens);
  info.codec = "rvq";
  VQKV_ASSIGN_OR_RETURN(v1::RegisterModelResponse reg, cl->RegisterModel(info));
  std::printf(
      "registered model %s: %d layers, %d KV heads, head_dim %d, fp16, %d-token blocks, codec %s\n",
      info.model_id.c_str(), info.layers, info.kv_heads, info.head_dim, info.block_tokens,
      reg.codec().c_str());

  // Calibration K/V from the first half of the text, fitted on the daemon.
  auto first = SelectPart(m.stories, "first-half");
  auto second = SelectPart(m.stories, "second-half");
  const eval::Corpus calib = eval::BuildCorpus(m.tokenizer, *first, 512, 48, int(calib_stories));
  std::vector<std::string> calib_blocks;
  std::vector<client::SampleView> views;
  for (const auto& seq : calib.seqs) {
    model::KvCache cache;
    model::ForwardOptions fo;
    fo.capture = &cache;
    fo.capture_queries = false;
    VQKV_RETURN_IF_ERROR(m.model.Forward(seq, fo).status());
    calib_blocks.push_back(BlockFromCache(cache, 0, cache.tokens));
    views.push_back(
        {cache.tokens, DType::kF16, calib_blocks.back().data(), calib_blocks.back().size()});
  }
  client::FitParams fp;
  fp.model_id = info.model_id;
  fp.k_stages = f.Str("k");
  fp.v_stages = f.Str("v");
  fp.iterations = int(iters);
  fp.seed = 1;
  if (f.Bool("key-rope")) {
    if (m.model.config().rope_scaling == model::RopeScaling::kNone) {
      fp.key_rope_theta = m.model.config().rope_theta;
    } else {
      std::fprintf(stderr,
                   "note: the model scales RoPE; the daemon's fit supports plain RoPE only, so "
                   "keys are coded as given (post-RoPE)\n");
    }
  }
  auto t = Clock::now();
  int last_pct = -1;
  VQKV_ASSIGN_OR_RETURN(v1::FitCodebookResponse fit,
                        cl->FitCodebook(fp, views, [&](const v1::FitCodebookResponse& p) {
                          const int pct = p.total() > 0 ? int(100 * p.done() / p.total()) : 0;
                          if (pct / 10 != last_pct / 10)
                            std::fprintf(stderr, "  fit %3d%% %s\n", pct, p.detail().c_str());
                          last_pct = pct;
                        }));
  std::printf(
      "fitted codebook %s (%s, keys %s) on the daemon from %lld calibration tokens in %.1f s\n",
      fit.codebook_id().c_str(), fit.config().c_str(),
      fp.key_rope_theta > 0 ? "before RoPE" : "as given", (long long)calib.tokens(), Since(t));

  // Evaluation stories: capture, put as chained blocks, look up, get back.
  const eval::Corpus ev =
      eval::BuildCorpus(m.tokenizer, *second, 512, int(2 * block_tokens), int(n_stories));
  struct Story {
    std::vector<int> tokens;
    model::KvCache cache;
    std::vector<std::string> hashes, blocks;
  };
  std::vector<Story> stories(ev.seqs.size());
  std::vector<client::BlockPut> puts;
  int64_t logical = 0;
  for (size_t i = 0; i < ev.seqs.size(); ++i) {
    Story& s = stories[i];
    s.tokens = ev.seqs[i];
    model::ForwardOptions fo;
    fo.capture = &s.cache;
    fo.capture_queries = false;
    VQKV_RETURN_IF_ERROR(m.model.Forward(s.tokens, fo).status());
    std::vector<int32_t> ids(s.tokens.begin(), s.tokens.end());
    s.hashes = client::BlockHashChain(ids, int(block_tokens));
    for (size_t b = 0; b < s.hashes.size(); ++b)
      s.blocks.push_back(BlockFromCache(s.cache, int(b * block_tokens), int(block_tokens)));
  }
  for (auto& s : stories) {
    for (size_t b = 0; b < s.hashes.size(); ++b) {
      puts.push_back({s.hashes[b], int64_t(b) * block_tokens, int32_t(block_tokens),
                      s.blocks[b].data(), s.blocks[b].size()});
      logical += int64_t(s.blocks[b].size());
    }
  }
  t = Clock::now();
  VQKV_ASSIGN_OR_RETURN(client::PutResult put, cl->Put(info, puts));
  const double put_s = Since(t);
  std::printf(
      "put %lld blocks of %zu stories: %.2f MiB fp16 KV -> %.3f MiB stored (%.2fx smaller) in %.2f "
      "s (%.1f MiB/s)\n",
      (long long)put.stored, stories.size(), logical / 1048576.0, put.stored_bytes / 1048576.0,
      double(put.logical_bytes) / double(std::max<int64_t>(1, put.stored_bytes)), put_s,
      logical / 1048576.0 / put_s);

  int64_t prefix_total = 0, blocks_total = 0;
  for (auto& s : stories) {
    VQKV_ASSIGN_OR_RETURN(client::LookupResult lr, cl->Lookup(info.model_id, s.hashes));
    prefix_total += lr.prefix_blocks;
    blocks_total += int64_t(s.hashes.size());
    // A prompt that diverges after its first block shares exactly one cached block.
    if (s.hashes.size() >= 2) {
      std::vector<int32_t> changed(s.tokens.begin(), s.tokens.end());
      changed[block_tokens] ^= 1;
      VQKV_ASSIGN_OR_RETURN(
          client::LookupResult lc,
          cl->Lookup(info.model_id, client::BlockHashChain(changed, int(block_tokens))));
      if (lc.prefix_blocks != 1) {
        return absl::InternalError(absl::StrCat("lookup of a diverging prompt found ",
                                                lc.prefix_blocks, " blocks, expected 1"));
      }
    }
  }
  std::printf(
      "lookup: %lld of %lld blocks cached as leading prefixes; a prompt diverging after block 1 "
      "matches 1 block\n",
      (long long)prefix_total, (long long)blocks_total);

  // Get back reconstructed fp16 and feed it to the model's attention.
  double nll_ref = 0, nll = 0, kerr = 0, kref = 0, verr = 0, vref = 0;
  int64_t scored = 0, agree = 0;
  double get_s = 0;
  for (auto& s : stories) {
    t = Clock::now();
    VQKV_ASSIGN_OR_RETURN(std::vector<client::BlockGot> got, cl->Get(info.model_id, s.hashes));
    get_s += Since(t);
    const int H = info.kv_heads, D = info.head_dim, L = info.layers;
    const int64_t row = int64_t{H} * D;
    const int T = int(s.tokens.size());
    std::vector<std::vector<float>> kh(L, std::vector<float>(size_t(T) * row)), vh = kh;
    for (int l = 0; l < L; ++l) {
      kh[l] =
          s.cache.k[l];  // tokens past the last full block stay exact (the engine's recent tail)
      vh[l] = s.cache.v[l];
    }
    for (size_t b = 0; b < got.size(); ++b) {
      std::vector<float> x(size_t(L) * 2 * block_tokens * row);
      ToFloat(DType::kF16, got[b].data.data(), x.size(), x.data());
      for (int l = 0; l < L; ++l) {
        std::memcpy(&kh[l][b * block_tokens * row], &x[(size_t(l) * 2) * block_tokens * row],
                    block_tokens * row * 4);
        std::memcpy(&vh[l][b * block_tokens * row], &x[(size_t(l) * 2 + 1) * block_tokens * row],
                    block_tokens * row * 4);
      }
    }
    for (int l = 0; l < L; ++l) {
      for (size_t i = 0; i < kh[l].size(); ++i) {
        kerr += double(kh[l][i] - s.cache.k[l][i]) * (kh[l][i] - s.cache.k[l][i]);
        kref += double(s.cache.k[l][i]) * s.cache.k[l][i];
        verr += double(vh[l][i] - s.cache.v[l][i]) * (vh[l][i] - s.cache.v[l][i]);
        vref += double(s.cache.v[l][i]) * s.cache.v[l][i];
      }
    }
    // Attention reads the fetched cache everywhere except the 32 most recent tokens.
    model::ForwardOptions fo;
    fo.sink_tokens = 0;
    fo.recent_tokens = 32;
    fo.transform = [&](int layer, const std::vector<float>&, const std::vector<float>&,
                       std::vector<float>* k, std::vector<float>* v) {
      *k = kh[layer];
      *v = vh[layer];
      return absl::OkStatus();
    };
    VQKV_ASSIGN_OR_RETURN(std::vector<float> logits, m.model.Forward(s.tokens, fo));
    VQKV_ASSIGN_OR_RETURN(std::vector<float> ref_logits, m.model.Forward(s.tokens, {}));
    VQKV_ASSIGN_OR_RETURN(model::TokenScores sc, model::ScoreTokens(logits, s.tokens, 36));
    VQKV_ASSIGN_OR_RETURN(model::TokenScores sr, model::ScoreTokens(ref_logits, s.tokens, 36));
    nll += sc.mean_nll * sc.scored;
    nll_ref += sr.mean_nll * sr.scored;
    scored += sc.scored;
    for (int i = 36; i < T - 1; ++i) agree += sc.argmax[i] == sr.argmax[i];
  }
  std::printf("get %lld blocks back as fp16 in %.2f s (%.1f MiB/s of KV)\n",
              (long long)blocks_total, get_s, logical / 1048576.0 / get_s);
  const double ppl_ref = std::exp(nll_ref / double(scored)), ppl = std::exp(nll / double(scored));
  std::printf(
      "\nfidelity of the KV that made the round trip (%lld predictions, attention on the fetched "
      "cache):\n",
      (long long)scored);
  std::printf("  K relative error %.4f, V relative error %.4f\n", kerr / kref, verr / vref);
  std::printf("  perplexity %.3f vs %.3f exact (%+.2f%%), top-1 agreement %.1f%%\n", ppl, ppl_ref,
              (ppl / ppl_ref - 1) * 100, 100.0 * double(agree) / double(scored));
  VQKV_ASSIGN_OR_RETURN(v1::GetStatsResponse st, cl->Stats());
  std::printf(
      "daemon stats: %lld blocks, %lld B stored for %lld B logical (%.2fx), hits %lld, misses "
      "%lld\n",
      (long long)st.blocks(), (long long)st.stored_bytes(), (long long)st.logical_bytes(),
      double(st.logical_bytes()) / double(std::max<int64_t>(1, st.stored_bytes())),
      (long long)st.hits(), (long long)st.misses());
  return absl::OkStatus();
}

}  // namespace

int RunDemo(int argc, char** argv) {
  Flags f(
      "demo",
      "Service demo against a running vqkvd: register, fit, put real model KV, lookup, get, "
      "measure.",
      {{"target", "127.0.0.1:50051", "vqkvd address"},
       {"model", DefaultModelDir(), "LLaMA-architecture safetensors folder or .gguf file"},
       {"text", DefaultTextPath(), "stories separated by <|endoftext|>"},
       {"model-id", "", "model id to register (default: the model's file or folder name)"},
       {"timeout", "1800", "deadline of each call in seconds (the codebook fit is the longest)"},
       {"stories", "8", "evaluation stories to store and fetch"},
       {"calib-stories", "40", "calibration stories sent to the daemon's fit"},
       {"block-tokens", "32", "tokens per block"},
       {"k", "4x1024", "key stages x codebook size for the daemon's fit"},
       {"v", "4x512", "value stages x codebook size"},
       {"iters", "6", "Lloyd iterations per stage"},
       {"key-rope", "true",
        "code keys before RoPE (the daemon rotates them back by position with the model's "
        "rope_theta), so the codebook holds at positions past the calibration stories; "
        "--key-rope=false codes them as given",
        true}});
  if (int rc = ParseOrExit(f, argc, argv); rc >= 0) return rc;
  auto st = Demo(f);
  return st.ok() ? 0 : Fail(st);
}

}  // namespace vqkv::cli
