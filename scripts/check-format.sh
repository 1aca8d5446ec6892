#!/usr/bin/env bash
# Fails when clang-format (repo .clang-format) would change any of our C++/CUDA sources.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
files=$(git ls-files '*.h' '*.cc' '*.cu' '*.cuh' 2>/dev/null || find . -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh')
[ -n "$files" ] || { echo "no sources"; exit 1; }
clang-format --dry-run -Werror $files
echo "format: $(echo "$files" | wc -l) files clean"
