#!/usr/bin/env bash
# The README's first command: install, build, then
#   1. the codec fidelity table on the real model (fit on the first half of the text, evaluate on
#      the second half; a few minutes on 2 cores), and
#   2. the service demo: vqkvd on the embedded CPU default (127.0.0.1, host tier, CPU codec) and a
#      client that registers the model, fits codebooks, stores the real KV of a few stories, looks
#      them up, gets them back reconstructed, and prints ratio, fidelity and timing; then the
#      daemon is stopped with SIGTERM.
# Extra arguments go to `vqkv fidelity` (e.g. --model DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(vqkv_root)"
BUILD="${VQKV_BUILD_DIR:-$ROOT/build}"
vqkv_install_deps
vqkv_build "$BUILD"
VQKV="$BUILD/client/cpp/cli/vqkv"

echo
echo "== 1/2 codec fidelity on the real model =="
"$VQKV" fidelity --per-story --per-head --budgets 2.25 --iters 6 --max-vectors 16384 "$@"

echo
echo "== 2/2 service demo: vqkvd + client round trip =="
if [ -x "$BUILD/server/main/vqkvd" ] && "$VQKV" help 2>/dev/null | grep -q "^  demo"; then
  exec "$ROOT/scripts/service-demo.sh" "$BUILD"
else
  echo "vqkvd or 'vqkv demo' is not built in this tree; skipping the service demo" >&2
  exit 1
fi
