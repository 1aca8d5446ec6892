#include "kernels/cuda/gpu_fit.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/device_codebook.h"
#include "kernels/cuda/kmeans_kernels.h"
#include "kernels/cuda/rvq_kernels.h"

namespace vqkv::kernels::cuda {
namespace {

// One table's sample and random state, prepared exactly as FitCodebook does.
struct TableJob {
  int l = 0, c = 0, g = 0;
  std::vector<float> x;  // [n, dim] sample rows
  int64_t n = 0;
  std::vector<uint64_t> seeds;  // per stage, the CPU's rng() for KMeans
  std::vector<float> table;     // [stages, size, dim] result
};

// Stream owned for the fit.
class Stream {
 public:
  Stream() = default;
  ~Stream() {
    if (s_ != nullptr) (void)cudaStreamDestroy(s_);
  }
  absl::Status Init() {
    VQKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking),
                              "gpu fit: stream");
    return absl::OkStatus();
  }
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

template <typename T>
absl::Status Upload(T* dst, const T* src, size_t count, cudaStream_t s, const char* what) {
  VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyHostToDevice, s),
                            absl::StrCat("gpu fit: upload ", what));
  return absl::OkStatus();
}

// Optional phase timing (VQKV_FIT_PROFILE=1): seconds of device time per phase, summed.
struct FitProfile {
  bool on = std::getenv("VQKV_FIT_PROFILE") != nullptr;
  double seed = 0, assign = 0, update = 0;
};

class PhaseTimer {
 public:
  PhaseTimer(bool on, cudaStream_t s) : on_(on), s_(s) {
    if (on_) {
      for (auto& e : ev_) (void)cudaEventCreate(&e);
    }
  }
  ~PhaseTimer() {
    if (on_) {
      for (auto& e : ev_) (void)cudaEventDestroy(e);
    }
  }
  void Mark(int i) {
    if (on_) (void)cudaEventRecord(ev_[i], s_);
  }
  double Seconds(int a, int b) {
    float ms = 0;
    if (on_) (void)cudaEventElapsedTime(&ms, ev_[a], ev_[b]);
    return ms * 1e-3;
  }

 private:
  bool on_;
  cudaStream_t s_;
  cudaEvent_t ev_[4] = {};
};

// Fits every stage of a group of tables with the same (stages, size, n).
absl::Status FitGroup(std::vector<TableJob*>& jobs, const StageConfig& sc, int dim,
                      const FitOptions& opts, const GpuFitOptions& gopts, int64_t total_steps,
                      int64_t* done, cudaStream_t stream, FitProfile* prof) {
  PhaseTimer timer(prof->on, stream);
  const int T = static_cast<int>(jobs.size());
  const int64_t n = jobs[0]->n;
  const int k = sc.size;
  const int pad = RvqSizePad(k);
  const bool tc = gopts.tensor_cores && RvqEncodeHasTensorCorePath(dim);
  int64_t n_init = n;
  if (gopts.init_points_per_centroid > 0) {
    n_init = std::min<int64_t>(n, int64_t(k) * gopts.init_points_per_centroid);
  }
  const int64_t init_stride = n_init > 0 ? n / n_init : 1;
  const int64_t init_blocks = KmInitBlocks(n_init);

  // Device state for all tables of the group.
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer x, DeviceBuffer::Allocate(size_t(T) * n * dim * 4, "fit x"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer cent,
                        DeviceBuffer::Allocate(size_t(T) * k * dim * 4, "fit centroids"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer norms, DeviceBuffer::Allocate(size_t(T) * k * 4, "fit norms"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer cb16,
                        DeviceBuffer::Allocate(size_t(T) * pad * dim * 2, "fit cb16"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer cinit,
                        DeviceBuffer::Allocate(size_t(T) * pad * 4, "fit cinit"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer scale, DeviceBuffer::Allocate(size_t(T) * 4, "fit scale"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer dist, DeviceBuffer::Allocate(size_t(T) * n * 4, "fit dist"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer assign,
                        DeviceBuffer::Allocate(size_t(T) * n * 2, "fit assignments"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer d2, DeviceBuffer::Allocate(size_t(T) * n_init * 4, "fit d2"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer bsum,
                        DeviceBuffer::Allocate(size_t(T) * init_blocks * 8, "fit block sums"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer unis, DeviceBuffer::Allocate(size_t(T) * k * 8, "fit draws"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer picks, DeviceBuffer::Allocate(size_t(T) * k * 8, "fit picks"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer sums,
                        DeviceBuffer::Allocate(size_t(T) * k * dim * 8, "fit sums"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer counts,
                        DeviceBuffer::Allocate(size_t(T) * k * 8, "fit counts"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer maxb, DeviceBuffer::Allocate(size_t(T) * 4, "fit max"));
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer pick1, DeviceBuffer::Allocate(size_t(T) * 8, "fit pick"));

  for (int t = 0; t < T; ++t) {
    VQKV_RETURN_IF_ERROR(Upload(x.as<float>() + size_t(t) * n * dim, jobs[t]->x.data(),
                                size_t(n) * dim, stream, "samples"));
  }

  // Descriptors (fixed for the whole group).
  std::vector<KmTable> km(T);
  std::vector<RvqPrepTable> prep(T);
  std::vector<RvqDeviceTable> dtab(T);
  std::vector<RvqSegment> segs(T);
  std::vector<RvqTile> tiles;
  const int tile_rows = RvqEncodeTileRows(dim);
  for (int t = 0; t < T; ++t) {
    KmTable& m = km[t];
    m.x = x.as<float>() + size_t(t) * n * dim;
    m.centroids = cent.as<float>() + size_t(t) * k * dim;
    m.dist = dist.as<float>() + size_t(t) * n;
    m.assign = assign.as<uint16_t>() + size_t(t) * n;
    m.d2 = d2.as<float>() + size_t(t) * n_init;
    m.block_sums = bsum.as<double>() + size_t(t) * init_blocks;
    m.uniforms = unis.as<double>() + size_t(t) * k;
    m.pick = pick1.as<int64_t>() + t;
    m.sums = sums.as<long long>() + size_t(t) * k * dim;
    m.counts = counts.as<long long>() + size_t(t) * k;
    m.max_bits = maxb.as<int32_t>() + t;
    m.n = n;
    m.n_init = n_init;
    m.init_stride = init_stride;
    RvqPrepTable& p = prep[t];
    p.cb32 = m.centroids;
    p.norms = norms.as<float>() + size_t(t) * k;
    p.cb16 = cb16.as<uint16_t>() + size_t(t) * pad * dim;
    p.cinit = cinit.as<float>() + size_t(t) * pad;
    p.scale = scale.as<float>() + t;
    p.stages = 1;
    p.size = k;
    p.size_pad = pad;
    p.compute_norms = 1;
    RvqDeviceTable& d = dtab[t];
    d.cb32 = p.cb32;
    d.norms = p.norms;
    d.cb16 = p.cb16;
    d.cinit = p.cinit;
    d.scale = p.scale;
    d.stages = 1;
    d.size = k;
    d.size_pad = pad;
    d.bits = sc.bits();
    RvqSegment& s = segs[t];
    s.in = m.x;
    s.in_row_stride = dim;
    s.code_offset = int64_t(t) * n;
    s.code_row_stride = 1;
    s.aux_offset = int64_t(t) * n;
    s.rows = static_cast<int32_t>(n);
    s.table = t;
    for (int64_t r = 0; r < n; r += tile_rows) {
      RvqTile tl;
      tl.segment = t;
      tl.row = static_cast<int32_t>(r);
      tl.rows = static_cast<int32_t>(std::min<int64_t>(tile_rows, n - r));
      tl.table = t;
      tiles.push_back(tl);
    }
  }
  StreamScratch scratch(stream);
  VQKV_ASSIGN_OR_RETURN(KmTable * km_dev, scratch.Upload(km, "km tables"));
  VQKV_ASSIGN_OR_RETURN(RvqPrepTable * prep_dev, scratch.Upload(prep, "prep tables"));
  VQKV_ASSIGN_OR_RETURN(RvqDeviceTable * dtab_dev, scratch.Upload(dtab, "fit tables"));
  VQKV_ASSIGN_OR_RETURN(RvqSegment * seg_dev, scratch.Upload(segs, "fit segments"));
  VQKV_ASSIGN_OR_RETURN(RvqTile * tile_dev, scratch.Upload(tiles, "fit tiles"));

  KmParams kp;
  kp.tables = km_dev;
  kp.num_tables = T;
  kp.k = k;
  kp.dim = dim;
  kp.max_n = n;
  kp.max_n_init = n_init;

  RvqEncodeParams ep;
  ep.tables = dtab_dev;
  ep.segments = seg_dev;
  ep.tiles = tile_dev;
  ep.num_tiles = static_cast<int32_t>(tiles.size());
  ep.dim = dim;
  ep.in_type = ElemType::kF32;
  ep.codes = assign.as<uint16_t>();
  ep.dist_out = dist.as<float>();

  const bool plusplus =
      opts.init == FitOptions::Init::kPlusPlus && int64_t{k} * n <= (int64_t{1} << 31);
  std::vector<double> host_unis(size_t(T) * k);
  std::vector<int64_t> host_picks(size_t(T) * k);
  std::vector<int64_t> host_pick0(T);
  std::vector<float> host_cent;
  std::vector<float> host_dist;

  for (int stage = 0; stage < sc.stages; ++stage) {
    double t_assign = 0, t_update = 0;
    timer.Mark(0);
    if (n <= k) {
      // Too few points: the points themselves (and perturbed copies), as the CPU does.
      std::vector<float> xs(size_t(n) * dim);
      host_cent.assign(size_t(T) * k * dim, 0.f);
      VQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "gpu fit");
      for (int t = 0; t < T; ++t) {
        VQKV_CUDA_RETURN_IF_ERROR(
            cudaMemcpy(xs.data(), km[t].x, xs.size() * 4, cudaMemcpyDeviceToHost),
            "gpu fit: download points");
        float* c = host_cent.data() + size_t(t) * k * dim;
        for (int j = 0; j < k; ++j) {
          if (j < n) {
            std::memcpy(c + size_t(j) * dim, xs.data() + size_t(j) * dim, dim * 4);
          } else if (n > 0) {
            std::memcpy(c + size_t(j) * dim, xs.data() + size_t(j % n) * dim, dim * 4);
            c[size_t(j) * dim + (j % dim)] += 1e-6f * float(j);
          }
        }
      }
      VQKV_RETURN_IF_ERROR(
          Upload(cent.as<float>(), host_cent.data(), host_cent.size(), stream, "centroids"));
    } else if (plusplus) {
      for (int t = 0; t < T; ++t) {
        std::mt19937_64 rng(jobs[t]->seeds[stage]);
        host_pick0[t] = std::uniform_int_distribution<int64_t>(0, n_init - 1)(rng);
        for (int j = 0; j < k; ++j) {
          host_unis[size_t(t) * k + j] = std::generate_canonical<double, 53>(rng);
        }
      }
      VQKV_RETURN_IF_ERROR(
          Upload(unis.as<double>(), host_unis.data(), host_unis.size(), stream, "draws"));
      VQKV_RETURN_IF_ERROR(
          Upload(pick1.as<int64_t>(), host_pick0.data(), host_pick0.size(), stream, "first picks"));
      VQKV_CUDA_RETURN_IF_ERROR(LaunchKmSeedFirst(kp, stream), "gpu fit: seed");
      for (int j = 0; j + 1 < k; ++j) {
        VQKV_CUDA_RETURN_IF_ERROR(LaunchKmPlusPlusUpdate(kp, j, stream), "gpu fit: k-means++");
        VQKV_CUDA_RETURN_IF_ERROR(LaunchKmPlusPlusSelect(kp, j, stream), "gpu fit: k-means++");
      }
    } else {
      std::vector<int64_t> perm(n);
      for (int t = 0; t < T; ++t) {
        std::mt19937_64 rng(jobs[t]->seeds[stage]);
        std::iota(perm.begin(), perm.end(), int64_t{0});
        for (int j = 0; j < k; ++j) {
          const int64_t r = std::uniform_int_distribution<int64_t>(j, n - 1)(rng);
          std::swap(perm[j], perm[r]);
          host_picks[size_t(t) * k + j] = perm[j];
        }
      }
      VQKV_RETURN_IF_ERROR(
          Upload(picks.as<int64_t>(), host_picks.data(), host_picks.size(), stream, "picks"));
      VQKV_CUDA_RETURN_IF_ERROR(LaunchKmGather(kp, picks.as<int64_t>(), stream), "gpu fit: seed");
    }

    timer.Mark(1);
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(maxb.get(), 0, maxb.bytes(), stream), "gpu fit");
    VQKV_CUDA_RETURN_IF_ERROR(LaunchKmMaxAbs(kp, stream), "gpu fit: max");
    for (int it = 0; it <= opts.iterations; ++it) {
      timer.Mark(2);
      VQKV_CUDA_RETURN_IF_ERROR(LaunchRvqPrep(prep_dev, T, 1, dim, stream), "gpu fit: prep");
      const bool last = it == opts.iterations || n <= k;
      // The last assignment also subtracts the chosen centroids: the next stage's residuals.
      ep.residual_out = last ? x.as<float>() : nullptr;
      VQKV_CUDA_RETURN_IF_ERROR(tc ? LaunchRvqEncode(ep, stream) : LaunchRvqEncodeExact(ep, stream),
                                "gpu fit: assign");
      timer.Mark(3);
      if (prof->on) {
        (void)cudaStreamSynchronize(stream);
        t_assign += timer.Seconds(2, 3);
      }
      if (last) break;
      VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(sums.get(), 0, sums.bytes(), stream), "gpu fit");
      VQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(counts.get(), 0, counts.bytes(), stream),
                                "gpu fit");
      VQKV_CUDA_RETURN_IF_ERROR(LaunchKmAccumulate(kp, stream), "gpu fit: sums");
      VQKV_CUDA_RETURN_IF_ERROR(LaunchKmUpdate(kp, stream), "gpu fit: update");
      timer.Mark(2);
      if (prof->on) {
        (void)cudaStreamSynchronize(stream);
        t_update += timer.Seconds(3, 2);
      }
    }
    host_cent.resize(size_t(T) * k * dim);
    VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_cent.data(), cent.get(), host_cent.size() * 4,
                                              cudaMemcpyDeviceToHost, stream),
                              "gpu fit: download centroids");
    if (opts.progress) {
      host_dist.resize(size_t(T) * n);
      VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_dist.data(), dist.get(), host_dist.size() * 4,
                                                cudaMemcpyDeviceToHost, stream),
                                "gpu fit: download distances");
    }
    VQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "gpu fit: stage");
    if (prof->on) {
      prof->seed += timer.Seconds(0, 1);
      prof->assign += t_assign;
      prof->update += t_update;
    }
    for (int t = 0; t < T; ++t) {
      std::memcpy(jobs[t]->table.data() + size_t(stage) * k * dim,
                  host_cent.data() + size_t(t) * k * dim, size_t(k) * dim * 4);
      ++*done;
      if (opts.progress) {
        double s = 0;
        for (int64_t i = 0; i < n; ++i) s += host_dist[size_t(t) * n + i];
        const TableJob& j = *jobs[t];
        opts.progress(
            *done, total_steps,
            absl::StrCat("layer ", j.l, j.c == 0 ? " K" : " V",
                         j.g >= 0 ? absl::StrCat(" head ", j.g) : "", " stage ", stage + 1, "/",
                         sc.stages, " mse ", n > k ? s / double(n) : 0.0, " (gpu)"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Codebook> FitCodebookGpu(const RvqConfig& config, const KvSamples& raw_samples,
                                        const FitOptions& opts, const GpuFitOptions& gopts) {
  const auto t_start = std::chrono::steady_clock::now();
  VQKV_RETURN_IF_ERROR(config.Validate());
  VQKV_RETURN_IF_ERROR(opts.code_space.Validate(config.layers, config.kv_heads, config.head_dim));
  // The samples in the codebook's code space, as FitCodebook maps them.
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
  if (opts.max_vectors < 1) return absl::InvalidArgumentError("fit: max_vectors must be >= 1");
  const int dim = config.head_dim, heads = config.kv_heads;
  const int groups = config.per_head ? heads : 1;
  int64_t total_steps = 0;
  for (int l = 0; l < config.layers; ++l) {
    total_steps += int64_t{groups} * (config.k[l].stages + config.v[l].stages);
  }

  // Sample rows and seeds, exactly as FitCodebook draws them; tables in parallel (the finiteness
  // scan alone reads every sample value).
  const int ntables = config.layers * 2 * groups;
  std::vector<TableJob> jobs(ntables);
  std::vector<absl::Status> errors(size_t(config.layers) * 2);
  ParallelFor(int64_t(config.layers) * 2, 1, [&](int64_t b, int64_t e) {
    for (int64_t lc = b; lc < e; ++lc) {
      const int l = static_cast<int>(lc / 2), c = static_cast<int>(lc % 2);
      const std::vector<float>& src = c == 0 ? samples.k[l] : samples.v[l];
      const int64_t tokens = int64_t(src.size()) / (int64_t{heads} * dim);
      if (tokens == 0 || int64_t(src.size()) != tokens * heads * dim) {
        errors[lc] = absl::InvalidArgumentError(
            absl::StrCat("fit: layer ", l, c == 0 ? " K" : " V",
                         " samples are empty or not a multiple of kv_heads*head_dim"));
        continue;
      }
      bool finite = true;
      for (float v : src) finite = finite && std::isfinite(v);
      if (!finite) {
        errors[lc] = absl::InvalidArgumentError(
            absl::StrCat("fit: layer ", l, c == 0 ? " K" : " V", " samples hold NaN or Inf"));
        continue;
      }
      const StageConfig& sc = config.at(l, c);
      for (int g = 0; g < groups; ++g) {
        std::vector<int64_t> rows;
        const int64_t avail = config.per_head ? tokens : tokens * heads;
        rows.reserve(avail);
        for (int64_t i = 0; i < avail; ++i) rows.push_back(config.per_head ? i * heads + g : i);
        std::mt19937_64 rng(opts.seed * 1000003 + (l * 2 + c) * 131 + g);
        if (int64_t(rows.size()) > opts.max_vectors) {
          std::shuffle(rows.begin(), rows.end(), rng);
          rows.resize(opts.max_vectors);
          std::sort(rows.begin(), rows.end());
        }
        TableJob& job = jobs[size_t(lc) * groups + g];
        job.l = l;
        job.c = c;
        job.g = config.per_head ? g : -1;
        job.n = int64_t(rows.size());
        if (job.n > (int64_t{1} << 30)) {
          errors[lc] = absl::InvalidArgumentError("fit: more than 2^30 sample rows per table");
          break;
        }
        job.x.resize(size_t(job.n) * dim);
        for (int64_t i = 0; i < job.n; ++i) {
          std::memcpy(&job.x[size_t(i) * dim], &src[size_t(rows[i]) * dim], size_t(dim) * 4);
        }
        for (int st = 0; st < sc.stages; ++st) job.seeds.push_back(rng());
        job.table.assign(size_t(sc.stages) * sc.size * dim, 0.f);
      }
    }
  });
  for (const absl::Status& st : errors) VQKV_RETURN_IF_ERROR(st);

  Stream stream;
  VQKV_RETURN_IF_ERROR(stream.Init());
  // Tables with the same stages, size and sample count advance together.
  std::map<std::tuple<int, int, int64_t>, std::vector<TableJob*>> batches;
  for (TableJob& j : jobs) {
    const StageConfig& sc = config.at(j.l, j.c);
    batches[{sc.stages, sc.size, j.n}].push_back(&j);
  }
  int64_t done = 0;
  FitProfile prof;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& [key, group] : batches) {
    const StageConfig sc{std::get<0>(key), std::get<1>(key)};
    VQKV_RETURN_IF_ERROR(
        FitGroup(group, sc, dim, opts, gopts, total_steps, &done, stream.get(), &prof));
    for (TableJob* j : group) {
      j->x.clear();
      j->x.shrink_to_fit();
    }
  }
  std::vector<std::vector<float>> tables;
  tables.reserve(jobs.size());
  for (TableJob& j : jobs) tables.push_back(std::move(j.table));
  const auto t1 = std::chrono::steady_clock::now();
  auto cb = Codebook::Create(config, std::move(tables), opts.code_space);
  if (prof.on) {
    const auto t2 = std::chrono::steady_clock::now();
    std::fprintf(stderr,
                 "gpu fit profile: k-means++ seeding %.2f s, assignments %.2f s, sums+update %.2f "
                 "s (device time); host sample prep %.2f s, groups %.2f s wall; Codebook::Create "
                 "%.2f s\n",
                 prof.seed, prof.assign, prof.update,
                 std::chrono::duration<double>(t0 - t_start).count(),
                 std::chrono::duration<double>(t1 - t0).count(),
                 std::chrono::duration<double>(t2 - t1).count());
  }
  return cb;
}

}  // namespace vqkv::kernels::cuda
