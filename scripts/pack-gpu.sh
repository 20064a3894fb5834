#!/usr/bin/env bash
# Builds the `cuda` binaries here (a CPU machine) and packs what scripts/gpu-check.sh needs on a
# GPU machine without Rust or network into .gpu/ (git-ignored, compressed to fit a 64 MiB
# transfer): the datafree binary, the integration-test binary, ONNX Runtime's library and,
# when ../shared is present, the cifar10_resnet20 teacher.
#
#   scripts/setup-cuda.sh && scripts/pack-gpu.sh
#   # then, on the GPU machine, from the repository root: scripts/gpu-check.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { echo "pack-gpu: $*" >&2; }
die() { echo "pack-gpu: error: $*" >&2; exit 1; }

[ -f .cuda/env.sh ] || die "run scripts/setup-cuda.sh first"
[ -f .ort/libonnxruntime.so ] || die "run scripts/setup.sh first (ONNX Runtime)"
command -v xz >/dev/null || die "xz is needed (Debian: apt-get install xz-utils)"
# shellcheck disable=SC1091
. .cuda/env.sh
target=target/cuda
say "building with --features cuda into $target (about 20 minutes from scratch on 2 cores)"
cargo build --release --features cuda --target-dir "$target" --bin datafree
tests="$(cargo test --release --features cuda --target-dir "$target" --test it --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "it":
        print(m["executable"])' | tail -n 1)"
[ -n "$tests" ] && [ -x "$tests" ] || die "could not find the integration-test binary"

rm -rf .gpu.tmp && mkdir -p .gpu.tmp
xz -T0 -6 -c "$target/release/datafree" >.gpu.tmp/datafree.xz
xz -T0 -6 -c "$tests" >.gpu.tmp/it.xz
xz -T0 -6 -c "$(readlink -f .ort/libonnxruntime.so)" >.gpu.tmp/libonnxruntime.so.xz
if [ -f ../shared/teachers/cifar10_resnet20.onnx ]; then
  cp ../shared/teachers/cifar10_resnet20.onnx .gpu.tmp/
else
  say "../shared absent: the device run uses the quick-start teacher only"
fi
git rev-parse HEAD >.gpu.tmp/commit 2>/dev/null || true
echo "$root" >.gpu.tmp/root
rm -rf .gpu && mv .gpu.tmp .gpu
say "packed $(du -sh .gpu | cut -f1) into .gpu/: $(ls .gpu | tr '\n' ' ')"
