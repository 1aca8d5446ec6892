// put / get / lookup / stats / bench against a running vqkvd, through vqkv::client.
//
// put, get and lookup name blocks by a synthetic prompt: --seed picks the token ids, the block
// hashes are their chained hashes (client::BlockHashChain) and block i holds random KV seeded by
// (seed, i), so `put --seed 3` then `get --seed 3 --verify` checks a round trip end to end.
#include "client/cpp/cli/service_commands.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/cpp/cli/flags.h"
#include "client/cpp/client.h"
#include "common/progress.h"
#include "common/status_macros.h"

namespace vqkv::cli {
namespace {

std::vector<FlagSpec> CommonFlags(std::vector<FlagSpec> more, bool geometry) {
  std::vector<FlagSpec> f = {
      {"target", "127.0.0.1:50051", "vqkvd address HOST:PORT"},
      {"model", "demo-model", "model id"},
      {"tenant", "", "tenant namespace (default: \"default\")"},
      {"timeout", "120", "seconds per call (retries included)"},
  };
  if (geometry) {
    f.insert(f.end(), {{"register", "", "register the model first (idempotent)", true},
                       {"layers", "4", "layers (with --register, and to size blocks)"},
                       {"kv-heads", "2", "KV heads per layer"},
                       {"head-dim", "64", "head dimension"},
                       {"dtype", "f16", "f16, bf16 or f32"},
                       {"block-tokens", "16", "tokens per block"},
                       {"codec", "raw", "raw, scalar-2, scalar-4, rvq (with --register)"}});
  }
  f.insert(f.end(), more.begin(), more.end());
  return f;
}

absl::StatusOr<std::unique_ptr<client::Client>> Connect(const Flags& f, bool own_conn = false) {
  client::ClientOptions o;
  o.target = f.Str("target");
  o.tenant = f.Str("tenant");
  VQKV_ASSIGN_OR_RETURN(double timeout, f.Double("timeout"));
  o.timeout = absl::Seconds(timeout);
  o.separate_connection = own_conn;
  return client::Client::Connect(o);
}

absl::StatusOr<client::ModelInfo> ModelOf(const Flags& f) {
  client::ModelInfo m;
  m.model_id = f.Str("model");
  VQKV_ASSIGN_OR_RETURN(int64_t layers, f.Int("layers"));
  VQKV_ASSIGN_OR_RETURN(int64_t heads, f.Int("kv-heads"));
  VQKV_ASSIGN_OR_RETURN(int64_t dim, f.Int("head-dim"));
  VQKV_ASSIGN_OR_RETURN(int64_t bt, f.Int("block-tokens"));
  VQKV_ASSIGN_OR_RETURN(m.dtype, ParseDType(f.Str("dtype")));
  m.layers = static_cast<int32_t>(layers);
  m.kv_heads = static_cast<int32_t>(heads);
  m.head_dim = static_cast<int32_t>(dim);
  m.block_tokens = static_cast<int32_t>(bt);
  m.codec = f.Str("codec");
  return m;
}

// Random KV of one block (normal values with per-channel offsets), in the model's dtype.
std::string RandomBlock(const client::ModelInfo& m, uint64_t seed) {
  const int64_t n = m.BlockBytes() / static_cast<int64_t>(DTypeSize(m.dtype));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> offset(m.head_dim), x(n);
  for (float& o : offset) o = 2 * nd(rng);
  for (int64_t i = 0; i < n; ++i) x[i] = nd(rng) + offset[i % m.head_dim];
  std::string out(m.BlockBytes(), '\0');
  FromFloat(x.data(), n, m.dtype, out.data());
  return out;
}

// Hashes of the synthetic prompt of `seed` with `blocks` blocks.
std::vector<std::string> Chain(const client::ModelInfo& m, int64_t seed, int64_t blocks) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<int32_t> ids(blocks * m.block_tokens);
  for (int32_t& t : ids) t = static_cast<int32_t>(rng() % 32000);
  return client::BlockHashChain(ids, m.block_tokens);
}

absl::StatusOr<std::vector<std::string>> HashesOf(const Flags& f, const client::ModelInfo& m) {
  if (!f.Str("hashes").empty()) {
    std::vector<std::string> out;
    for (absl::string_view h : absl::StrSplit(f.Str("hashes"), ',')) {
      out.push_back(absl::HexStringToBytes(h));
    }
    return out;
  }
  VQKV_ASSIGN_OR_RETURN(int64_t seed, f.Int("seed"));
  VQKV_ASSIGN_OR_RETURN(int64_t blocks, f.Int("blocks"));
  return Chain(m, seed, blocks);
}

std::string Hex(const std::string& s) { return absl::BytesToHexString(s); }

std::string Human(double bytes) {
  if (bytes >= (1 << 30)) return absl::StrFormat("%.2f GiB", bytes / (1 << 30));
  if (bytes >= (1 << 20)) return absl::StrFormat("%.2f MiB", bytes / (1 << 20));
  return absl::StrFormat("%.1f KiB", bytes / 1024);
}

const char* TierName(v1::Tier t) {
  switch (t) {
    case v1::TIER_GPU:
      return "gpu";
    case v1::TIER_HOST:
      return "host";
    case v1::TIER_DISK:
      return "disk";
    default:
      return "-";
  }
}

absl::Status MaybeRegister(const Flags& f, client::Client& c, const client::ModelInfo& m) {
  if (!f.Bool("register")) return absl::OkStatus();
  VQKV_ASSIGN_OR_RETURN(v1::RegisterModelResponse r, c.RegisterModel(m));
  std::fprintf(stderr, "model %s %s (codec %s)\n", m.model_id.c_str(),
               r.created() ? "registered" : "already registered", r.codec().c_str());
  return absl::OkStatus();
}

absl::Status Put(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(client::ModelInfo m, ModelOf(f));
  VQKV_ASSIGN_OR_RETURN(auto c, Connect(f));
  VQKV_RETURN_IF_ERROR(MaybeRegister(f, *c, m));
  VQKV_ASSIGN_OR_RETURN(int64_t seed, f.Int("seed"));
  VQKV_ASSIGN_OR_RETURN(int64_t blocks, f.Int("blocks"));
  std::vector<std::string> data;
  if (!f.Str("file").empty()) {
    std::ifstream in(f.Str("file"), std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", f.Str("file")));
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (all.empty() || all.size() % m.BlockBytes() != 0) {
      return absl::InvalidArgumentError(absl::StrCat(f.Str("file"), ": ", all.size(),
                                                     " bytes is not a whole number of ",
                                                     m.BlockBytes(), "-byte blocks"));
    }
    blocks = static_cast<int64_t>(all.size()) / m.BlockBytes();
    for (int64_t i = 0; i < blocks; ++i)
      data.push_back(all.substr(i * m.BlockBytes(), m.BlockBytes()));
  } else {
    for (int64_t i = 0; i < blocks; ++i) data.push_back(RandomBlock(m, seed * 1000003 + i));
  }
  const std::vector<std::string> hashes = Chain(m, seed, blocks);
  std::vector<client::BlockPut> puts;
  for (int64_t i = 0; i < blocks; ++i) {
    puts.push_back({hashes[i], i * m.block_tokens, 0, data[i].data(), data[i].size()});
  }
  const absl::Time t0 = absl::Now();
  VQKV_ASSIGN_OR_RETURN(client::PutResult r, c->Put(m, puts));
  const double s = absl::ToDoubleSeconds(absl::Now() - t0);
  if (f.Bool("print-hashes")) {
    for (const std::string& h : hashes) std::printf("%s\n", Hex(h).c_str());
  }
  std::printf(
      "put %lld blocks: %lld stored, %lld already there; %s logical -> %s stored "
      "(%.1fx); %.3f s, %.1f MiB/s\n",
      static_cast<long long>(blocks), static_cast<long long>(r.stored),
      static_cast<long long>(r.existing), Human(r.logical_bytes).c_str(),
      Human(r.stored_bytes).c_str(),
      r.stored_bytes ? double(r.logical_bytes) / r.stored_bytes : 0.0, s,
      blocks * m.BlockBytes() / s / (1 << 20));
  return absl::OkStatus();
}

absl::Status Get(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(client::ModelInfo m, ModelOf(f));
  VQKV_ASSIGN_OR_RETURN(auto c, Connect(f));
  VQKV_ASSIGN_OR_RETURN(std::vector<std::string> hashes, HashesOf(f, m));
  client::GetOptions o;
  o.codes = f.Bool("codes");
  o.allow_missing = f.Bool("allow-missing");
  const absl::Time t0 = absl::Now();
  VQKV_ASSIGN_OR_RETURN(std::vector<client::BlockGot> got, c->Get(m.model_id, hashes, o));
  const double s = absl::ToDoubleSeconds(absl::Now() - t0);
  std::unique_ptr<std::ofstream> out;
  if (!f.Str("out").empty()) out = std::make_unique<std::ofstream>(f.Str("out"), std::ios::binary);
  VQKV_ASSIGN_OR_RETURN(int64_t seed, f.Int("seed"));
  int64_t bytes = 0, found = 0;
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const client::BlockGot& b = got[i];
    std::printf("%4zu %s %s %s %zu bytes\n", i, Hex(hashes[i]).c_str(),
                b.found ? TierName(b.tier) : "missing", b.codec.c_str(), b.data.size());
    if (!b.found) continue;
    ++found;
    bytes += static_cast<int64_t>(b.data.size());
    if (out) out->write(b.data.data(), static_cast<std::streamsize>(b.data.size()));
    if (f.Bool("verify") && !o.codes) {
      const std::string want = RandomBlock(m, seed * 1000003 + i);
      const int64_t n = static_cast<int64_t>(want.size() / DTypeSize(m.dtype));
      std::vector<float> a(n), x(n);
      ToFloat(m.dtype, want.data(), n, a.data());
      ToFloat(m.dtype, b.data.data(), n, x.data());
      for (int64_t k = 0; k < n; ++k) {
        err += double(a[k] - x[k]) * (a[k] - x[k]);
        norm += double(a[k]) * a[k];
      }
    }
  }
  std::printf("got %lld of %zu blocks, %s in %.3f s\n", static_cast<long long>(found), got.size(),
              Human(bytes).c_str(), s);
  if (f.Bool("verify") && !o.codes) {
    std::printf("relative error ||x - x'||^2 / ||x||^2 = %.3g%s\n", norm ? err / norm : 0.0,
                err == 0 ? " (bit-exact)" : "");
  }
  return absl::OkStatus();
}

absl::Status Lookup(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(client::ModelInfo m, ModelOf(f));
  VQKV_ASSIGN_OR_RETURN(auto c, Connect(f));
  VQKV_ASSIGN_OR_RETURN(std::vector<std::string> hashes, HashesOf(f, m));
  VQKV_ASSIGN_OR_RETURN(client::LookupResult r, c->Lookup(m.model_id, hashes));
  std::string tiers;
  for (v1::Tier t : r.tiers) absl::StrAppend(&tiers, tiers.empty() ? "" : ",", TierName(t));
  std::printf("%d of %zu leading blocks cached [%s]\n", r.prefix_blocks, hashes.size(),
              tiers.c_str());
  return absl::OkStatus();
}

absl::Status Stats(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(auto c, Connect(f));
  VQKV_ASSIGN_OR_RETURN(v1::GetStatsResponse s, c->Stats());
  std::printf("vqkvd %s, up %.0f s\n", s.version().c_str(), s.uptime_seconds());
  std::printf(
      "blocks %lld, stored %s, logical %s (%.1fx), hits %lld, misses %lld, "
      "evictions %lld, corrupt %lld\n",
      (long long)s.blocks(), Human(s.stored_bytes()).c_str(), Human(s.logical_bytes()).c_str(),
      s.stored_bytes() ? double(s.logical_bytes()) / s.stored_bytes() : 0.0, (long long)s.hits(),
      (long long)s.misses(), (long long)s.evictions(), (long long)s.corrupt_blocks());
  std::printf("in flight %s of %s, busy refusals %lld\n\n", Human(s.inflight_bytes()).c_str(),
              Human(s.max_inflight_bytes()).c_str(), (long long)s.busy_rejections());
  std::printf("%-5s %12s %12s %8s %8s %8s %9s %10s %9s\n", "tier", "capacity", "used", "blocks",
              "hits", "misses", "demotions", "promotions", "evictions");
  for (const v1::TierStats& t : s.tiers()) {
    std::printf("%-5s %12s %12s %8lld %8lld %8lld %9lld %10lld %9lld\n", TierName(t.tier()),
                Human(t.capacity_bytes()).c_str(), Human(t.used_bytes()).c_str(),
                (long long)t.blocks(), (long long)t.hits(), (long long)t.misses(),
                (long long)t.demotions(), (long long)t.promotions(), (long long)t.evictions());
  }
  if (s.models_size() > 0)
    std::printf("\n%-24s %-26s %8s %12s %12s\n", "model", "codec", "blocks", "stored", "logical");
  for (const v1::ModelStats& m : s.models()) {
    std::printf("%-24s %-26s %8lld %12s %12s\n", m.model_id().c_str(), m.codec().c_str(),
                (long long)m.blocks(), Human(m.stored_bytes()).c_str(),
                Human(m.logical_bytes()).c_str());
  }
  return absl::OkStatus();
}

struct Phase {
  std::vector<double> latencies;  // seconds per call
  double seconds = 0;
  int64_t bytes = 0;
  int64_t errors = 0;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

// `clients` threads, each with its own connection, run `calls` calls of `op`.
Phase RunPhase(const Flags& f, int clients, int calls, const std::string& label,
               const std::function<absl::Status(client::Client&, int, int)>& op,
               int64_t bytes_per_call) {
  Phase p;
  std::mutex mu;
  std::atomic<int64_t> done{0};
  ProgressBar bar(label, int64_t{clients} * calls);
  std::vector<std::thread> threads;
  const absl::Time t0 = absl::Now();
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([&, t] {
      auto c = Connect(f, /*own_conn=*/true);
      if (!c.ok()) {
        std::lock_guard<std::mutex> l(mu);
        p.errors += calls;
        done += calls;
        return;
      }
      for (int i = 0; i < calls; ++i) {
        const absl::Time s = absl::Now();
        absl::Status st = op(**c, t, i);
        const double lat = absl::ToDoubleSeconds(absl::Now() - s);
        std::lock_guard<std::mutex> l(mu);
        if (st.ok()) {
          p.latencies.push_back(lat);
          p.bytes += bytes_per_call;
        } else if (p.errors++ == 0) {
          std::fprintf(stderr, "\n%s: %s\n", label.c_str(), st.ToString().c_str());
        }
        ++done;
      }
    });
  }
  while (done < int64_t{clients} * calls) {
    bar.Update(done);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  for (auto& th : threads) th.join();
  p.seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  bar.Finish();
  return p;
}

absl::Status Bench(const Flags& f) {
  VQKV_ASSIGN_OR_RETURN(client::ModelInfo m, ModelOf(f));
  VQKV_ASSIGN_OR_RETURN(auto c, Connect(f));
  VQKV_RETURN_IF_ERROR(MaybeRegister(f, *c, m));
  VQKV_ASSIGN_OR_RETURN(int64_t calls, f.Int("calls"));
  std::vector<int> client_counts;
  for (absl::string_view s : absl::StrSplit(f.Str("clients"), ',')) {
    int n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < 1) return absl::InvalidArgumentError("--clients: 1,16");
    client_counts.push_back(n);
  }
  const std::string block = RandomBlock(m, 42);
  std::printf("%-4s %7s %6s %10s %10s %10s %6s   (%s blocks of %s, codec %s)\n", "op", "clients",
              "calls", "GB/s", "p50 ms", "p99 ms", "errors", m.model_id.c_str(),
              Human(m.BlockBytes()).c_str(), m.codec.c_str());
  for (int n : client_counts) {
    const std::string salt = absl::StrCat(absl::ToUnixNanos(absl::Now()), "-", n, "-");
    auto key = [&](int t, int i) { return absl::StrCat(salt, t, "-", i); };
    Phase put = RunPhase(
        f, n, static_cast<int>(calls), absl::StrCat("put x", n),
        [&](client::Client& cl, int t, int i) {
          client::BlockPut b{key(t, i), m.block_tokens, 0, block.data(), block.size()};
          return cl.Put(m, {&b, 1}).status();
        },
        m.BlockBytes());
    Phase get = RunPhase(
        f, n, static_cast<int>(calls), absl::StrCat("get x", n),
        [&](client::Client& cl, int t, int i) { return cl.Get(m.model_id, {key(t, i)}).status(); },
        m.BlockBytes());
    for (auto [name, p] : {std::pair<const char*, Phase*>{"put", &put}, {"get", &get}}) {
      std::printf("%-4s %7d %6zu %10.3f %10.2f %10.2f %6lld\n", name, n, p->latencies.size(),
                  p->bytes / p->seconds / 1e9, 1e3 * Percentile(p->latencies, 0.5),
                  1e3 * Percentile(p->latencies, 0.99), static_cast<long long>(p->errors));
    }
  }
  return absl::OkStatus();
}

int RunWith(int argc, char** argv, const char* name, const char* summary, bool geometry,
            std::vector<FlagSpec> more, absl::Status (*fn)(const Flags&)) {
  Flags f(name, summary, CommonFlags(std::move(more), geometry));
  if (int rc = ParseOrExit(f, argc, argv); rc >= 0) return rc;
  absl::Status st = fn(f);
  return st.ok() ? 0 : Fail(st);
}

const FlagSpec kSeed = {"seed", "1", "synthetic prompt: token ids and KV values"};
const FlagSpec kBlocks = {"blocks", "8", "blocks in the prompt"};
const FlagSpec kHashes = {"hashes", "", "comma-separated hex block hashes (instead of --seed)"};

}  // namespace

int RunPut(int argc, char** argv) {
  return RunWith(argc, argv, "put", "store the KV blocks of a synthetic prompt (or a file)", true,
                 {kSeed,
                  kBlocks,
                  {"file", "", "raw tensor file of whole blocks in the model dtype"},
                  {"print-hashes", "", "print each block hash (hex)", true}},
                 &Put);
}

int RunGet(int argc, char** argv) {
  return RunWith(argc, argv, "get", "read blocks back (reconstructed tensors or codes)", true,
                 {kSeed,
                  kBlocks,
                  kHashes,
                  {"out", "", "write the returned bytes here"},
                  {"codes", "", "return the stored codes instead of tensors", true},
                  {"allow-missing", "", "report missing blocks instead of failing", true},
                  {"verify", "", "compare with the KV `put --seed` stored (error)", true}},
                 &Get);
}

int RunLookup(int argc, char** argv) {
  return RunWith(argc, argv, "lookup", "how many leading blocks of a prompt are cached", true,
                 {kSeed, kBlocks, kHashes}, &Lookup);
}

int RunStats(int argc, char** argv) {
  return RunWith(argc, argv, "stats", "store, tier and model counters of vqkvd", false, {}, &Stats);
}

int RunBench(int argc, char** argv) {
  return RunWith(argc, argv, "bench",
                 "put/get throughput and latency: one block per call, each client on its own "
                 "connection",
                 true,
                 {{"clients", "1,16", "comma-separated client counts"},
                  {"calls", "16", "calls per client per phase"}},
                 &Bench);
}

}  // namespace vqkv::cli
