#!/usr/bin/env bash
# Puts ONNX Runtime's shared library (from the PyPI `onnxruntime` wheel) into .ort/ of this project.
# Idempotent: a verified library already in place is kept. Checksums are pinned below; the library
# is written under a temporary name and renamed into place, so an interrupted run leaves nothing half-written.
# Offline use: DATAFREE_ORT_WHEEL=/path/to/onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl scripts/setup.sh
set -euo pipefail

ORT_VERSION="1.31.1"
WHEEL="onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_SHA256="5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f"
LIB="libonnxruntime.so.${ORT_VERSION}"
LIB_SHA256="fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.ort"
say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

link_name() {
  # Atomic symlink replacement: make it beside, then rename over.
  ln -sfn "$LIB" "$dest/.libonnxruntime.so.tmp"
  mv -T "$dest/.libonnxruntime.so.tmp" "$dest/libonnxruntime.so"
}

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  die "this script fetches the Linux x86_64 build of ONNX Runtime; on $(uname -s)-$(uname -m) put libonnxruntime (>= 1.31) somewhere and set ORT_DYLIB_PATH to it"
fi
command -v sha256sum >/dev/null || die "sha256sum is missing (Debian: apt-get install coreutils)"

if [ -f "$dest/$LIB" ] && [ "$(sha256_of "$dest/$LIB")" = "$LIB_SHA256" ]; then
  link_name
  say "ONNX Runtime $ORT_VERSION already in $dest (checksum ok)"
  exit 0
fi

mkdir -p "$dest"
work="$(mktemp -d "$dest/.download.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [ -n "${DATAFREE_ORT_WHEEL:-}" ]; then
  [ -f "$DATAFREE_ORT_WHEEL" ] || die "DATAFREE_ORT_WHEEL=$DATAFREE_ORT_WHEEL does not exist"
  cp "$DATAFREE_ORT_WHEEL" "$work/$WHEEL"
else
  py="$(command -v python3 || command -v python || true)"
  [ -n "$py" ] || die "python3 is needed to download the onnxruntime wheel with pip (Debian: apt-get install python3-pip), or set DATAFREE_ORT_WHEEL to a downloaded $WHEEL"
  "$py" -m pip --version >/dev/null 2>&1 || die "pip is missing for $py (Debian: apt-get install python3-pip), or set DATAFREE_ORT_WHEEL to a downloaded $WHEEL"
  say "downloading onnxruntime==$ORT_VERSION wheel from PyPI (about 24 MB)"
  # --platform/--abi fetch the Linux x86_64 wheel whatever the local Python is.
  if ! "$py" -m pip download --quiet --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
      "onnxruntime==$ORT_VERSION" -d "$work" >"$work/pip.log" 2>&1; then
    tail -n 5 "$work/pip.log" >&2
    die "pip could not download onnxruntime==$ORT_VERSION (is PyPI reachable?)"
  fi
fi

[ -f "$work/$WHEEL" ] || die "expected $WHEEL after download; got: $(ls "$work")"
got="$(sha256_of "$work/$WHEEL")"
[ "$got" = "$WHEEL_SHA256" ] || die "checksum mismatch for $WHEEL: got $got, expected $WHEEL_SHA256"

# A wheel is a zip; Python's zipfile avoids needing unzip.
"${py:-python3}" - "$work/$WHEEL" "$work/$LIB" "onnxruntime/capi/$LIB" <<'PY' || die "could not extract $LIB from the wheel"
import shutil, sys, zipfile
wheel, out, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
got="$(sha256_of "$work/$LIB")"
[ "$got" = "$LIB_SHA256" ] || die "checksum mismatch for $LIB: got $got, expected $LIB_SHA256"

chmod 0755 "$work/$LIB"
mv -f "$work/$LIB" "$dest/$LIB"
link_name
say "ONNX Runtime $ORT_VERSION installed in $dest"
