#!/usr/bin/env bash
# Starts vqkvd on the embedded CPU default (127.0.0.1, ephemeral port, host tier, CPU codec), runs
# `vqkv demo` against it, then stops the daemon with SIGTERM and checks it exited cleanly.
#   scripts/service-demo.sh [BUILD_DIR] [vqkv demo flags...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"; shift || true
LOG="$(mktemp -t vqkvd.XXXXXX.log)"
"$BUILD/server/main/vqkvd" --listen=127.0.0.1:0 >"$LOG" 2>&1 &
PID=$!
cleanup() { kill -TERM "$PID" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  ADDR=$(sed -n 's/^vqkvd listening on //p' "$LOG" | head -1)
  [ -n "$ADDR" ] && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "vqkvd exited early" >&2; exit 1; }
  sleep 0.1
done
[ -n "${ADDR:-}" ] || { cat "$LOG"; echo "vqkvd did not report its address" >&2; exit 1; }
echo "vqkvd (pid $PID) listening on $ADDR; log: $LOG"
"$BUILD/client/cpp/cli/vqkv" demo --target "$ADDR" "$@"
trap - EXIT
kill -TERM "$PID"
if wait "$PID"; then
  echo "vqkvd stopped cleanly on SIGTERM"
else
  rc=$?; tail -20 "$LOG"; echo "vqkvd exited with status $rc" >&2; exit 1
fi
