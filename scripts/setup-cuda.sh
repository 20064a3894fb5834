#!/usr/bin/env bash
# Puts what `cargo build --release --features cuda` needs into .cuda/ of this project, on any
# Linux x86_64 machine, with or without a GPU: CUDA 13.0's compiler, headers and the libraries
# candle links (cuBLAS, cuBLASLt, cuRAND, NVRTC, the runtime), all from PyPI wheels, plus a stub
# libcuda.so.1 to link against (the real one is the GPU driver's and is loaded at run time).
#
#   scripts/setup-cuda.sh            # once (about 800 MB of wheels, 1.6 GB unpacked)
#   . .cuda/env.sh                   # in each shell that builds
#   cargo build --release --features cuda
#
# CUDA 13.0 is pinned on purpose: PTX from a newer compiler does not load on a 13.0 driver.
# CUDA_COMPUTE_CAP (default 90, Hopper) picks the PTX target of candle's kernels; the driver
# compiles that PTX for the GPU it finds, so it also runs on newer GPUs, not on older ones.
# Idempotent (a finished install is kept); checksums are pinned; the toolkit is assembled in a
# temporary folder and renamed into place, so an interrupted run leaves nothing half-written.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cuda"
say() { echo "setup-cuda: $*" >&2; }
die() { echo "setup-cuda: error: $*" >&2; exit 1; }

# wheel file name, sha256
WHEELS=(
  "nvidia_cuda_nvcc-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
  "nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
  "nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
  "nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
  "nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575"
  "nvidia_curand-10.4.0.35-py3-none-manylinux_2_27_x86_64.whl 1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc"
  "nvidia_cublas-13.1.0.3-py3-none-manylinux_2_27_x86_64.whl ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171"
)

write_env() {
  local tmp="$dest/.env.sh.tmp"
  cat >"$tmp" <<EOF
# Source this before \`cargo build --release --features cuda\` (written by scripts/setup-cuda.sh).
export CUDA_ROOT="$dest/toolkit"
export PATH="$dest/toolkit/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
EOF
  mv -f "$tmp" "$dest/env.sh"
}

if [ -f "$dest/toolkit/.complete" ]; then
  write_env
  say "CUDA 13.0 toolkit already in $dest/toolkit; now: . .cuda/env.sh && cargo build --release --features cuda"
  exit 0
fi
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "the PyPI CUDA wheels pinned here are for Linux x86_64, not $(uname -s)-$(uname -m)"
py="$(command -v python3 || command -v python || true)"
[ -n "$py" ] || die "python3 with pip is needed to download the CUDA wheels (Debian: apt-get install python3-pip)"
"$py" -m pip --version >/dev/null 2>&1 || die "pip is missing for $py (Debian: apt-get install python3-pip)"
command -v cc >/dev/null || die "a C compiler (cc) is needed for nvcc and the libcuda stub (Debian: apt-get install gcc)"

mkdir -p "$dest/wheels"
work="$(mktemp -d "$dest/.toolkit.XXXXXX")"
trap 'rm -rf "$work"' EXIT

for entry in "${WHEELS[@]}"; do
  read -r whl sum <<<"$entry"
  if [ ! -f "$dest/wheels/$whl" ] || [ "$(sha256sum "$dest/wheels/$whl" | cut -d' ' -f1)" != "$sum" ]; then
    name="$(echo "$whl" | cut -d- -f1 | tr _ -)"
    version="$(echo "$whl" | cut -d- -f2)"
    say "downloading $name==$version"
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux2010_x86_64 "$name==$version" -d "$work/dl" >"$work/pip.log" 2>&1 ||
      { tail -n 5 "$work/pip.log" >&2; die "pip could not download $name==$version (is PyPI reachable?)"; }
    [ -f "$work/dl/$whl" ] || die "expected $whl after download; got: $(ls "$work/dl")"
    mv -f "$work/dl/$whl" "$dest/wheels/$whl"
  fi
  got="$(sha256sum "$dest/wheels/$whl" | cut -d' ' -f1)"
  [ "$got" = "$sum" ] || die "checksum mismatch for $whl: got $got, expected $sum"
done

say "unpacking"
"$py" - "$work/unpacked" "$dest"/wheels/*.whl <<'PY' || die "could not unpack the wheels"
import sys, zipfile
out, wheels = sys.argv[1], sys.argv[2:]
for w in wheels:
    with zipfile.ZipFile(w) as z:
        for m in z.infolist():
            if m.filename.startswith("nvidia/cu13/"):
                z.extract(m, out)
PY
tk="$work/toolkit"
mv "$work/unpacked/nvidia/cu13" "$tk"
# Zip files keep no permissions; nvcc runs these.
chmod 0755 "$tk"/bin/* "$tk"/nvvm/bin/* 2>/dev/null || true
# nvcc.profile looks for headers and libraries under targets/x86_64-linux, as in NVIDIA's installers.
mkdir -p "$tk/targets/x86_64-linux"
ln -s ../../include "$tk/targets/x86_64-linux/include"
ln -s ../../lib "$tk/targets/x86_64-linux/lib"
# The linker wants unversioned names.
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  [ -f "$tk/lib/$lib" ] || die "$lib missing from the wheels"
  ln -s "$lib" "$tk/lib/${lib%.so.*}.so"
done

# The driver library is not on PyPI: a stub with its soname and every entry point cuda.h declares
# (macros resolved, so versioned names such as cuMemAlloc_v2 are the ones defined), as NVIDIA's
# own lib/stubs/libcuda.so is. Each returns CUDA_ERROR_STUB_LIBRARY (34) if it is ever called.
say "building the libcuda stub"
mkdir -p "$tk/lib/stubs"
{
  cc -E -P -I"$tk/include" -x c "$tk/include/cuda.h"
  cat "$tk/include/cuda.h"
} | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
  awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$work/cuda_stub.c"
[ "$(wc -l <"$work/cuda_stub.c")" -gt 300 ] || die "found too few driver entry points in cuda.h for the stub"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib/stubs/libcuda.so" "$work/cuda_stub.c" ||
  die "could not build the libcuda stub"

"$tk/bin/nvcc" --version >/dev/null || die "the unpacked nvcc does not run"
touch "$tk/.complete"
rm -rf "$dest/toolkit"
mv "$tk" "$dest/toolkit"
write_env
say "CUDA 13.0 toolkit installed in $dest/toolkit ($(du -sh "$dest/toolkit" | cut -f1))"
say "now: . .cuda/env.sh && cargo build --release --features cuda"
