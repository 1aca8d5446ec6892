#!/usr/bin/env bash
# The service benchmark on a GPU machine: vqkvd with the GPU on (rvq-cuda / scalar-cuda codecs,
# codes in the HBM tier) and, in the same run, vqkvd with --gpu=off (CPU codecs, host tier),
# each measured with vqkv_service_bench on loopback (no redis there). Run from a folder made by
# ../shared/tools/device-pack with vqkvd and vqkv_service_bench in it:
#   bench/service/run_gpu.sh PACK_DIR [vqkv_service_bench flags...]
# e.g. bench/service/run_gpu.sh .device --codecs=raw,rvq,scalar-2 --block-tokens=256,16 \
#        --clients=1,16 --calls=4 --rvq-stages=56x1024,16x512
# The --gpu=off pass uses the codecs in $OFF_CODECS (default raw,scalar-2): the CPU rvq encoder
# needs seconds per 8B block. Logs go to $OUT (default ./out).
set -uo pipefail
PACK="$(cd "${1:?usage: run_gpu.sh PACK_DIR [bench flags]}" && pwd)"; shift
OUT=${OUT:-out}
mkdir -p "$OUT"
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB;" \
     "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
rc=0
for mode in ${MODES:-on off}; do
  LOG="$OUT/vqkvd-gpu-$mode.log"
  "$PACK/run" vqkvd --listen=127.0.0.1:0 --gpu=$mode --host-tier-bytes=48GiB \
      --max-inflight-bytes=8GiB --log-level=info >"$LOG" 2>&1 &
  PID=$!
  ADDR=""
  for _ in $(seq 1 200); do
    ADDR=$(sed -n 's/^vqkvd listening on //p' "$LOG" | head -1)
    [ -n "$ADDR" ] && break
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$ADDR" ]; then
    cat "$LOG"; echo "vqkvd --gpu=$mode did not start" >&2; rc=1; continue
  fi
  echo
  echo "## vqkvd --gpu=$mode ($(grep -m1 -oE 'GPU [0-9]+ \(.*|GPU off.*' "$LOG" || echo 'no GPU line'))"
  extra=()
  [ "$mode" = off ] && extra=(--codecs="${OFF_CODECS:-raw,scalar-2}")
  timeout "${BENCH_T:-240}" "$PACK/run" vqkv_service_bench --vqkvd="$ADDR" "$@" "${extra[@]}" \
    2>&1 | tee "$OUT/bench-gpu-$mode.md" || rc=1
  kill -TERM "$PID"; wait "$PID" || true
done
exit $rc
