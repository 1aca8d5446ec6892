// vqkv_gguf_dump: writes what bench/smollm2_reference/check.py compares against its
// independent implementation (llama.cpp's gguf package + numpy): raw dequantized tensors, token
// ids of fixed strings, logits and post-RoPE Q/K/V of a prompt, and a greedy continuation.
// Usage: vqkv_gguf_dump MODEL.gguf OUT.safetensors PROMPT [NEW_TOKENS]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/safetensors.h"
#include "model/gguf.h"
#include "model/gguf_model.h"
#include "model/gguf_tokenizer.h"
#include "model/llama.h"

namespace {

const char* const kStrings[] = {
    "Hello, world!",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "The year 2024 had 366 days; it's a leap year, isn't it?",
    "  double  spaces\tand\ttabs\n\nnew lines  ",
    "caf\xC3\xA9 na\xC3\xAFve \xE2\x80\x9Cquotes\xE2\x80\x9D \xF0\x9F\x99\x82 "
    "\xE4\xB8\xAD\xE6\x96\x87",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "I'll say they're we've you'd HE'S",
};

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "error: %s\n", std::string(s.ToString()).c_str());
  return 1;
}

std::string I32Bytes(const std::vector<int>& ids) {
  std::string b(ids.size() * 4, '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t v = ids[i];
    std::memcpy(b.data() + 4 * i, &v, 4);
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace vqkv::model;
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.gguf OUT.safetensors PROMPT [NEW_TOKENS]\n", argv[0]);
    return 2;
  }
  const int new_tokens = argc > 4 ? std::atoi(argv[4]) : 30;
  auto t0 = std::chrono::steady_clock::now();
  auto g = GgufFile::Open(argv[1]);
  if (!g.ok()) return Fail(g.status());
  auto config = LlamaConfigFromGguf(*g);
  if (!config.ok()) return Fail(config.status());
  auto weights = LlamaWeightsFromGguf(*g, *config);
  if (!weights.ok()) return Fail(weights.status());
  auto model = LlamaModel::Create(*config, std::move(*weights));
  if (!model.ok()) return Fail(model.status());
  auto tok = LoadGgufTokenizer(*g);
  if (!tok.ok()) return Fail(tok.status());
  auto t1 = std::chrono::steady_clock::now();
  std::fprintf(stderr, "loaded in %.2f s\n", std::chrono::duration<double>(t1 - t0).count());

  vqkv::SafetensorsWriter w;
  // Raw dequantized tensors (before the RoPE row un-permutation): every 1-d tensor, the
  // embeddings, and every tensor of the first and last layer.
  const std::string last = absl::StrCat("blk.", config->num_hidden_layers - 1, ".");
  std::vector<std::string> names;
  for (const GgufTensorInfo& t : g->tensors()) {
    if (t.dims.size() == 1 || t.name == "token_embd.weight" || t.name.rfind("blk.0.", 0) == 0 ||
        t.name.rfind(last, 0) == 0) {
      auto data = g->ReadFloat(t.name);
      if (!data.ok()) return Fail(data.status());
      std::vector<int64_t> shape(t.dims.rbegin(), t.dims.rend());
      w.AddF32("tensor." + t.name, shape, data->data());
      names.push_back(t.name);
    }
  }
  w.SetMetadata("tensors", absl::StrJoin(names, ","));
  int i = 0;
  for (const char* s : kStrings) {
    const std::vector<int> ids = tok->Encode(s, /*add_bos=*/false);
    w.AddRaw(absl::StrCat("enc.", i), "I32", {static_cast<int64_t>(ids.size())}, I32Bytes(ids));
    w.SetMetadata(absl::StrCat("enc.", i), s);
    w.SetMetadata(absl::StrCat("dec.", i), tok->Decode(ids));
    ++i;
  }
  w.SetMetadata("strings", std::to_string(i));

  const std::vector<int> ids = tok->EncodeForScoring(argv[3]);
  w.AddRaw("ids", "I32", {static_cast<int64_t>(ids.size())}, I32Bytes(ids));
  KvCache cache;
  ForwardOptions opts;
  opts.capture = &cache;
  auto t2 = std::chrono::steady_clock::now();
  auto logits = model->Forward(ids, opts);
  if (!logits.ok()) return Fail(logits.status());
  auto t3 = std::chrono::steady_clock::now();
  std::fprintf(stderr, "forward of %zu tokens in %.2f s\n", ids.size(),
               std::chrono::duration<double>(t3 - t2).count());
  const int64_t n = static_cast<int64_t>(ids.size());
  w.AddF32("logits", {n, config->vocab_size}, logits->data());
  for (int l = 0; l < cache.layers; ++l) {
    w.AddF32(absl::StrCat("k.", l), {n, cache.kv_heads, cache.head_dim}, cache.k[l].data());
    w.AddF32(absl::StrCat("v.", l), {n, cache.kv_heads, cache.head_dim}, cache.v[l].data());
    w.AddF32(absl::StrCat("q.", l), {n, cache.heads, cache.head_dim}, cache.q[l].data());
  }
  auto gen = model->Generate(ids, new_tokens);
  if (!gen.ok()) return Fail(gen.status());
  w.AddRaw("generated", "I32", {static_cast<int64_t>(gen->size())}, I32Bytes(*gen));
  w.SetMetadata("generated_text", tok->Decode(*gen));
  std::printf("prompt: %s\ncontinuation: %s\n", argv[3], tok->Decode(*gen).c_str());
  if (auto st = w.WriteFile(argv[2]); !st.ok()) return Fail(st);
  return 0;
}
