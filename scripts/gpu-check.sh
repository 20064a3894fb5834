#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU, PyTorch (CUDA 13 wheels) and python3, but
# no Rust toolchain and no network. Takes what scripts/pack-gpu.sh packed into .gpu/ here and:
#   1. runs the CUDA-vs-CPU parity tests (tests/it/cuda.rs);
#   2. trains GDFQ w4a4 (a short tiny-preset run) on CUDA and on the CPU with the same seed:
#      loss curves side by side, the two students compared by `datafree verify`;
#   3. times GDFQ iterations (warm-up = generator step, then generator + student step) on CUDA
#      at batch 64 and 200, an AutoReCon search + fine-tuning and a CPSC run, and PyTorch's same
#      GDFQ iteration on the same GPU (scripts/gdfq_iteration.py).
# Sized for about 6 minutes on an H200; every step has its own time limit, and what it wrote is
# under $OUT (or ./gpu-out). Exit status: 1 when a parity test failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
step() { echo; echo "== $* ($(date +%T))"; }
die() { echo "gpu-check: error: $*"; exit 2; }

step "unpacking .gpu/ (commit $(cat .gpu/commit 2>/dev/null || echo unknown))"
[ -d .gpu ] || die ".gpu/ is missing: run scripts/pack-gpu.sh where Rust is, and carry .gpu"
bin=/tmp/datafree-gpu
mkdir -p "$bin"
for f in datafree it libonnxruntime.so; do
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    ".gpu/$f.xz" "$bin/$f" || die "could not unpack .gpu/$f.xz"
  chmod +x "$bin/$f"
done
export ORT_DYLIB_PATH="$bin/libonnxruntime.so"
# The tests find the repository's own files (onnx/) where they were built.
built_in="$(cat .gpu/root 2>/dev/null || true)"
if [ -n "$built_in" ] && [ ! -e "$built_in" ]; then
  mkdir -p "$(dirname "$built_in")" && ln -s "$root" "$built_in"
fi

step "CUDA libraries"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# cuBLAS, cuRAND and the runtime of CUDA 13 from the Python wheels PyTorch brought; libcuda
# from the driver.
libs="$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for name in ("libcublas.so.13", "libcurand.so.10", "libcudart.so.13", "libcublasLt.so.13"):
        for f in glob.glob(os.path.join(sp, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing="$(ldd "$bin/datafree" | grep 'not found' || true)"
[ -z "$missing" ] || die "libraries not found: $missing (searched: $libs)"
ldd "$bin/datafree" | grep -E 'cuda|cublas|curand'

step "parity tests, CUDA vs CPU"
timeout 300 "$bin/it" cuda:: --test-threads=1 2>&1 | tee "$out/parity.txt"
parity=${PIPESTATUS[0]}
# On the GPU machine a skipped parity test is a failure: CUDA did not come up.
if grep -q "skipped, no CUDA device" "$out/parity.txt"; then
  echo "gpu-check: the parity tests found no CUDA device"
  parity=1
fi

teacher=onnx/quickstart.onnx
pre=()
if [ -f .gpu/cifar10_resnet20.onnx ]; then
  teacher=.gpu/cifar10_resnet20.onnx
  pre=(--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)
fi
gdfq() { # device batch iters-per-epoch name
  local t0 t1
  t0=$(date +%s.%N)
  timeout 300 "$bin/datafree" compress "$teacher" "${pre[@]}" --method gdfq --bits w4a4 \
    --preset tiny --epochs 2 --warmup-epochs 1 --iters-per-epoch "$3" --batch "$2" \
    --device "$1" --seed 0 --out "$out/$4" --force --json >"$out/$4.json" 2>"$out/$4.err"
  local rc=$?
  t1=$(date +%s.%N)
  echo "$4: exit $rc, $(python3 -c "print(round($t1 - $t0, 1))") s; $(tail -n 1 "$out/$4.err")"
}

step "GDFQ w4a4 on $teacher: CUDA and CPU, same seed, batch 64"
gdfq cuda 64 30 gdfq-cuda-b64
gdfq cpu 64 30 gdfq-cpu-b64
step "GDFQ on CUDA at batch 200"
gdfq cuda 200 10 gdfq-cuda-b200
step "the CUDA student against the CPU one (verify without data)"
timeout 120 "$bin/datafree" verify "$out/gdfq-cuda-b64/student.onnx" \
  --reference "$out/gdfq-cpu-b64/student.onnx" 2>&1 | tail -n 8

step "AutoReCon (search + fine-tuning) and CPSC on CUDA, short budgets"
for dev in cuda cpu; do
  t0=$(date +%s.%N)
  timeout 200 "$bin/datafree" compress "$teacher" "${pre[@]}" --method autorecon --bits w4a4 \
    --preset tiny --search-epochs 1 --search-iters-per-epoch 10 --search-batch 64 \
    --epochs 2 --warmup-epochs 1 --iters-per-epoch 5 --batch 64 --device "$dev" --seed 0 \
    --out "$out/autorecon-$dev" --force >"$out/autorecon-$dev.log" 2>&1
  echo "autorecon $dev: exit $?, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
done
"$bin/datafree" student --arch resnet8 --classes 10 --out "$out/resnet8.onnx" --force >/dev/null
for dev in cuda cpu; do
  t0=$(date +%s.%N)
  timeout 200 "$bin/datafree" compress "$teacher" "${pre[@]}" --method cpsc --bits fp32 \
    --student "$out/resnet8.onnx" --preset quick --epochs 2 --warmup-epochs 1 --iters-per-epoch 5 --batch 64 \
    --device "$dev" --seed 0 --out "$out/cpsc-$dev" --force >"$out/cpsc-$dev.log" 2>&1
  echo "cpsc $dev: exit $?, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
done

step "PyTorch: the same GDFQ iteration on the same GPU"
for b in 64 200; do
  timeout 120 python3 scripts/gdfq_iteration.py --device cuda --batch "$b" | tee "$out/pytorch-b$b.json"
done

step "summary"
python3 - "$out" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]

def iters(name):
    p = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(p):
        return None
    rows = [json.loads(l) for l in open(p)]
    warm, student, prev = [], [], None
    for r in rows:
        if prev is not None:
            (student if r["student_kd"] is not None else warm).append(r["seconds"] - prev)
        prev = r["seconds"]
    return rows, warm, student

def ms(v):
    return f"{1e3 * statistics.median(v):.1f}" if v else "-"

torch = {}
for b in (64, 200):
    try:
        torch[b] = json.loads(open(os.path.join(out, f"pytorch-b{b}.json")).read().strip().splitlines()[-1])
    except Exception:
        torch[b] = {}
print("| run | warm-up iteration ms | generator + student iteration ms | PyTorch warm-up / full ms |")
print("|---|---|---|---|")
for name, b in (("gdfq-cuda-b64", 64), ("gdfq-cpu-b64", 64), ("gdfq-cuda-b200", 200)):
    r = iters(name)
    if r is None:
        print(f"| {name} | failed | | |")
        continue
    t = torch.get(b, {}) if "cuda" in name else {}
    print(f"| {name} | {ms(r[1][1:])} | {ms(r[2][1:])} | {t.get('warmup_ms', '-')} / {t.get('full_ms', '-')} |")
a, c = iters("gdfq-cuda-b64"), iters("gdfq-cpu-b64")
if a and c:
    print("\nloss curves, CUDA vs CPU (iteration: generator CE, BNS, student KD):")
    for x, y in list(zip(a[0], c[0]))[::6]:
        f = lambda r: " ".join(f"{r[k]:.4f}" if r[k] is not None else "-" for k in ("generator_ce", "bns", "student_kd"))
        print(f"  {x['iter']:3d}: cuda {f(x)} | cpu {f(y)}")
for name in ("gdfq-cuda-b64", "gdfq-cpu-b64"):
    try:
        v = json.load(open(os.path.join(out, name + ".json")))["verification_synthetic"]
        print(f"{name}: agreement with the teacher on synthesized images {v['agreement']:.3f}, logit error {v['logit_error']:.3f}")
    except Exception as e:
        print(f"{name}: no report ({e})")
PY
echo
if [ "$parity" -ne 0 ]; then
  echo "gpu-check: parity tests FAILED (exit $parity)"
  exit 1
fi
echo "gpu-check: parity tests passed"
