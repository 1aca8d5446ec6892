# Shared by the scripts: package list, idempotent install, configure + build.
# Source it; it defines functions only.

VQKV_PACKAGES=(
  build-essential cmake ninja-build pkg-config git ccache clang-format
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev libfmt-dev libyaml-cpp-dev nlohmann-json3-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-numpy python3-grpcio python3-pytest python3-pip
  redis-server libhiredis-dev etcd-server etcd-client
  procps
)

vqkv_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

# Installs whatever of VQKV_PACKAGES is missing (apt-get update once, only when needed).
vqkv_install_deps() {
  local missing=()
  for p in "${VQKV_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "[setup] all ${#VQKV_PACKAGES[@]} Debian packages present"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "[setup] need root or sudo to install: ${missing[*]}" >&2; return 1; }
    sudo="sudo"
  fi
  echo "[setup] installing ${#missing[@]} Debian packages: ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# vqkv_build BUILD_DIR [extra cmake args...]: configure (Ninja, Release) and build everything.
vqkv_build() {
  local dir="$1"; shift
  local root; root="$(vqkv_root)"
  local jobs; jobs="$(nproc)"
  local cuda_args=()
  # Without a GPU toolkit the build is CPU-only; VQKV_CUDA=OFF|ON|AUTO overrides.
  cuda_args+=("-DVQKV_CUDA=${VQKV_CUDA:-AUTO}")
  echo "[build] configuring $dir (VQKV_CUDA=${VQKV_CUDA:-AUTO})"
  cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE="${VQKV_BUILD_TYPE:-Release}" "${cuda_args[@]}" "$@" >"$dir.configure.log" 2>&1 \
    || { tail -30 "$dir.configure.log"; echo "[build] configure failed (log: $dir.configure.log)" >&2; return 1; }
  echo "[build] building with $jobs jobs"
  cmake --build "$dir" -j "$jobs" || { echo "[build] build failed" >&2; return 1; }
}
