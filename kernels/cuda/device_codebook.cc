#include "kernels/cuda/device_codebook.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace vqkv::kernels::cuda {
namespace {

size_t Align256(size_t n) { return (n + 255) & ~size_t{255}; }

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceCodebook>> DeviceCodebook::Create(
    std::shared_ptr<const Codebook> cb) {
  if (!cb) return absl::InvalidArgumentError("DeviceCodebook: null codebook");
  std::unique_ptr<DeviceCodebook> out(new DeviceCodebook);
  out->cb_ = std::move(cb);
  VQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&out->device_), "DeviceCodebook: cudaGetDevice");
  const RvqConfig& cfg = out->cb_->config();
  const int dim = cfg.head_dim;
  const int heads = cfg.per_head ? cfg.kv_heads : 1;

  // Layout of one storage block: per table cb32 | norms | cb16 | cinit | scale.
  struct Offsets {
    size_t cb32, norms, cb16, cinit, scale;
  };
  std::vector<Offsets> offs;
  size_t total = 0;
  int max_stages = 0;
  for (int l = 0; l < cfg.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const StageConfig& s = cfg.at(l, c);
      const size_t pad = RvqSizePad(s.size);
      for (int h = 0; h < heads; ++h) {
        Offsets o;
        o.cb32 = total;
        total += Align256(size_t(s.stages) * s.size * dim * 4);
        o.norms = total;
        total += Align256(size_t(s.stages) * s.size * 4);
        o.cb16 = total;
        total += Align256(size_t(s.stages) * pad * dim * 2);
        o.cinit = total;
        total += Align256(size_t(s.stages) * pad * 4);
        o.scale = total;
        total += Align256(size_t(s.stages) * 4);
        offs.push_back(o);
      }
      if (s.stages > max_stages) max_stages = s.stages;
    }
  }
  VQKV_ASSIGN_OR_RETURN(out->storage_, DeviceBuffer::Allocate(total, "codebook tables"));
  char* base = out->storage_.as<char>();

  std::vector<RvqPrepTable> prep;
  for (int l = 0; l < cfg.layers; ++l) {
    for (int c = 0; c < 2; ++c) {
      const StageConfig& s = cfg.at(l, c);
      for (int h = 0; h < heads; ++h) {
        const int ti = out->cb_->TableIndex(l, c, h);
        const Offsets& o = offs[ti];
        const size_t n32 = size_t(s.stages) * s.size * dim;
        VQKV_CUDA_RETURN_IF_ERROR(
            cudaMemcpy(base + o.cb32, out->cb_->Table(l, c, h, 0), n32 * 4, cudaMemcpyHostToDevice),
            "DeviceCodebook: upload tables");
        VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(base + o.norms, out->cb_->Norms(l, c, h, 0),
                                             size_t(s.stages) * s.size * 4, cudaMemcpyHostToDevice),
                                  "DeviceCodebook: upload norms");
        RvqDeviceTable t;
        t.cb32 = reinterpret_cast<const float*>(base + o.cb32);
        t.norms = reinterpret_cast<const float*>(base + o.norms);
        t.cb16 = reinterpret_cast<const uint16_t*>(base + o.cb16);
        t.cinit = reinterpret_cast<const float*>(base + o.cinit);
        t.scale = reinterpret_cast<const float*>(base + o.scale);
        t.stages = s.stages;
        t.size = s.size;
        t.size_pad = RvqSizePad(s.size);
        t.bits = s.bits();
        out->host_tables_.push_back(t);
        RvqPrepTable p;
        p.cb32 = t.cb32;
        p.norms = reinterpret_cast<float*>(base + o.norms);
        p.cb16 = reinterpret_cast<uint16_t*>(base + o.cb16);
        p.cinit = reinterpret_cast<float*>(base + o.cinit);
        p.scale = reinterpret_cast<float*>(base + o.scale);
        p.stages = s.stages;
        p.size = s.size;
        p.size_pad = t.size_pad;
        p.compute_norms = 0;
        prep.push_back(p);
      }
    }
  }
  VQKV_ASSIGN_OR_RETURN(DeviceBuffer prep_dev,
                        DeviceBuffer::Allocate(prep.size() * sizeof(RvqPrepTable), "prep"));
  VQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(prep_dev.get(), prep.data(),
                                       prep.size() * sizeof(RvqPrepTable), cudaMemcpyHostToDevice),
                            "DeviceCodebook: upload prep");
  VQKV_CUDA_RETURN_IF_ERROR(LaunchRvqPrep(prep_dev.as<RvqPrepTable>(),
                                          static_cast<int>(prep.size()), max_stages, dim, nullptr),
                            "DeviceCodebook: prep kernel");
  VQKV_ASSIGN_OR_RETURN(out->tables_,
                        DeviceBuffer::Allocate(out->host_tables_.size() * sizeof(RvqDeviceTable),
                                               "table descriptors"));
  VQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(out->tables_.get(), out->host_tables_.data(),
                 out->host_tables_.size() * sizeof(RvqDeviceTable), cudaMemcpyHostToDevice),
      "DeviceCodebook: upload descriptors");
  VQKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize(), "DeviceCodebook: prep");
  return out;
}

}  // namespace vqkv::kernels::cuda
