// Disk tier: one file per block, "<id>.blk" under the directory. A write goes to "<id>.tmp" and
// is renamed into place, so a crash never leaves a half-written block under a valid name.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "server/store/tier.h"

namespace vqkv::store {
namespace {

namespace fs = std::filesystem;

class DiskTier final : public Tier {
 public:
  DiskTier(fs::path dir, int64_t capacity) : dir_(std::move(dir)), capacity_(capacity) {}
  ~DiskTier() override { RemoveOurFiles(dir_); }

  TierKind kind() const override { return TierKind::kDisk; }
  int64_t capacity_bytes() const override { return capacity_; }

  absl::Status Write(uint64_t id, const BlockBytes& bytes) override {
    const fs::path tmp = Path(id, ".tmp"), dst = Path(id, ".blk");
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      f.write(bytes->data(), static_cast<std::streamsize>(bytes->size()));
      f.flush();
      if (!f) {
        std::error_code ec;
        fs::remove(tmp, ec);
        return absl::InternalError(absl::StrCat("disk tier: cannot write ", tmp.string()));
      }
    }
    std::error_code ec;
    fs::rename(tmp, dst, ec);
    if (ec) {
      fs::remove(tmp, ec);
      return absl::InternalError(
          absl::StrCat("disk tier: rename to ", dst.string(), ": ", ec.message()));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<BlockBytes> Read(uint64_t id) override {
    const fs::path p = Path(id, ".blk");
    std::ifstream f(p, std::ios::binary | std::ios::ate);
    if (!f) return absl::NotFoundError(absl::StrCat("disk tier: no file ", p.string()));
    auto out = std::make_shared<std::string>();
    out->resize(static_cast<size_t>(f.tellg()));
    f.seekg(0);
    f.read(out->data(), static_cast<std::streamsize>(out->size()));
    if (!f) return absl::DataLossError(absl::StrCat("disk tier: short read of ", p.string()));
    return BlockBytes(std::move(out));
  }

  void Erase(uint64_t id) override {
    std::error_code ec;
    fs::remove(Path(id, ".blk"), ec);
  }

  static void RemoveOurFiles(const fs::path& dir) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      const std::string ext = entry.path().extension().string();
      if (ext == ".blk" || ext == ".tmp") fs::remove(entry.path(), ec);
    }
  }

 private:
  fs::path Path(uint64_t id, const char* ext) const {
    return dir_ / absl::StrCat(absl::Hex(id, absl::kZeroPad16), ext);
  }

  const fs::path dir_;
  const int64_t capacity_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tier>> NewDiskTier(const std::string& dir, int64_t capacity_bytes) {
  if (capacity_bytes <= 0) {
    return absl::InvalidArgumentError("disk tier: capacity must be positive");
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) {
    return absl::InternalError(absl::StrCat("disk tier: cannot use directory '", dir,
                                            "': ", ec ? ec.message() : "not a directory"));
  }
  DiskTier::RemoveOurFiles(dir);
  return std::unique_ptr<Tier>(new DiskTier(dir, capacity_bytes));
}

}  // namespace vqkv::store
