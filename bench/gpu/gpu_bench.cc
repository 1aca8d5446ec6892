// gpu_bench: speed of the GPU codec at LLaMA-3.1-8B geometry (32 layers, 8 KV heads, head_dim
// 128, keys 56x1024, values 16x512), each figure next to its floor from ceilings measured in the
// same run (device copy bandwidth, L2 read bandwidth, cuBLAS bf16/fp16 matrix rate).
//
//   gpu_bench [--tokens=16384] [--decode_tokens=65536] [--scalar_tokens=65536]
//             [--fit_tokens=65536] [--reps=10] [--block=64] [--skip=ceilings,encode,...]
//             [--variant=0]   (encode tile configuration of the main encode rows, rvq_kernels.h)
//             [--compare=10,14 [--rounds=7]]
// --skip also takes "variants" (the encode tile-variant rows) and "exact" (the fp32 kernel row).
// --compare: encode variants side by side at --tokens, interleaved: each round times every
// listed variant (median of 3 calls), in alternating order; reports the median round per variant.
//
// Timing: CUDA events around each call (host-side descriptor building included), warm-up
// first, median of --reps. Data are random (approximately normal with per-channel offsets),
// never zeros; codebooks are random with the magnitudes of fitted ones.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/gpu/bench_kernels.h"
#include "kernels/codebook.h"
#include "kernels/cuda/device_codebook.h"
#include "kernels/cuda/gpu_fit.h"
#include "kernels/cuda/gpu_rvq.h"
#include "kernels/cuda/gpu_scalar.h"

namespace vqkv::bench {
namespace {

using kernels::Codebook;
using kernels::KvShape;
using kernels::RvqConfig;
using kernels::StageConfig;
namespace kc = kernels::cuda;

#define CK(expr)                                                                                 \
  do {                                                                                           \
    const cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)
#define CKS(expr)                                                       \
  do {                                                                  \
    const absl::Status s_ = (expr);                                     \
    if (!s_.ok()) {                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, \
                   std::string(s_.message()).c_str());                  \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

template <typename T>
cudaError_t DMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}

struct Flags {
  int64_t tokens = 16384, decode_tokens = 65536, scalar_tokens = 65536, fit_tokens = 65536;
  int reps = 10, block = 64;
  int variant = 0;           // encode tile configuration of the main encode rows (0: the default)
  std::vector<int> compare;  // encode variants timed side by side (--compare)
  int rounds = 7;
  std::string skip;
  bool Skip(const char* what) const { return skip.find(what) != std::string::npos; }
};

Flags ParseFlags(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](const char* name) -> const char* {
      const std::string p = std::string("--") + name + "=";
      return a.rfind(p, 0) == 0 ? argv[i] + p.size() : nullptr;
    };
    if (const char* v = val("tokens"))
      f.tokens = std::atoll(v);
    else if (const char* v = val("decode_tokens"))
      f.decode_tokens = std::atoll(v);
    else if (const char* v = val("scalar_tokens"))
      f.scalar_tokens = std::atoll(v);
    else if (const char* v = val("fit_tokens"))
      f.fit_tokens = std::atoll(v);
    else if (const char* v = val("reps"))
      f.reps = std::atoi(v);
    else if (const char* v = val("block"))
      f.block = std::atoi(v);
    else if (const char* v = val("variant"))
      f.variant = std::atoi(v);
    else if (const char* v = val("skip"))
      f.skip = v;
    else if (const char* v = val("rounds"))
      f.rounds = std::max(1, std::atoi(v));
    else if (const char* v = val("compare")) {
      for (const char* q = v; *q != 0;) {
        f.compare.push_back(std::atoi(q));
        while (*q != 0 && *q != ',') ++q;
        if (*q == ',') ++q;
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      std::exit(2);
    }
  }
  return f;
}

// Median of `reps` timed calls after one warm-up, in milliseconds.
double TimeMs(const std::function<void()>& fn, int reps, cudaStream_t s) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  fn();
  CK(cudaStreamSynchronize(s));
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a, s));
    fn();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Row {
  std::string what, value, floor, note;
};
std::vector<Row> g_rows;
void Report(const std::string& what, const std::string& value, const std::string& floor,
            const std::string& note) {
  g_rows.push_back({what, value, floor, note});
  std::printf("RESULT | %s | %s | %s | %s\n", what.c_str(), value.c_str(), floor.c_str(),
              note.c_str());
  std::fflush(stdout);
}
std::string Fmt(const char* f, double v) {
  char buf[128];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// Fast host RNG for large random tables (xorshift; sum of 4 uniforms ~ normal).
struct FastRng {
  uint64_t s;
  explicit FastRng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ULL + 1) {}
  uint32_t Next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<uint32_t>(s >> 32);
  }
  float Normalish() {
    float a = 0;
    for (int k = 0; k < 4; ++k) a += float(Next()) * 2.3283064e-10f;
    return (a - 2.f) * 1.7320508f;
  }
};

std::shared_ptr<const Codebook> LlamaCodebook(const RvqConfig& cfg) {
  std::vector<std::vector<float>> tables(size_t(cfg.layers) * 2);
  std::vector<std::thread> th;
  for (int t = 0; t < cfg.layers * 2; ++t) {
    th.emplace_back([&, t] {
      const StageConfig& s = cfg.at(t / 2, t % 2);
      FastRng rng(1000 + t);
      auto& v = tables[t];
      v.resize(size_t(s.stages) * s.size * cfg.head_dim);
      for (int st = 0; st < s.stages; ++st) {
        const float scale = 1.6f * std::pow(0.9f, float(st));
        for (size_t i = 0; i < size_t(s.size) * cfg.head_dim; ++i) {
          v[size_t(st) * s.size * cfg.head_dim + i] = scale * rng.Normalish();
        }
      }
    });
    if (th.size() == 16) {
      for (auto& x : th) x.join();
      th.clear();
    }
  }
  for (auto& x : th) x.join();
  auto cb = Codebook::Create(cfg, std::move(tables));
  CKS(cb.status());
  return std::make_shared<Codebook>(*std::move(cb));
}

void Ceilings(const Flags& f, cudaStream_t s, double* copy_tbs, double* l2_tbs, double* mma_tf) {
  // Device-to-device copy, bytes read + written.
  const size_t bytes = size_t(2) << 30;
  void *a, *b;
  CK(DMalloc(&a, bytes));
  CK(DMalloc(&b, bytes));
  CK(FillRandomKv(a, int64_t(bytes / 2), 128, 1, s));
  const double ms =
      TimeMs([&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s)); }, f.reps, s);
  *copy_tbs = 2.0 * bytes / (ms * 1e-3) / 1e12;
  Report("ceiling: device copy (read+write)", Fmt("%.2f TB/s", *copy_tbs), "-",
         "2 GiB cudaMemcpyAsync D2D");
  // L2: 24 MiB read 20 times.
  uint32_t* sink;
  CK(DMalloc(&sink, 4));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t l2b = int64_t(24) << 20;
  const double l2ms = TimeMs([&] { CK(L2Read(a, l2b, 20, sink, sms * 4, s)); }, f.reps, s);
  *l2_tbs = 20.0 * l2b / (l2ms * 1e-3) / 1e12;
  Report("ceiling: L2 read (24 MiB x20)", Fmt("%.2f TB/s", *l2_tbs), "-", "16-byte ld.cg loads");
  // cuBLAS 8192^3 bf16 and fp16, fp32 accumulation, random data.
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cublasCreate failed\n");
    std::exit(1);
  }
  cublasSetStream(h, s);
  const int n = 8192;
  void *A, *B, *C;
  CK(DMalloc(&A, size_t(n) * n * 2));
  CK(DMalloc(&B, size_t(n) * n * 2));
  CK(DMalloc(&C, size_t(n) * n * 4));
  CK(FillRandomKv(A, int64_t(n) * n, 128, 2, s));
  CK(FillRandomKv(B, int64_t(n) * n, 128, 3, s));
  for (int bf = 0; bf < 2; ++bf) {
    const cudaDataType t = bf ? CUDA_R_16BF : CUDA_R_16F;  // bf16 reads the fp16 bits: still random
    const float alpha = 1.f, beta = 0.f;
    const double gms = TimeMs(
        [&] {
          const cublasStatus_t st =
              cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, A, t, n, B, t, n, &beta, C,
                           CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          if (st != CUBLAS_STATUS_SUCCESS) std::exit(1);
        },
        f.reps, s);
    const double tf = 2.0 * n * n * double(n) / (gms * 1e-3) / 1e12;
    if (bf) *mma_tf = tf;
    Report(bf ? "ceiling: cuBLAS bf16 GEMM 8192^3" : "ceiling: cuBLAS fp16 GEMM 8192^3",
           Fmt("%.0f TFLOP/s", tf), "-", "fp32 accumulation, random data");
  }
  cublasDestroy(h);
  CK(cudaFree(A));
  CK(cudaFree(B));
  CK(cudaFree(C));
  CK(cudaFree(a));
  CK(cudaFree(b));
  CK(cudaFree(sink));
}

struct Batch {
  std::vector<kc::DeviceKvBlock> blocks;
  void* data = nullptr;
  int64_t tokens = 0;
};

Batch MakeBatch(const RvqConfig& cfg, int64_t tokens, int block, cudaStream_t s) {
  Batch b;
  b.tokens = tokens;
  const int64_t per_token = int64_t(cfg.layers) * 2 * cfg.kv_heads * cfg.head_dim;
  CK(DMalloc(&b.data, size_t(tokens) * per_token * 2));
  CK(FillRandomKv(b.data, tokens * per_token, cfg.head_dim, 42, s));
  for (int64_t t = 0; t < tokens; t += block) {
    const int n = int(std::min<int64_t>(block, tokens - t));
    kc::DeviceKvBlock blk;
    blk.shape = KvShape{cfg.layers, n, cfg.kv_heads, cfg.head_dim};
    blk.dtype = DType::kF16;
    blk.data = static_cast<char*>(b.data) + size_t(t) * per_token * 2;
    blk.sinks = 0;
    b.blocks.push_back(blk);
  }
  return b;
}

double FlopsPerToken(const RvqConfig& cfg) {
  double f = 0;
  for (int l = 0; l < cfg.layers; ++l) {
    f += 2.0 * cfg.head_dim * cfg.kv_heads *
         (double(cfg.k[l].stages) * cfg.k[l].size + double(cfg.v[l].stages) * cfg.v[l].size);
  }
  return f;
}

void EncodeBench(const Flags& f, const kc::DeviceCodebook& dcb, double mma_tf, cudaStream_t s) {
  const RvqConfig& cfg = dcb.config();
  const double fpt = FlopsPerToken(cfg);
  for (int64_t tokens : {int64_t(1024), f.tokens / 4, f.tokens}) {
    if (tokens <= 0) continue;
    Batch b = MakeBatch(cfg, tokens, f.block, s);
    const int64_t ncodes = tokens * kc::RvqCodesPerToken(cfg, 0, cfg.layers);
    uint16_t* codes;
    CK(DMalloc(&codes, size_t(ncodes) * 2));
    kc::GpuRvqOptions o;
    o.check_finite = false;
    o.encode_variant = f.variant;
    const double ms = TimeMs([&] { CKS(kc::RvqEncodeCodes(dcb, b.blocks, codes, s, o)); },
                             tokens >= 8192 ? std::max(3, f.reps / 3) : f.reps, s);
    const double tps = tokens / (ms * 1e-3);
    const double tf = tps * fpt / 1e12;
    Report(Fmt("rvq encode, fused TC kernel, %.0f tokens", double(tokens)),
           Fmt("%.0f tok/s", tps) + Fmt(" (%.0f TFLOP/s)", tf),
           Fmt("%.0f tok/s", mma_tf * 1e12 / fpt),
           Fmt("%.2f GFLOP/token; floor = FLOPs / cuBLAS bf16 rate; ", fpt / 1e9) +
               Fmt("%.0f%% of it", 100 * tf / mma_tf));
    if (tokens == f.tokens) {
      // Pack into bodies.
      std::vector<uint8_t*> bodies;
      size_t total = 0;
      std::vector<size_t> off;
      for (const auto& blk : b.blocks) {
        off.push_back(total);
        total += (size_t(kc::RvqBodyBytes(cfg, blk.shape, 0, 0)) + 255) & ~size_t{255};
      }
      uint8_t* body;
      CK(DMalloc(&body, total));
      for (size_t i = 0; i < off.size(); ++i) bodies.push_back(body + off[i]);
      const double pms =
          TimeMs([&] { CKS(kc::RvqPackCodes(dcb, b.blocks, codes, bodies, s)); }, f.reps, s);
      Report("rvq pack (bit stream) after encode",
             Fmt("%.3f ms", pms) + Fmt(" for %.0f tokens", double(tokens)), "-",
             Fmt("%.2f%% of encode time", 100 * pms / ms));
      CK(cudaFree(body));
    }
    if (tokens == f.tokens / 4 && !f.Skip("variants")) {
      static const char* const kVariantInfo[] = {
          "",
          "mma.sync, 128-row tiles, 2 CTAs/SM, 2 n-tiles in flight, top-2 per lane",
          "mma.sync, 256-row tiles, 1 CTA/SM, top-2 per lane",
          "mma.sync, 256-row tiles, 1 CTA/SM, top-1 per lane",
          "mma.sync default tiles (128 rows, 2 CTAs/SM, top-1 per lane)",
          "wgmma sm_90a, 128-row tiles, 2 CTAs/SM",
          "wgmma sm_90a, 256-row tiles, 1 CTA/SM",
          "wgmma sm_90a, 128-row tiles, 2 CTAs/SM, split pipelined chunks",
          "wgmma sm_90a, 128-row tiles, 2 CTAs/SM, MMA of the next chunk during the epilogue",
          "wgmma sm_90a, 256-row tiles, 1 CTA/SM, MMA of the next chunk during the epilogue",
          "as 8 with TMA chunk loads",
          "as 9 with TMA chunk loads",
          "ping-pong: 2 warpgroups + TMA producer warp, 128-row tiles, 10-chunk ring",
          "ping-pong: 3 warpgroups + TMA producer warp, 192-row tiles, 8-chunk ring",
          "as 13 with the score offsets loaded one chunk step early",
          "as 13, rescore skipped where the tensor-core scores decide",
          "as 14, rescore skipped where the tensor-core scores decide"};
      for (int variant = 1; variant <= 16; ++variant) {
        const int rv = kc::RvqEncodeResolvedVariant(cfg.head_dim, variant);
        if (rv != variant) continue;  // not available here (e.g. no sm_90a)
        kc::GpuRvqOptions ov = o;
        ov.encode_variant = variant;
        const double vms =
            TimeMs([&] { CKS(kc::RvqEncodeCodes(dcb, b.blocks, codes, s, ov)); }, f.reps, s);
        Report(Fmt("rvq encode, fused TC kernel variant %.0f, ", double(variant)) +
                   Fmt("%.0f tokens", double(tokens)),
               Fmt("%.0f tok/s", tokens / (vms * 1e-3)) +
                   Fmt(" (%.0f TFLOP/s)", tokens / (vms * 1e-3) * fpt / 1e12),
               "-",
               std::string(kVariantInfo[variant]) +
                   Fmt("; %.0f CTAs/SM", double(kc::RvqEncodeBlocksPerSm(cfg.head_dim, variant))) +
                   (kc::RvqEncodeResolvedVariant(cfg.head_dim, 0) == variant ? " (default)" : ""));
      }
    }
    if (tokens == 1024 && !f.Skip("exact")) {
      kc::GpuRvqOptions ex = o;
      ex.tensor_cores = false;
      const double ems =
          TimeMs([&] { CKS(kc::RvqEncodeCodes(dcb, b.blocks, codes, s, ex)); }, 1, s);
      Report("rvq encode, exact fp32 kernel (reference), 1024 tokens",
             Fmt("%.0f tok/s", tokens / (ems * 1e-3)) +
                 Fmt(" (%.1f TFLOP/s)", tokens / (ems * 1e-3) * fpt / 1e12),
             "-", "SIMT fp32 full search; the fallback for odd head dims");
    }
    CK(cudaFree(codes));
    CK(cudaFree(b.data));
  }
}

// The same greedy encode as cuBLAS GEMM per stage + a separate argmin/update kernel, on one
// layer's K table; extrapolated to the model (32 layers, V at (16*512)/(56*1024) of K's cost).
void CublasVariantBench(const Flags& f, const Codebook& cb, cudaStream_t s) {
  const RvqConfig& cfg = cb.config();
  const int D = cfg.head_dim, size = cfg.k[0].size, stages = cfg.k[0].stages;
  const int64_t tokens = std::min<int64_t>(f.tokens, 8192);
  const int64_t n = tokens * cfg.kv_heads;
  float *r, *scores, *cb32, *norms;
  void *r16, *c16, *x16;
  uint16_t* codes;
  CK(DMalloc(&r, size_t(n) * D * 4));
  CK(DMalloc(&r16, size_t(n) * D * 2));
  CK(DMalloc(&x16, size_t(n) * D * 2));
  CK(DMalloc(&scores, size_t(n) * size * 4));
  CK(DMalloc(&cb32, size_t(stages) * size * D * 4));
  CK(DMalloc(&c16, size_t(stages) * size * D * 2));
  CK(DMalloc(&norms, size_t(stages) * size * 4));
  CK(DMalloc(&codes, size_t(n) * stages * 2));
  CK(cudaMemcpy(cb32, cb.Table(0, 0, 0, 0), size_t(stages) * size * D * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(norms, cb.Norms(0, 0, 0, 0), size_t(stages) * size * 4, cudaMemcpyHostToDevice));
  CK(FloatToHalf(cb32, c16, int64_t(stages) * size * D, s));
  CK(FillRandomKv(x16, n * D, D, 5, s));
  cublasHandle_t h;
  cublasCreate(&h);
  cublasSetStream(h, s);
  const float alpha = 1.f, beta = 0.f;
  const double ms = TimeMs(
      [&] {
        CK(HalfToFloat(x16, r, n * D, s));
        CK(cudaMemcpyAsync(r16, x16, size_t(n) * D * 2, cudaMemcpyDeviceToDevice, s));
        for (int st = 0; st < stages; ++st) {
          const cublasStatus_t e = cublasGemmEx(
              h, CUBLAS_OP_T, CUBLAS_OP_N, size, int(n), D, &alpha,
              static_cast<char*>(c16) + size_t(st) * size * D * 2, CUDA_R_16F, D, r16, CUDA_R_16F,
              D, &beta, scores, CUDA_R_32F, size, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          if (e != CUBLAS_STATUS_SUCCESS) std::exit(1);
          CK(ArgminUpdate(scores, norms + size_t(st) * size, cb32 + size_t(st) * size * D, r, r16,
                          codes, n, size, D, st, stages, s));
        }
      },
      std::max(3, f.reps / 3), s);
  const double per_token_k = ms * 1e-3 / tokens;  // one layer's K
  const double model = per_token_k * cfg.layers * (1.0 + (16.0 * 512) / (56.0 * 1024));
  Report("rvq encode, cuBLAS GEMM + argmin kernel (1 K table, extrapolated)",
         Fmt("%.0f tok/s", 1.0 / model), "-",
         Fmt("one layer's K (%.0f x ", double(stages)) + Fmt("%.0f) measured: ", double(size)) +
             Fmt("%.2f ms per 1k tokens; scores round-trip HBM", ms / tokens * 1000));
  cublasDestroy(h);
  for (void* p :
       {(void*)r, r16, x16, (void*)scores, (void*)cb32, c16, (void*)norms, (void*)codes}) {
    CK(cudaFree(p));
  }
}

void DecodeBench(const Flags& f, const kc::DeviceCodebook& dcb, double copy_tbs, double l2_tbs,
                 cudaStream_t s) {
  const RvqConfig& cfg = dcb.config();
  const int64_t tokens = f.decode_tokens;
  const int page = f.block;
  Batch b = MakeBatch(cfg, tokens, page, s);
  // Bodies from a real encode.
  std::vector<uint8_t*> bodies;
  std::vector<size_t> off;
  size_t total = 0;
  for (const auto& blk : b.blocks) {
    off.push_back(total);
    total += (size_t(kc::RvqBodyBytes(cfg, blk.shape, 0, 0)) + 255) & ~size_t{255};
  }
  uint8_t* body;
  CK(DMalloc(&body, total));
  for (size_t i = 0; i < off.size(); ++i) bodies.push_back(body + off[i]);
  kc::GpuRvqOptions eo;
  eo.check_finite = false;
  CKS(kc::RvqEncode(dcb, b.blocks, bodies, s, eo));
  CK(cudaStreamSynchronize(s));
  CK(cudaFree(b.data));
  b.data = nullptr;

  const int64_t pages = int64_t(b.blocks.size());
  const size_t per_layer = size_t(2) * pages * page * cfg.kv_heads * cfg.head_dim * 2;
  void* kv;
  CK(DMalloc(&kv, per_layer * cfg.layers));
  kc::KvLayout vllm;
  vllm.kind = kc::KvLayoutKind::kVllm;
  vllm.dtype = DType::kF16;
  for (int l = 0; l < cfg.layers; ++l)
    vllm.layer_ptrs.push_back(static_cast<char*>(kv) + per_layer * l);
  vllm.num_pages = int(pages);
  vllm.page_tokens = page;
  std::vector<kc::DeviceRvqBody> in(b.blocks.size());
  for (size_t i = 0; i < in.size(); ++i) {
    in[i].shape = b.blocks[i].shape;
    in[i].body = bodies[i];
    in[i].block_id = int(pages - 1 - int64_t(i));  // reversed pages: not a plain copy order
  }
  const double out_bytes = double(tokens) * cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * 2;
  const double code_bytes = double(tokens) * cfg.CodeBitsPerToken() / 8;
  double gathers = 0;  // codeword rows gathered per token
  for (int l = 0; l < cfg.layers; ++l)
    gathers += double(cfg.kv_heads) * (cfg.k[l].stages + cfg.v[l].stages);
  for (bool f16 : {true, false}) {
    kc::GpuRvqOptions o;
    o.fp16_decode_tables = f16;
    const double ms = TimeMs([&] { CKS(kc::RvqDecode(dcb, in, vllm, s, o)); }, f.reps, s);
    const double tps = tokens / (ms * 1e-3);
    const double gather_bytes = gathers * cfg.head_dim * (f16 ? 2 : 4);
    const double floor_hbm = copy_tbs * 1e12 / (out_bytes / tokens + code_bytes / tokens);
    const double floor_l2 = l2_tbs * 1e12 / gather_bytes;
    Report(std::string("rvq decode -> vLLM pages fp16, ") + (f16 ? "fp16" : "fp32") + " tables",
           Fmt("%.0f tok/s", tps) +
               Fmt(" (%.0f GB/s fp16 KV written)", tps * out_bytes / tokens / 1e9),
           Fmt("%.0f tok/s", std::min(floor_hbm, floor_l2)),
           Fmt("floors: HBM bytes %.2fM tok/s, ", floor_hbm / 1e6) +
               Fmt("L2 gathers (%.1f MB/token) ", gather_bytes / 1e6) +
               Fmt("%.2fM tok/s", floor_l2 / 1e6));
  }
  // Contiguous output for comparison.
  {
    void* out;
    CK(DMalloc(&out, size_t(out_bytes)));
    size_t at = 0;
    for (auto& x : in) {
      x.out = static_cast<char*>(out) + at;
      at += size_t(x.shape.elements()) * 2;
    }
    kc::KvLayout cont;
    cont.dtype = DType::kF16;
    const double ms = TimeMs([&] { CKS(kc::RvqDecode(dcb, in, cont, s)); }, f.reps, s);
    Report("rvq decode -> contiguous fp16, f16 tables", Fmt("%.0f tok/s", tokens / (ms * 1e-3)),
           "-", "same work, block-major output");
    CK(cudaFree(out));
  }
  CK(cudaFree(kv));
  CK(cudaFree(body));
}

// Scalar (KIVI-style) codec over --scalar_tokens tokens in --block-token blocks, fp16 KV, 2 and
// 4 bits, group 32. GB/s counts every byte read and written once (fp16 KV + packed body).
void ScalarBench(const Flags& f, double copy_tbs, cudaStream_t s) {
  const RvqConfig cfg = RvqConfig::Uniform(32, 8, 128, {1, 2}, {1, 2});
  const int64_t tokens = f.scalar_tokens;
  Batch b = MakeBatch(cfg, tokens, f.block, s);
  const double in_bytes = double(tokens) * cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * 2;
  void* out;
  CK(DMalloc(&out, size_t(in_bytes)));
  for (int bits : {2, 4}) {
    const kc::ScalarSpec ss{bits, 32};
    std::vector<kc::DeviceScalarBlock> blocks;
    size_t total = 0;
    std::vector<size_t> off;
    for (const auto& blk : b.blocks) {
      off.push_back(total);
      total += (size_t(kc::ScalarBodyBytes(blk.shape, 0, ss)) + 255) & ~size_t{255};
    }
    uint8_t* body;
    CK(DMalloc(&body, total));
    size_t at = 0;
    double body_bytes = 0;
    for (size_t i = 0; i < b.blocks.size(); ++i) {
      kc::DeviceScalarBlock d;
      d.shape = b.blocks[i].shape;
      d.in = b.blocks[i].data;
      d.out = static_cast<char*>(out) + at;
      at += size_t(d.shape.elements()) * 2;
      d.body = body + off[i];
      body_bytes += double(kc::ScalarBodyBytes(d.shape, 0, ss));
      blocks.push_back(d);
    }
    const double qms =
        TimeMs([&] { CKS(kc::ScalarQuantize(blocks, DType::kF16, ss, s, false)); }, f.reps, s);
    const double dms =
        TimeMs([&] { CKS(kc::ScalarDequantize(blocks, DType::kF16, ss, s)); }, f.reps, s);
    const double moved = in_bytes + body_bytes;
    const std::string label = Fmt("scalar-%.0f/g32", bits) + Fmt(", %.0f-token blocks", f.block);
    for (int dq = 0; dq < 2; ++dq) {
      const double ms = dq ? dms : qms;
      Report(label + (dq ? " dequantize (fp16 out)" : " quantize (fp16 in)"),
             Fmt("%.0f GB/s", moved / (ms * 1e-3) / 1e9), Fmt("%.0f GB/s copy", copy_tbs * 1e3),
             Fmt("%.0f%% of copy; ", 100 * moved / (ms * 1e-3) / (copy_tbs * 1e12)) +
                 Fmt("%.2f ms, ", ms) + Fmt("%.0f tok/s; ", tokens / (ms * 1e-3)) +
                 Fmt("%.2f GB read+written", moved / 1e9));
    }
    CK(cudaFree(body));
  }
  CK(cudaFree(out));
  CK(cudaFree(b.data));
}

void FitBench(const Flags& f, const RvqConfig& cfg) {
  const int64_t tokens = f.fit_tokens;
  kernels::KvSamples smp;
  smp.layers = cfg.layers;
  smp.kv_heads = cfg.kv_heads;
  smp.head_dim = cfg.head_dim;
  smp.k.resize(cfg.layers);
  smp.v.resize(cfg.layers);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> th;
  for (int t = 0; t < cfg.layers * 2; ++t) {
    th.emplace_back([&, t] {
      auto& v = t % 2 == 0 ? smp.k[t / 2] : smp.v[t / 2];
      v.resize(size_t(tokens) * cfg.kv_heads * cfg.head_dim);
      FastRng rng(77 + t);
      std::vector<float> off(cfg.head_dim);
      for (auto& o : off) o = 2 * rng.Normalish();
      for (size_t i = 0; i < v.size(); ++i) v[i] = rng.Normalish() + off[i % cfg.head_dim];
    });
    if (th.size() == 16) {
      for (auto& x : th) x.join();
      th.clear();
    }
  }
  for (auto& x : th) x.join();
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  kernels::FitOptions fo;  // defaults: 10 iterations, k-means++, max 2^17 vectors per table
  for (int64_t init : {int64_t(16)}) {
    kc::GpuFitOptions go;
    go.init_points_per_centroid = init;
    const auto t1 = std::chrono::steady_clock::now();
    auto cb = kc::FitCodebookGpu(cfg, smp, fo, go);
    CKS(cb.status());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    Report(
        Fmt("fit all codebooks, %.0fk-token sample", tokens / 1024.0), Fmt("%.1f s", s), "-",
        Fmt("10 Lloyd its, 2^17 vectors/table, k-means++ over %.0f pts/centroid; ", double(init)) +
            Fmt("sample generation %.1f s not counted", gen_s));
  }
}

// Encode variants side by side at f.tokens in one process: round after round, each variant timed
// (median of 3 calls), the order reversed every other round so that clock drift during the run
// falls on all of them alike.
void CompareBench(const Flags& f, const kc::DeviceCodebook& dcb, cudaStream_t s) {
  const RvqConfig& cfg = dcb.config();
  const double fpt = FlopsPerToken(cfg);
  Batch b = MakeBatch(cfg, f.tokens, f.block, s);
  const int64_t ncodes = f.tokens * kc::RvqCodesPerToken(cfg, 0, cfg.layers);
  uint16_t* codes;
  CK(DMalloc(&codes, size_t(ncodes) * 2));
  const size_t n = f.compare.size();
  std::vector<std::vector<double>> ms(n);
  for (int r = 0; r < f.rounds; ++r) {
    for (size_t j = 0; j < n; ++j) {
      const size_t i = r % 2 == 0 ? j : n - 1 - j;
      kc::GpuRvqOptions o;
      o.check_finite = false;
      o.encode_variant = f.compare[i];
      ms[i].push_back(TimeMs([&] { CKS(kc::RvqEncodeCodes(dcb, b.blocks, codes, s, o)); }, 3, s));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    std::vector<double> t = ms[i];
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    const int v = f.compare[i];
    Report(Fmt("rvq encode side by side, variant %.0f, ", double(v)) +
               Fmt("%.0f tokens", double(f.tokens)),
           Fmt("%.0f tok/s", f.tokens / (med * 1e-3)) +
               Fmt(" (%.0f TFLOP/s)", f.tokens / (med * 1e-3) * fpt / 1e12),
           "-",
           Fmt("median of %.0f interleaved rounds; ", double(f.rounds)) +
               Fmt("fastest round %.0f tok/s, ", f.tokens / (t.front() * 1e-3)) +
               Fmt("slowest %.0f tok/s; ", f.tokens / (t.back() * 1e-3)) +
               Fmt("resolves to %.0f", double(kc::RvqEncodeResolvedVariant(cfg.head_dim, v))));
  }
  CK(cudaFree(codes));
}

int Main(int argc, char** argv) {
  const Flags f = ParseFlags(argc, argv);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB, %.0f GB, cc %d.%d\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, prop.totalGlobalMem / 1e9,
              prop.major, prop.minor);
  cudaMemPool_t pool;
  CK(cudaDeviceGetDefaultMemPool(&pool, 0));
  uint64_t thr = UINT64_MAX;
  CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &thr));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  double copy_tbs = 4.3, l2_tbs = 8.0, mma_tf = 790;
  if (!f.Skip("ceilings")) Ceilings(f, s, &copy_tbs, &l2_tbs, &mma_tf);
  const RvqConfig cfg = RvqConfig::Uniform(32, 8, 128, {56, 1024}, {16, 512});
  if (!f.Skip("encode") || !f.Skip("decode") || !f.Skip("cublas") || !f.compare.empty()) {
    const auto t0 = std::chrono::steady_clock::now();
    auto cb = LlamaCodebook(cfg);
    auto dcb = kc::DeviceCodebook::Create(cb);
    CKS(dcb.status());
    std::printf("codebook ready in %.1f s (%.2f GB fp32)\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                cfg.CodebookBytes() / 1e9);
    if (!f.compare.empty()) CompareBench(f, **dcb, s);
    if (!f.Skip("encode")) EncodeBench(f, **dcb, mma_tf, s);
    if (!f.Skip("cublas")) CublasVariantBench(f, *cb, s);
    if (!f.Skip("decode")) DecodeBench(f, **dcb, copy_tbs, l2_tbs, s);
  }
  if (!f.Skip("scalar")) ScalarBench(f, copy_tbs, s);
  if (!f.Skip("fit") && f.fit_tokens > 0) FitBench(f, cfg);

  std::printf("\n| what | measured | floor | note |\n| --- | --- | --- | --- |\n");
  for (const Row& r : g_rows) {
    std::printf("| %s | %s | %s | %s |\n", r.what.c_str(), r.value.c_str(), r.floor.c_str(),
                r.note.c_str());
  }
  CK(cudaStreamDestroy(s));
  return 0;
}

}  // namespace
}  // namespace vqkv::bench

int main(int argc, char** argv) { return vqkv::bench::Main(argc, argv); }
