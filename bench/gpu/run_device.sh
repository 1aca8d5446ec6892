#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, compute-sanitizer (memcheck, racecheck) on a subset of
# them, the benchmarks and the PyTorch side-by-side. Run from the repository root after
# packing the binaries here (see docs/gpu.md):
#   ../shared/tools/device-pack build-cuda/tests/gpu/vqkv_gpu_tests build-cuda/bench/gpu/gpu_bench
#   bench/gpu/run_device.sh [all|tests|sanitize|bench|torch|fit] ...
# Logs go to $OUT (default ./out); each step has its own time limit so one hang cannot eat
# the whole call. Prints a short summary last. TESTS_FILTER, MEMCHECK_FILTER, RACECHECK_FILTER
# (gtest filters) and BENCH_ARGS narrow the steps, e.g. the scalar codec alone:
#   TESTS_FILTER='*Scalar*' MEMCHECK_FILTER='*Scalar*' RACECHECK_FILTER='*Scalar*' \
#   BENCH_ARGS=--skip=encode,decode,cublas,fit bench/gpu/run_device.sh tests sanitize bench
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
here=$(pwd)/.device
cuda_dirs=$(ls -d /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null | paste -sd: -)
export LD_LIBRARY_PATH="$here/lib${cuda_dirs:+:$cuda_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
steps=${*:-all}
want() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }
summary=()

date -u +"%Y-%m-%dT%H:%M:%SZ" | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  2>&1 | tee "$OUT/smi.txt"

if want tests; then
  timeout ${TESTS_T:-300} "$here/bin/vqkv_gpu_tests" --gtest_brief=1 --gtest_filter="${TESTS_FILTER:-*}" \
    >"$OUT/gpu_tests.log" 2>&1
  rc=$?
  summary+=("tests rc=$rc: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/gpu_tests.log" | tr '\n' ' ')")
  grep -E '^\[  FAILED|Failure|error' "$OUT/gpu_tests.log" | head -n 30
fi

if want sanitize || want memcheck; then
  filt='*RvqEncodeTest*/one_token:*RvqEncodeTest*/d64_bf16:*RvqEncodeTest*/per_head:*RvqEncodeTest*/layer_range:*RvqEncodeTest*/tiny_codebooks:*RvqEncodeTest*/d96_f32:*RvqEncodeTest*/d256:*RvqEncodeTest*/odd_dim_exact:*RvqEncodeTest*/variant1_per_head:RvqEncodeBatch.*:RvqEncodeErrors.*:*RvqDecodeLayoutTest*f16tab_d64:*RvqDecodeLayoutTest*_d80:*RvqDecodeLayoutTest*/sglang_f16_f32tab_d256:*RvqDecodeLayoutTest*/trtllm_bf16_f16tab_d96:*RvqDecodeLayoutTest*/contiguous_f16_f16tab_d128:RvqDecodeErrors.*:*ScalarTest*:ScalarBatch.*:ScalarErrors.*:CudaCodecs.*:*FitTest*/d64_per_head:*FitTest*/fewer_points_than_k:FitErrors.*'
  timeout ${MEMCHECK_T:-240} "$CS" --tool memcheck --leak-check no --error-exitcode 99 \
    "$here/bin/vqkv_gpu_tests" --gtest_brief=1 --gtest_filter="${MEMCHECK_FILTER:-$filt}" >"$OUT/memcheck.log" 2>&1
  rc=$?
  summary+=("memcheck rc=$rc: $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -n 1)")
fi
if want sanitize || want racecheck; then
  # variant15 / variant15_layer_range (the default) and variant13 / variant13_layer_range: the
  # ping-pong tiles with ring refills (the producer warp reusing slots the consumers released).
  rfilt='*RvqEncodeTest*/one_token:*RvqEncodeTest*/variant15:*RvqEncodeTest*/variant15_layer_range:*RvqEncodeTest*/variant13:*RvqEncodeTest*/variant13_layer_range:*RvqEncodeTest*/variant1_per_head:*RvqEncodeTest*/d96_f32:*RvqEncodeTest*/d64_bf16:*RvqEncodeTest*/d256:*RvqDecodeLayoutTest*/vllm_f16_f16tab_d64:*ScalarTest*/group7_f32:*ScalarTest*/odd_dim33:*FitTest*/fewer_points_than_k:*FitTest*/d64_per_head'
  timeout ${RACECHECK_T:-200} "$CS" --tool racecheck --error-exitcode 99 \
    "$here/bin/vqkv_gpu_tests" --gtest_brief=1 --gtest_filter="${RACECHECK_FILTER:-$rfilt}" >"$OUT/racecheck.log" 2>&1
  rc=$?
  summary+=("racecheck rc=$rc: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.log" | tail -n 1)")
fi

if want bench; then
  timeout ${BENCH_T:-300} "$here/bin/gpu_bench" --skip=fit ${BENCH_ARGS:-} >"$OUT/gpu_bench.log" 2>&1
  summary+=("bench rc=$?")
fi

if want fit; then
  VQKV_FIT_PROFILE=1 timeout ${FIT_T:-240} "$here/bin/gpu_bench" --skip=ceilings,encode,decode,cublas,scalar ${FIT_ARGS:-} \
    >"$OUT/gpu_fit.log" 2>&1
  summary+=("fit rc=$?")
fi

if want profile; then
  # Hardware counters of the encode (variant 0) and decode kernels, and the encode SASS mix.
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis --section InstructionStats"
  for what in ${PROFILE_WHAT:-encode decode}; do
    case $what in
      encode) kern="RvqEncode(Tc|Wgmma|WgmmaPipe|PingPong)Kernel"; args="--skip=ceilings,decode,cublas,scalar,fit --tokens=1024 --reps=1" ;;
      decode) kern=RvqDecodeKernel; args="--skip=ceilings,encode,cublas,scalar,fit --decode_tokens=4096 --reps=1" ;;
      scalarq) kern="(^|[^e])Quantize[KV]"; args="--skip=ceilings,encode,decode,cublas,fit --scalar_tokens=8192 --reps=1" ;;
      scalard) kern="Dequantize[KV]"; args="--skip=ceilings,encode,decode,cublas,fit --scalar_tokens=8192 --reps=1" ;;
    esac
    timeout ${PROFILE_T:-150} "$NCU" --clock-control none -k "regex:$kern" --launch-count ${PROFILE_LAUNCHES:-1} \
      $sections "$here/bin/gpu_bench" $args >"$OUT/ncu_$what.txt" 2>&1
    summary+=("ncu $what rc=$?")
  done
  OBJ=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
  "$OBJ" -sass "$here/bin/gpu_bench" 2>/dev/null | awk '/Function : /{p = ($0 ~ /RvqEncodeTcKernel/ && $0 ~ /ILi128ELi2ELi4ELi2ELi2ELi2ELi2ELb0E/)} p' >"$OUT/sass_encode.txt"
  { echo "instruction mix of RvqEncodeTcKernel<Cfg0<128>>:";
    grep -oE '^ +/\*[0-9a-f]+\*/ +[A-Z0-9_.]+' "$OUT/sass_encode.txt" | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -n 25; } >"$OUT/sass_mix.txt"
  summary+=("sass lines=$(wc -l <"$OUT/sass_encode.txt")")
fi

if want torch; then
  PYTHONUNBUFFERED=1 timeout ${TORCH_T:-200} python3 bench/gpu/torch_baseline.py >"$OUT/torch.log" 2>&1
  summary+=("torch rc=$?")
fi

echo "==== summary"
printf '%s\n' "${summary[@]}"
grep -h '^RESULT' "$OUT"/gpu_bench.log "$OUT"/gpu_fit.log "$OUT"/torch.log 2>/dev/null | cut -c1-230
