#!/usr/bin/env bash
# Installs every Debian package vqkv needs (idempotent) and builds it into build/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(vqkv_root)"
vqkv_install_deps
vqkv_build "${VQKV_BUILD_DIR:-$ROOT/build}" "$@"
