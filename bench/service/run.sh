#!/usr/bin/env bash
# Runs the service benchmark side by side: starts vqkvd (CPU default, large host tier) and
# redis-server (no persistence) on loopback, runs vqkv_service_bench, stops both.
#   bench/service/run.sh [BUILD_DIR] [vqkv_service_bench flags...]
# Example (the figures in docs/benchmarks.md):
#   bench/service/run.sh build --codecs=raw,rvq --block-tokens=256,16 --clients=1,16 --calls=2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${1:-$ROOT/build}"; shift || true
LOG="$(mktemp -t vqkvd-bench.XXXXXX.log)"
"$BUILD/server/main/vqkvd" --listen=127.0.0.1:0 --host-tier-bytes=12GiB \
    --max-inflight-bytes=4GiB --log-level=warn >"$LOG" 2>&1 &
VQKVD=$!
REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no --loglevel warning >/dev/null 2>&1 &
REDIS=$!
cleanup() { kill -TERM "$VQKVD" "$REDIS" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  ADDR=$(sed -n 's/^vqkvd listening on //p' "$LOG" | head -1)
  [ -n "$ADDR" ] && break
  sleep 0.1
done
[ -n "${ADDR:-}" ] || { cat "$LOG"; echo "vqkvd did not start" >&2; exit 1; }
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB;" \
     "vqkvd $ADDR, redis-server $(redis-server --version | awk '{print $3}') :$REDIS_PORT"
"$BUILD/bench/service/vqkv_service_bench" --vqkvd="$ADDR" --redis="127.0.0.1:$REDIS_PORT" --tcp "$@"
