#!/usr/bin/env bash
# The fidelity command as a user runs it: per-context budgets, outlier rows and --codebook-cache
# (a second run with the same settings loads the fits and prints the same table).
# Usage: fidelity_cli_test.sh VQKV_BINARY MODEL_DIR
set -euo pipefail
vqkv=$1
model=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
args=(fidelity --model "$model" --contexts 128,256 --eval-tokens 512 --budgets 128:2.2,256:2.5
      --outliers 1 --baselines=false --iters 1 --max-stages 3,3 --max-vectors 2048
      --code-spaces none --codebook-cache "$tmp/cache")
fail() { echo "FAIL: $*"; exit 1; }

"$vqkv" "${args[@]}" >"$tmp/a.out" 2>"$tmp/a.err" || { cat "$tmp/a.err"; fail "first run"; }
"$vqkv" "${args[@]}" >"$tmp/b.out" 2>"$tmp/b.err" || { cat "$tmp/b.err"; fail "second run"; }
grep -q "fit: loaded" "$tmp/b.err" || fail "second run did not load the cached fit"
grep -q "fit: loaded" "$tmp/a.err" && fail "first run claims a cached fit"
ls "$tmp/cache"/fit-*.safetensors >/dev/null || fail "no cached codebook written"
cmp -s <(grep '^|' "$tmp/a.out") <(grep '^|' "$tmp/b.out") || fail "tables differ after loading"
# Each budget row only at its context; each with an outlier twin that costs more bits.
[ "$(grep -c '^| 128 | rvq fit --bits 2.2 ' "$tmp/a.out")" = 2 ] || fail "128-token rows"
[ "$(grep -c '^| 256 | rvq fit --bits 2.5 ' "$tmp/a.out")" = 2 ] || fail "256-token rows"
grep -q '^| 128 | rvq fit --bits 2.5' "$tmp/a.out" && fail "a 256-only budget evaluated at 128"
awk -F'|' '$3 ~ /rvq fit --bits 2.5/ {print $5}' "$tmp/a.out" >"$tmp/bits"
[ "$(wc -l <"$tmp/bits")" = 2 ] || fail "bits rows"
awk "NR==1{a=\$1} NR==2{exit !(\$1 > a)}" "$tmp/bits" || fail "outlier row does not cost more bits: $(tr "\n" " " <"$tmp/bits")"
# --split-objective kl: per-layer sensitivities measured once (then loaded from the cache), a
# kl-weighted row next to each plain one, within the same code budget.
"$vqkv" "${args[@]}" --split-objective attn,kl >"$tmp/k.out" 2>"$tmp/k.err" || { cat "$tmp/k.err"; fail "kl run"; }
grep -q "layer sensitivity.*held-out sequences" "$tmp/k.err" || fail "no sensitivity table"
grep -q "sum of per-layer KL" "$tmp/k.err" || fail "no additivity check"
[ "$(grep -c '^| 128 | rvq fit --bits 2.2 kl-weighted' "$tmp/k.out")" = 2 ] || fail "kl rows at 128"
[ "$(grep -c '^| 256 | rvq fit --bits 2.5 kl-weighted' "$tmp/k.out")" = 2 ] || fail "kl rows at 256"
awk -F'|' '$3 ~ /kl-weighted/ && $3 !~ /outliers/ {print $6}' "$tmp/k.out" >"$tmp/kbits"
awk '{ if ($1 > 2.5 + 1e-9) exit 1 }' "$tmp/kbits" || fail "kl row over its code budget: $(tr "\n" " " <"$tmp/kbits")"
ls "$tmp/cache"/sens-*.txt >/dev/null || fail "no cached sensitivities"
"$vqkv" "${args[@]}" --split-objective kl >"$tmp/l.out" 2>"$tmp/l.err" || { cat "$tmp/l.err"; fail "second kl run"; }
grep -q "layer sensitivity: loaded" "$tmp/l.err" || fail "sensitivities not loaded from the cache"
grep -q '^| 128 | rvq fit --bits 2.2 \[\|^| 128 | rvq fit --bits 2.2 |' "$tmp/l.out" && fail "plain rows with --split-objective kl"
# The weights go to a file that `vqkv fit --bits --layer-weights` takes.
"$vqkv" "${args[@]}" --split-objective kl --sensitivity-pack --layer-weights-out "$tmp/w.txt" \
  >"$tmp/p.out" 2>"$tmp/p.err" || { cat "$tmp/p.err"; fail "packed kl run"; }
grep -q "joined into [0-9]* context" "$tmp/p.err" || fail "packed sensitivity not reported"
[ "$(grep -vc '^#' "$tmp/w.txt")" = 2 ] || fail "layer weights file: $(cat "$tmp/w.txt")"
"$vqkv" capture --model "$model" --max-seqs 8 --max-tokens 128 --out "$tmp/s.safetensors" >"$tmp/s.out" 2>/dev/null ||
  fail "capture"
"$vqkv" fit --samples "$tmp/s.safetensors" --bits 2.5 --iters 1 --layer-weights "$tmp/w.txt" \
  --out "$tmp/cb.safetensors" >"$tmp/f.out" 2>"$tmp/f.err" || { cat "$tmp/f.err"; fail "fit with weights"; }
grep -q "weight" "$tmp/f.out" || fail "fit did not use the weights"
printf '1\n2\n3\n' >"$tmp/w3.txt"
if "$vqkv" fit --samples "$tmp/s.safetensors" --bits 2.5 --iters 1 --layer-weights "$tmp/w3.txt" \
  --out "$tmp/cb3.safetensors" >/dev/null 2>"$tmp/f3.err"; then fail "3 weights for 2 layers accepted"; fi
grep -q "holds 3 weights but the samples have 2 layers" "$tmp/f3.err" || fail "weights count message"
if "$vqkv" "${args[@]}" --split-objective mse >/dev/null 2>"$tmp/m.err"; then fail "unknown objective accepted"; fi
grep -q "use attn, kl or attn,kl" "$tmp/m.err" || fail "objective error message"
# --exact-tokens (diagnostic): BOS positions read exact; the rows say so, bits do not change,
# and an id outside the vocabulary is refused.
"$vqkv" "${args[@]}" --exact-tokens bos >"$tmp/e.out" 2>"$tmp/e.err" || { cat "$tmp/e.err"; fail "exact-tokens run"; }
grep -q 'diagnostic: token ids [0-9]* read exact' "$tmp/e.out" || fail "exact-tokens rows not labelled"
cmp -s <(awk -F'|' '$3 ~ /rvq fit/ {print $5}' "$tmp/a.out") \
       <(awk -F'|' '$3 ~ /rvq fit/ {print $5}' "$tmp/e.out") || fail "exact-tokens changed the bits"
if "$vqkv" "${args[@]}" --exact-tokens 99999999 >/dev/null 2>"$tmp/x.err"; then fail "bad token id accepted"; fi
grep -q "is neither bos nor a token id of the model" "$tmp/x.err" || fail "exact-tokens error message"
# A budget for a context that is not evaluated is an error, not a silent no-op.
if "$vqkv" fidelity --model "$model" --contexts 128 --budgets 512:2.2 >/dev/null 2>"$tmp/c.err"; then
  fail "unknown budget context accepted"
fi
grep -q "names a context that --contexts does not list" "$tmp/c.err" || fail "error message"
# --calib-generate: model-written stories join the fit (never the held-out split sequences), are
# cached as text and loaded by a second run, which prints the same table.
gargs=("${args[@]}" --calib-generate 600 --generate-story 96)
"$vqkv" "${gargs[@]}" >"$tmp/g.out" 2>"$tmp/g.err" || { cat "$tmp/g.err"; fail "generate run"; }
grep -q "model-written stories$" "$tmp/g.err" || fail "no generation reported"
ls "$tmp/cache"/gen-*.txt >/dev/null || fail "no cached model-written stories"
fit_real=$(sed -n 's/.*codebooks fitted on [0-9]* sequences (\([0-9]*\) tokens).*/\1/p' "$tmp/g.err")
fit_all=$(sed -n 's/^fitting on \([0-9]*\) tokens: \([0-9]*\) of calibration text + \([0-9]*\) model-written$/\1 \2 \3/p' "$tmp/g.err")
read -r all real gen <<<"$fit_all"
[ -n "${gen:-}" ] && [ "$gen" -ge 500 ] && [ "$real" = "$fit_real" ] && [ "$all" = $((real + gen)) ] ||
  fail "fit set: '$fit_all' (held-out split: $fit_real real tokens)"
"$vqkv" "${gargs[@]}" >"$tmp/h.out" 2>"$tmp/h.err" || { cat "$tmp/h.err"; fail "second generate run"; }
grep -q "calib-generate: loaded" "$tmp/h.err" || fail "stories not loaded from the cache"
cmp -s <(grep '^|' "$tmp/g.out") <(grep '^|' "$tmp/h.out") || fail "generate tables differ after loading"
cmp -s <(grep '^|' "$tmp/g.out") <(grep '^|' "$tmp/a.out") && fail "generated text changed nothing"
if "$vqkv" "${args[@]}" --calib-generate 100 --generate-top-p 0 >/dev/null 2>"$tmp/t.err"; then
  fail "top-p 0 accepted"
fi
grep -q "generate-top-p must be" "$tmp/t.err" || fail "top-p error message"
# capture --generate: the samples file holds the stories' tokens and the model-written ones.
"$vqkv" capture --model "$model" --max-seqs 8 --max-tokens 128 --generate 300 --generate-story 64 \
  --generate-out "$tmp/gen.txt" --out "$tmp/sg.safetensors" >"$tmp/cg.out" 2>"$tmp/cg.err" ||
  { cat "$tmp/cg.err"; fail "capture --generate"; }
base=$(sed -n 's/^wrote .*: 2 layers, \([0-9]*\) tokens.*/\1/p' "$tmp/s.out")
with=$(sed -n 's/^wrote .*: 2 layers, \([0-9]*\) tokens.*/\1/p' "$tmp/cg.out")
gen=$(sed -n 's/^captured \([0-9]*\) model-written tokens.*/\1/p' "$tmp/cg.err")
[ -n "$gen" ] && [ "$gen" -ge 250 ] && [ "$with" = $((base + gen)) ] || fail "capture --generate: $with tokens, $gen generated"
[ "$(grep -c '<|endoftext|>' "$tmp/gen.txt")" -ge 2 ] || fail "generated stories file"
echo "PASS"
