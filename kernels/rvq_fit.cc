#include "kernels/rvq_fit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/simd.h"
#include "common/status_macros.h"
#include "kernels/vq_search.h"

namespace vqkv::kernels {
namespace {

std::vector<float> Norms(const std::vector<float>& c, int k, int dim) {
  std::vector<float> n(k);
  for (int j = 0; j < k; ++j) {
    double s = 0;
    for (int d = 0; d < dim; ++d) s += double(c[size_t(j) * dim + d]) * c[size_t(j) * dim + d];
    n[j] = float(s);
  }
  return n;
}

// k-means++ seeding, restricted to a sample of candidates to stay O(n k dim) at most.
std::vector<float> InitPlusPlus(const float* x, int64_t n, int dim, int k, std::mt19937_64& rng) {
  std::vector<float> c(size_t(k) * dim);
  std::vector<float> d2(n, std::numeric_limits<float>::infinity());
  int64_t pick = std::uniform_int_distribution<int64_t>(0, n - 1)(rng);
  for (int j = 0; j < k; ++j) {
    std::memcpy(&c[size_t(j) * dim], x + pick * dim, dim * 4);
    const float* cj = &c[size_t(j) * dim];
    // Squared distances to the new centroid (8 lanes, then a fixed-order lane sum: the same
    // result on every run), in parallel over the points.
    ParallelFor(n, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float* xi = x + i * dim;
        simd::V8 acc = {};
        int d = 0;
        for (; d + 8 <= dim; d += 8) {
          const simd::V8 t = simd::Load8(xi + d) - simd::Load8(cj + d);
          acc += t * t;
        }
        float s = simd::Sum8(acc);
        for (; d < dim; ++d) s += (xi[d] - cj[d]) * (xi[d] - cj[d]);
        d2[i] = std::min(d2[i], s);
      }
    });
    double total = 0;
    for (int64_t i = 0; i < n; ++i) total += d2[i];
    if (total <= 0) {
      pick = std::uniform_int_distribution<int64_t>(0, n - 1)(rng);
      continue;
    }
    double u = std::uniform_real_distribution<double>(0, total)(rng);
    pick = n - 1;
    for (int64_t i = 0; i < n; ++i) {
      u -= d2[i];
      if (u <= 0) {
        pick = i;
        break;
      }
    }
  }
  return c;
}

}  // namespace

std::vector<float> KMeans(const float* x, int64_t n, int dim, int k, const FitOptions& opts,
                          uint64_t seed, double* mse) {
  std::mt19937_64 rng(seed);
  std::vector<float> c(size_t(k) * dim, 0.f);
  if (n <= k) {
    for (int j = 0; j < k; ++j) {
      if (j < n) {
        std::memcpy(&c[size_t(j) * dim], x + int64_t{j} * dim, dim * 4);
      } else if (n > 0) {
        // Spare codewords: tiny perturbations of real points, never used by a nearest search
        // in a way that costs accuracy.
        std::memcpy(&c[size_t(j) * dim], x + int64_t{j % n} * dim, dim * 4);
        c[size_t(j) * dim + (j % dim)] += 1e-6f * float(j);
      }
    }
    if (mse) *mse = 0;
    return c;
  }
  if (opts.init == FitOptions::Init::kPlusPlus && int64_t{k} * n <= (int64_t{1} << 31)) {
    c = InitPlusPlus(x, n, dim, k, rng);
  } else {
    std::vector<int64_t> perm(n);
    for (int64_t i = 0; i < n; ++i) perm[i] = i;
    for (int j = 0; j < k; ++j) {
      const int64_t t = std::uniform_int_distribution<int64_t>(j, n - 1)(rng);
      std::swap(perm[j], perm[t]);
      std::memcpy(&c[size_t(j) * dim], x + perm[j] * dim, dim * 4);
    }
  }
  std::vector<int32_t> assign(n);
  std::vector<float> dist(n);
  std::vector<double> sum(size_t(k) * dim);
  std::vector<int64_t> count(k);
  for (int it = 0; it <= opts.iterations; ++it) {
    const std::vector<float> norms = Norms(c, k, dim);
    NearestCodewords(x, n, dim, c.data(), norms.data(), k, assign.data(), dist.data());
    if (it == opts.iterations) break;
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t a = assign[i];
      ++count[a];
      for (int d = 0; d < dim; ++d) sum[size_t(a) * dim + d] += x[i * dim + d];
    }
    // Empty clusters take the points farthest from their centroids, one each.
    std::vector<int64_t> order;
    for (int j = 0; j < k; ++j) {
      if (count[j] > 0) {
        for (int d = 0; d < dim; ++d)
          c[size_t(j) * dim + d] = float(sum[size_t(j) * dim + d] / count[j]);
      }
    }
    int64_t next_far = 0;
    for (int j = 0; j < k; ++j) {
      if (count[j] != 0) continue;
      if (order.empty()) {
        order.resize(n);
        for (int64_t i = 0; i < n; ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t a, int64_t b) { return dist[a] > dist[b]; });
      }
      if (next_far < n) {
        std::memcpy(&c[size_t(j) * dim], x + order[next_far] * dim, dim * 4);
        dist[order[next_far]] = 0;
        ++next_far;
      }
    }
  }
  if (mse) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += dist[i];
    *mse = s / double(n);
  }
  return c;
}

absl::StatusOr<CodeSpace> ComputeCodeSpace(const KvSamples& samples, const CodeSpaceOptions& opts) {
  const int L = samples.layers, H = samples.kv_heads, dim = samples.head_dim;
  CodeSpace cs;
  cs.key_rope_inv_freq = opts.key_rope_inv_freq;
  if (!(opts.exponent > 0) || !(opts.floor > 0)) {
    return absl::InvalidArgumentError("code space: exponent and floor must be positive");
  }
  const bool rope = !opts.key_rope_inv_freq.empty();
  // Turns channel energies of one (layer, kind) into weights: pair-averaged under RoPE for keys
  // (a rotation mixes each pair, so only the pair's energy is position-free).
  auto weights = [&](std::vector<double> e, bool pairs) {
    std::vector<float> w(e.size());
    for (int h = 0; h < H; ++h) {
      double* eh = e.data() + int64_t{h} * dim;
      if (pairs) {
        for (int i = 0; i < dim / 2; ++i) {
          const double m = 0.5 * (eh[i] + eh[i + dim / 2]);
          eh[i] = eh[i + dim / 2] = m;
        }
      }
      std::vector<double> p(dim);
      double ms = 0;
      for (int d = 0; d < dim; ++d) {
        p[d] = std::pow(std::max(eh[d], 0.0), opts.exponent / 2);
        ms += p[d] * p[d];
      }
      ms = ms / dim;
      const double norm = ms > 0 ? 1.0 / std::sqrt(ms) : 1.0;
      for (int d = 0; d < dim; ++d) {
        w[int64_t{h} * dim + d] = float(std::max(p[d] * norm, opts.floor));
      }
    }
    return w;
  };
  if (opts.key_query_scale || !opts.value_energy.empty()) cs.scale.assign(size_t(L) * 2, {});
  if (opts.key_query_scale) {
    if (samples.q_heads <= 0 || int(samples.q.size()) != L || samples.q_heads % H != 0) {
      return absl::InvalidArgumentError(
          "code space: key_query_scale needs calibration queries (q, q_heads)");
    }
    const int group = samples.q_heads / H;
    for (int l = 0; l < L; ++l) {
      const std::vector<float>& q = samples.q[l];
      const int64_t n = int64_t(q.size()) / (int64_t{samples.q_heads} * dim);
      std::vector<double> e(size_t(H) * dim, 0.0);
      for (int64_t t = 0; t < n; ++t) {
        for (int qh = 0; qh < samples.q_heads; ++qh) {
          const float* v = q.data() + (t * samples.q_heads + qh) * dim;
          double* eh = e.data() + int64_t{qh / group} * dim;
          for (int d = 0; d < dim; ++d) eh[d] += double(v[d]) * v[d];
        }
      }
      cs.scale[size_t(l) * 2] = weights(std::move(e), rope);
    }
  }
  if (!opts.value_energy.empty()) {
    if (int(opts.value_energy.size()) != L) {
      return absl::InvalidArgumentError("code space: value_energy needs one vector per layer");
    }
    for (int l = 0; l < L; ++l) {
      if (int64_t(opts.value_energy[l].size()) != int64_t{H} * dim) {
        return absl::InvalidArgumentError(
            absl::StrCat("code space: value_energy[", l, "] needs kv_heads*head_dim values"));
      }
      std::vector<double> e(opts.value_energy[l].begin(), opts.value_energy[l].end());
      cs.scale[size_t(l) * 2 + 1] = weights(std::move(e), false);
    }
  }
  VQKV_RETURN_IF_ERROR(cs.Validate(L, H, dim));
  return cs;
}

absl::StatusOr<Codebook> FitCodebook(const RvqConfig& config, const KvSamples& raw_samples,
                                     const FitOptions& opts) {
  VQKV_RETURN_IF_ERROR(config.Validate());
  VQKV_RETURN_IF_ERROR(opts.code_space.Validate(config.layers, config.kv_heads, config.head_dim));
  const KvSamples samples = SamplesInCodeSpace(opts.code_space, raw_samples);
  if (samples.layers != config.layers || samples.kv_heads != config.kv_heads ||
      samples.head_dim != config.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("fit: samples have layers/kv_heads/head_dim ", samples.layers, "/",
                     samples.kv_heads, "/", samples.head_dim, " but the config asks for ",
                     config.layers, "/", config.kv_heads, "/", config.head_dim));
  }
  if (int(samples.k.size()) != samples.layers || int(samples.v.size()) != samples.layers) {
    return absl::InvalidArgumentError("fit: samples need K and V for every layer");
  }
  const int dim = config.head_dim, heads = config.kv_heads;
  const int groups = config.per_head ? heads : 1;
  int64_t total_steps = 0;
  for (int l = 0; l < config.layers; ++l)
    total_steps += int64_t{groups} * (config.k[l].stages + config.v[l].stages);
  int64_t done = 0;
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < config.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const std::vector<float>& src = c == 0 ? samples.k[l] : samples.v[l];
      const int64_t tokens = int64_t(src.size()) / (int64_t{heads} * dim);
      if (tokens == 0 || int64_t(src.size()) != tokens * heads * dim) {
        return absl::InvalidArgumentError(
            absl::StrCat("fit: layer ", l, c == 0 ? " K" : " V",
                         " samples are empty or not a multiple of kv_heads*head_dim"));
      }
      for (float v : src) {
        if (!std::isfinite(v)) {
          return absl::InvalidArgumentError(
              absl::StrCat("fit: layer ", l, c == 0 ? " K" : " V", " samples hold NaN or Inf"));
        }
      }
      const StageConfig& sc = config.at(l, c);
      for (int g = 0; g < groups; ++g) {
        // Rows of this table: all (token, head) vectors, or one head's.
        std::vector<int64_t> rows;
        const int64_t avail = config.per_head ? tokens : tokens * heads;
        for (int64_t i = 0; i < avail; ++i) rows.push_back(config.per_head ? i * heads + g : i);
        std::mt19937_64 rng(opts.seed * 1000003 + (l * 2 + c) * 131 + g);
        if (int64_t(rows.size()) > opts.max_vectors) {
          std::shuffle(rows.begin(), rows.end(), rng);
          rows.resize(opts.max_vectors);
          std::sort(rows.begin(), rows.end());
        }
        const int64_t n = rows.size();
        std::vector<float> r(n * dim);
        for (int64_t i = 0; i < n; ++i) std::memcpy(&r[i * dim], &src[rows[i] * dim], dim * 4);
        std::vector<float> table(size_t(sc.stages) * sc.size * dim);
        std::vector<int32_t> idx(n);
        for (int i = 0; i < sc.stages; ++i) {
          double mse = 0;
          std::vector<float> cw = KMeans(r.data(), n, dim, sc.size, opts, rng(), &mse);
          std::memcpy(&table[size_t(i) * sc.size * dim], cw.data(), cw.size() * 4);
          const std::vector<float> norms = Norms(cw, sc.size, dim);
          NearestCodewords(r.data(), n, dim, cw.data(), norms.data(), sc.size, idx.data(), nullptr);
          for (int64_t v = 0; v < n; ++v) {
            for (int d = 0; d < dim; ++d) r[v * dim + d] -= cw[size_t(idx[v]) * dim + d];
          }
          ++done;
          if (opts.progress) {
            opts.progress(done, total_steps,
                          absl::StrCat("layer ", l, c == 0 ? " K" : " V",
                                       config.per_head ? absl::StrCat(" head ", g) : "", " stage ",
                                       i + 1, "/", sc.stages, " mse ", mse));
          }
        }
        tables.push_back(std::move(table));
      }
    }
  }
  return Codebook::Create(config, std::move(tables), opts.code_space);
}

absl::StatusOr<Codebook> TruncateCodebook(const Codebook& cb, const RvqConfig& config) {
  VQKV_RETURN_IF_ERROR(config.Validate());
  const RvqConfig& full = cb.config();
  if (config.layers != full.layers || config.kv_heads != full.kv_heads ||
      config.head_dim != full.head_dim || config.per_head != full.per_head) {
    return absl::InvalidArgumentError("truncate: geometry differs from the source codebook");
  }
  const int groups = config.per_head ? config.kv_heads : 1;
  std::vector<std::vector<float>> tables;
  for (int l = 0; l < config.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const StageConfig& want = config.at(l, c);
      const StageConfig& have = full.at(l, c);
      if (want.size != have.size || want.stages > have.stages) {
        return absl::InvalidArgumentError(
            absl::StrCat("truncate: layer ", l, c == 0 ? " K" : " V", " wants ", want.stages, "x",
                         want.size, " but the source has ", have.stages, "x", have.size));
      }
      for (int g = 0; g < groups; ++g) {
        const float* t = cb.Table(l, c, g, 0);
        tables.emplace_back(t, t + size_t(want.stages) * want.size * config.head_dim);
      }
    }
  }
  return Codebook::Create(config, std::move(tables), cb.code_space());
}

}  // namespace vqkv::kernels
