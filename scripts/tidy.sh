#!/usr/bin/env bash
# Runs clang-tidy (.clang-tidy) over the project's .cc files using build/compile_commands.json.
#   scripts/tidy.sh [BUILD_DIR] [FILES...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build="${1:-build}"; shift || true
[ -f "$build/compile_commands.json" ] || { echo "run scripts/setup.sh first ($build/compile_commands.json missing)" >&2; exit 2; }
files=("$@")
[ ${#files[@]} -gt 0 ] || mapfile -t files < <(git ls-files 'common/*.cc' 'kernels/*.cc' 'model/*.cc' 'server/*.cc' 'client/*.cc')
clang-tidy -p "$build" --quiet "${files[@]}"
