// Side-by-side put/get benchmark of one KV block per call: vqkvd (per codec) vs redis-server
// (hiredis SET/GET of the same bytes) vs a plain TCP socket server in this process that copies
// the same bytes into a hash map. Each client thread has its own connection. Prints a markdown
// table; bench/service/run.sh starts the daemons and records the figures.
//
// usage: vqkv_service_bench --vqkvd=HOST:PORT [--redis=HOST:PORT] [--tcp] [--codecs=raw,rvq]
//          [--block-tokens=256,16] [--clients=1,16] [--calls=2] [--rvq-stages=4x256,2x256]
#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/cpp/client.h"

namespace vqkv::bench {
namespace {

// One client's connection to a backend.
class Conn {
 public:
  virtual ~Conn() = default;
  virtual absl::Status Put(const std::string& key, const std::string& data) = 0;
  virtual absl::Status Get(const std::string& key, std::string* out) = 0;
  // Drops everything stored, to free memory between runs.
  virtual void Clear() {}
};

class VqkvdConn final : public Conn {
 public:
  VqkvdConn(std::unique_ptr<client::Client> c, client::ModelInfo m)
      : c_(std::move(c)), m_(std::move(m)) {}
  absl::Status Put(const std::string& key, const std::string& data) override {
    // first_token past the sinks: every token goes through the codec.
    client::BlockPut b{key, m_.block_tokens, 0, data.data(), data.size()};
    return c_->Put(m_, {&b, 1}).status();
  }
  absl::Status Get(const std::string& key, std::string* out) override {
    auto got = c_->Get(m_.model_id, {&key, 1});
    if (!got.ok()) return got.status();
    *out = std::move((*got)[0].data);
    return absl::OkStatus();
  }
  void Clear() override { c_->Delete(m_.model_id, {}, /*all=*/true).IgnoreError(); }

 private:
  std::unique_ptr<client::Client> c_;
  client::ModelInfo m_;
};

class RedisConn final : public Conn {
 public:
  explicit RedisConn(redisContext* c) : c_(c) {}
  ~RedisConn() override { redisFree(c_); }
  absl::Status Put(const std::string& key, const std::string& data) override {
    auto* r = static_cast<redisReply*>(
        redisCommand(c_, "SET %b %b", key.data(), key.size(), data.data(), data.size()));
    const bool ok = r != nullptr && r->type == REDIS_REPLY_STATUS;
    if (r) freeReplyObject(r);
    return ok ? absl::OkStatus() : absl::InternalError("redis SET failed");
  }
  absl::Status Get(const std::string& key, std::string* out) override {
    auto* r = static_cast<redisReply*>(redisCommand(c_, "GET %b", key.data(), key.size()));
    const bool ok = r != nullptr && r->type == REDIS_REPLY_STRING;
    if (ok) out->assign(r->str, r->len);
    if (r) freeReplyObject(r);
    return ok ? absl::OkStatus() : absl::InternalError("redis GET failed");
  }
  void Clear() override {
    if (auto* r = static_cast<redisReply*>(redisCommand(c_, "FLUSHALL"))) freeReplyObject(r);
  }

 private:
  redisContext* c_;
};

bool WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = write(fd, c, n);
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}
bool ReadAll(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = read(fd, c, n);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// The baseline: a length-prefixed PUT/GET protocol over loopback TCP into a locked hash map.
// Frame: op (1 byte: 'P' or 'G'), key length (u32), key, [data length (u64), data].
class TcpServer {
 public:
  TcpServer() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    listen(fd_, 64);
    socklen_t len = sizeof a;
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    std::thread([this] {
      while (true) {
        const int c = accept(fd_, nullptr, nullptr);
        if (c < 0) return;
        std::thread([this, c] { Serve(c); }).detach();
      }
    }).detach();
  }
  int port() const { return port_; }
  void Clear() {
    std::lock_guard<std::mutex> l(mu_);
    map_.clear();
  }

 private:
  void Serve(int c) {
    const int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    while (true) {
      char op;
      uint32_t klen;
      if (!ReadAll(c, &op, 1) || !ReadAll(c, &klen, 4)) break;
      std::string key(klen, '\0');
      if (!ReadAll(c, key.data(), klen)) break;
      if (op == 'P') {
        uint64_t n;
        if (!ReadAll(c, &n, 8)) break;
        std::string data(n, '\0');
        if (!ReadAll(c, data.data(), n)) break;
        {
          std::lock_guard<std::mutex> l(mu_);
          map_[key] = std::move(data);
        }
        if (!WriteAll(c, "k", 1)) break;
      } else {
        std::string data;
        {
          std::lock_guard<std::mutex> l(mu_);
          data = map_[key];
        }
        const uint64_t n = data.size();
        if (!WriteAll(c, &n, 8) || !WriteAll(c, data.data(), n)) break;
      }
    }
    close(c);
  }
  int fd_ = -1, port_ = 0;
  std::mutex mu_;
  std::unordered_map<std::string, std::string> map_;
};

class TcpConn final : public Conn {
 public:
  explicit TcpConn(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    const int one = 1;
    setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~TcpConn() override { close(fd_); }
  absl::Status Put(const std::string& key, const std::string& data) override {
    const uint32_t k = static_cast<uint32_t>(key.size());
    const uint64_t n = data.size();
    char ack;
    if (!WriteAll(fd_, "P", 1) || !WriteAll(fd_, &k, 4) || !WriteAll(fd_, key.data(), k) ||
        !WriteAll(fd_, &n, 8) || !WriteAll(fd_, data.data(), n) || !ReadAll(fd_, &ack, 1)) {
      return absl::InternalError("tcp put failed");
    }
    return absl::OkStatus();
  }
  absl::Status Get(const std::string& key, std::string* out) override {
    const uint32_t k = static_cast<uint32_t>(key.size());
    uint64_t n;
    if (!WriteAll(fd_, "G", 1) || !WriteAll(fd_, &k, 4) || !WriteAll(fd_, key.data(), k) ||
        !ReadAll(fd_, &n, 8)) {
      return absl::InternalError("tcp get failed");
    }
    out->resize(n);
    if (!ReadAll(fd_, out->data(), n)) return absl::InternalError("tcp get failed");
    return absl::OkStatus();
  }

 private:
  int fd_ = -1;
};

struct Result {
  double gbps = 0, p50_ms = 0, p99_ms = 0;
  int64_t errors = 0;
};

Result Summarise(std::vector<double> lat, double seconds, int64_t bytes, int64_t errors) {
  Result r;
  r.errors = errors;
  if (lat.empty()) return r;
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double p) {
    return lat[std::min(lat.size() - 1, size_t(p * (lat.size() - 1) + 0.5))];
  };
  r.gbps = bytes / seconds / 1e9;
  r.p50_ms = 1e3 * pct(0.5);
  r.p99_ms = 1e3 * pct(0.99);
  return r;
}

// Runs `clients` threads doing `calls` puts, then the same gets (checking the bytes for
// lossless backends).
std::pair<Result, Result> Run(const std::function<std::unique_ptr<Conn>()>& connect, int clients,
                              int calls, const std::string& block, bool lossless,
                              const std::string& salt) {
  std::vector<std::unique_ptr<Conn>> conns;
  for (int t = 0; t < clients; ++t) conns.push_back(connect());
  auto phase = [&](bool put) {
    std::mutex mu;
    std::vector<double> lat;
    std::atomic<int64_t> errors{0};
    std::vector<std::thread> th;
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < clients; ++t) {
      th.emplace_back([&, t] {
        std::string out;
        for (int i = 0; i < calls; ++i) {
          const std::string key = absl::StrCat(salt, t, "-", i);
          const auto s = std::chrono::steady_clock::now();
          absl::Status st = put ? conns[t]->Put(key, block) : conns[t]->Get(key, &out);
          const double d =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
          if (st.ok() && !put && (lossless ? out != block : out.size() != block.size())) {
            st = absl::DataLossError("wrong bytes");
          }
          if (!st.ok()) {
            if (errors++ == 0) std::fprintf(stderr, "%s\n", st.ToString().c_str());
            continue;
          }
          std::lock_guard<std::mutex> l(mu);
          lat.push_back(d);
        }
      });
    }
    for (auto& x : th) x.join();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return Summarise(lat, secs, static_cast<int64_t>(lat.size()) * block.size(), errors);
  };
  Result p = phase(true);
  Result g = phase(false);
  return {p, g};
}

std::string RandomF16Block(const client::ModelInfo& m) {
  const int64_t n = m.BlockBytes() / 2;
  std::mt19937 rng(42);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> x(n);
  for (float& v : x) v = nd(rng);
  std::string out(m.BlockBytes(), '\0');
  FromFloat(x.data(), n, DType::kF16, out.data());
  return out;
}

std::map<std::string, std::string> ParseFlags(int argc, char** argv) {
  std::map<std::string, std::string> f = {
      {"codecs", "raw"}, {"block-tokens", "256,16"},    {"clients", "1,16"},
      {"calls", "2"},    {"rvq-stages", "4x256,2x256"}, {"tcp", "false"}};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) continue;
    const size_t eq = a.find('=');
    if (eq == std::string::npos) {
      f[a.substr(2)] = "true";
    } else {
      f[a.substr(2, eq - 2)] = a.substr(eq + 1);
    }
  }
  return f;
}

std::vector<int> Ints(const std::string& s) {
  std::vector<int> v;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    int x;
    if (absl::SimpleAtoi(p, &x)) v.push_back(x);
  }
  return v;
}

int Main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // rows appear as they are measured
  auto flags = ParseFlags(argc, argv);
  const int calls = Ints(flags["calls"]).at(0);
  std::printf(
      "| backend | block | clients | put GB/s | put p50 / p99 ms | get GB/s | "
      "get p50 / p99 ms | errors |\n|---|---|---|---|---|---|---|---|\n");
  std::unique_ptr<TcpServer> tcp;
  if (flags["tcp"] == "true") tcp = std::make_unique<TcpServer>();
  for (int tokens : Ints(flags["block-tokens"])) {
    client::ModelInfo m;
    m.layers = 32;  // LLaMA-3.1-8B geometry
    m.kv_heads = 8;
    m.head_dim = 128;
    m.block_tokens = tokens;
    const std::string block = RandomF16Block(m);
    const std::string size = absl::StrCat(tokens, " tok (", m.BlockBytes() >> 20, " MiB)");
    struct Backend {
      std::string name;
      std::function<std::unique_ptr<Conn>()> connect;
      bool lossless;
    };
    std::vector<Backend> backends;
    if (!flags["vqkvd"].empty()) {
      for (absl::string_view codec_sv : absl::StrSplit(flags["codecs"], ',')) {
        const std::string codec(codec_sv);
        client::ModelInfo mm = m;
        mm.model_id = absl::StrCat("bench-", codec, "-", tokens);
        mm.codec = codec;
        client::ClientOptions o;
        o.target = flags["vqkvd"];
        o.timeout = absl::Seconds(600);
        auto admin = client::Client::Connect(o);
        if (!admin.ok() || !(*admin)->RegisterModel(mm).ok()) {
          std::fprintf(stderr, "cannot register %s\n", mm.model_id.c_str());
          return 1;
        }
        if (codec.rfind("rvq", 0) == 0) {
          std::vector<std::string> st = absl::StrSplit(flags["rvq-stages"], ',');
          client::FitParams fp;
          fp.model_id = mm.model_id;
          fp.k_stages = st.at(0);
          fp.v_stages = st.at(1);
          fp.iterations = 4;
          client::SampleView sv{tokens, DType::kF16, block.data(), block.size()};
          auto fit = (*admin)->FitCodebook(fp, {&sv, 1}, nullptr);
          if (!fit.ok()) {
            std::fprintf(stderr, "fit: %s\n", fit.status().ToString().c_str());
            return 1;
          }
        }
        backends.push_back({absl::StrCat("vqkvd ", codec),
                            [o, mm] {
                              client::ClientOptions oo = o;
                              oo.separate_connection = true;
                              return std::make_unique<VqkvdConn>(*client::Client::Connect(oo), mm);
                            },
                            codec == "raw"});
      }
    }
    if (!flags["redis"].empty()) {
      const std::vector<std::string> hp = absl::StrSplit(flags["redis"], ':');
      const int port = Ints(hp.at(1)).at(0);
      backends.push_back({"redis-server",
                          [hp, port]() -> std::unique_ptr<Conn> {
                            return std::make_unique<RedisConn>(redisConnect(hp[0].c_str(), port));
                          },
                          true});
    }
    if (tcp != nullptr) {
      const int port = tcp->port();
      backends.push_back({"plain TCP", [port] { return std::make_unique<TcpConn>(port); }, true});
    }
    for (const Backend& b : backends) {
      for (int clients : Ints(flags["clients"])) {
        const std::string salt = absl::StrCat(b.name, "-", tokens, "-", clients, "-");
        auto [put, get] = Run(b.connect, clients, calls, block, b.lossless, salt);
        std::printf("| %s | %s | %d | %.3f | %.1f / %.1f | %.3f | %.1f / %.1f | %lld |\n",
                    b.name.c_str(), size.c_str(), clients, put.gbps, put.p50_ms, put.p99_ms,
                    get.gbps, get.p50_ms, get.p99_ms,
                    static_cast<long long>(put.errors + get.errors));
        std::fflush(stdout);
        b.connect()->Clear();  // free the memory before the next run
        if (tcp) tcp->Clear();
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace vqkv::bench

int main(int argc, char** argv) { return vqkv::bench::Main(argc, argv); }
