#!/usr/bin/env bash
# GPU check and benchmark of the KD loss backends, for one CUDA machine (e.g. an H100 / H200).
#
#   bash bench/gpu/run.sh            # build, oracle checks, timings; JSON to $OUT if set
#   PYTHON=/path/to/python bash bench/gpu/run.sh
#   DDK_GPU_PYTEST=1 bash bench/gpu/run.sh   # also run the Triton and cpp tests on the GPU first
#                                            # (DDK_GPU_PYTEST_S caps them, default 150 s)
#   DDK_GPU_DISTILL=1 bash bench/gpu/run.sh # also `ddk distill --fsdp` under torchrun with NCCL (1 GPU)
#   DDK_GPU_STEP=1 bash bench/gpu/run.sh    # also whole distillation steps (bench/gpu/step_bench.py;
#                                            # STEP_BENCH_ARGS, default the 1.5B/0.5B Qwen2 shapes,
#                                            # seq 2048, batch 4, largest batch; DDK_GPU_STEP_S caps it, 300 s)
#   KD_BENCH_ARGS="--divergence jsd" bash bench/gpu/run.sh
#   KD_BENCH_ARGS="--fused-only" bash bench/gpu/run.sh   # only the fused lm_head + KD part
#   DDK_WHEELS=.whl bash bench/gpu/run.sh    # also install the wheels there (default .whl, if present)
#
# kd_bench.py also checks and times the fused lm_head + KD loss (fused_linear_kd_loss, backend
# chunked, vs naive and Liger's LigerFusedLinearJSDLoss). liger_kernel is not in the
# device image: to compare against it, put its wheel (pure Python, py3-none-any) in .whl/ here and
# carry .whl; it is installed with --no-index --no-deps into a temporary folder on PYTHONPATH.
#
# Assumptions (the lent machines have no network): a Python that already holds a CUDA build of
# torch, triton, setuptools, ninja, pytest (the image's `python3`, /opt/torch/.venv there), and
# nvcc. Nothing is downloaded: no venv is created and the install uses --no-index --no-deps. The
# repository's .venv (a CPU build of torch) is never used here. The extension is built for the
# GPU in the machine (TORCH_CUDA_ARCH_LIST from the device, default 9.0 for Hopper).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
START=$(date +%s)
say() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      PY=$(command -v "$cand"); break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "run.sh: no Python with a CUDA build of torch and a visible GPU found (set PYTHON=...)" >&2
  exit 2
fi
say "python: $PY"
"$PY" - <<'EOF'
import torch, shutil
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
print("nvcc", shutil.which("nvcc"))
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export DDK_REQUIRE_EXTENSION=1  # a failed CUDA build is reported, not silently skipped

say "build ddk_kernels._C (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
rm -f ddk_kernels/_C*.so  # a CPU-only build carried from elsewhere must not shadow this one
if ! "$PY" -m pip install --no-build-isolation --no-index --no-deps -e . 2>&1 | tail -n 25; then
  echo "pip install -e . failed; trying setup.py build_ext --inplace" >&2
fi
if ! ls ddk_kernels/_C*.so >/dev/null 2>&1; then
  # An older setuptools in the image may reject pyproject.toml's metadata: build the extension
  # alone in a copy without pyproject.toml, then copy the library back.
  echo "pip install -e . left no ddk_kernels/_C*.so; building it from a copy without pyproject.toml" >&2
  BUILD_DIR=$(mktemp -d /tmp/ddk_ext.XXXXXX)
  cp -r setup.py csrc ddk_kernels "$BUILD_DIR"/
  (cd "$BUILD_DIR" && "$PY" setup.py build_ext --inplace 2>&1 | tail -n 40) || true
  cp "$BUILD_DIR"/ddk_kernels/_C*.so ddk_kernels/ 2>/dev/null || echo "run.sh: the extension build failed" >&2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${DDK_WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "install extra wheels from $WHEELS (no index, no deps): $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
  EXTRA_SITE=$(mktemp -d /tmp/ddk_wheels.XXXXXX)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$EXTRA_SITE" "$WHEELS"/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$EXTRA_SITE"  # ahead of site-packages: carry only what the image lacks
  else
    echo "run.sh: installing the wheels in $WHEELS failed; going on without them" >&2
  fi
fi
"$PY" - <<'EOF'
import torch
from ddk_kernels import cpp
print("cpp backend on cuda:", cpp.is_available("cuda"))
EOF

if [ "${DDK_GPU_PYTEST:-0}" = "1" ]; then
  say "pytest of the Triton and CUDA tests on the GPU (at most ${DDK_GPU_PYTEST_S:-150} s)"
  # -v and the whole log under $OUT: a crash (segfault) shows which test was running
  timeout "${DDK_GPU_PYTEST_S:-150}" "$PY" -m pytest -v -p no:cacheprovider --timeout=60 \
    tests/ddk_kernels/test_kd_rows.py tests/ddk_kernels/test_triton.py tests/ddk_kernels/test_cpp.py \
    tests/ddk_kernels/test_fused_linear_kd.py 2>&1 | tee "${OUT:-/tmp}/pytest_gpu.txt" | grep -v " PASSED" | tail -n 40
fi

if [ "${DDK_GPU_DISTILL:-0}" = "1" ]; then
  say "ddk distill under torchrun on CUDA: one process, NCCL, FSDP2 (bench/gpu/distill_smoke.py)"
  timeout 150 "$PY" bench/gpu/distill_smoke.py 2>&1 | tail -n 8
fi

if [ "${DDK_GPU_STEP:-0}" = "1" ]; then
  say "whole distillation steps: ddk / kd / logits / liger / models (bench/gpu/step_bench.py ${STEP_BENCH_ARGS:-})"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout "${DDK_GPU_STEP_S:-300}" "$PY" bench/gpu/step_bench.py \
    ${STEP_BENCH_ARGS:---preset qwen2-1.5b-0.5b --seq 2048 --batch 4 --max-batch} --out "${OUT:-/tmp}/step_bench.json"
fi

say "oracle checks and timings (bench/gpu/kd_bench.py ${KD_BENCH_ARGS:-})"
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 "$PY" bench/gpu/kd_bench.py ${KD_BENCH_ARGS:-}
rc=$?
say "done (kd_bench exit code $rc)"
exit $rc
