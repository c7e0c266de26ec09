#!/usr/bin/env bash
# The full benchmark suite on a GPU machine, as one prepared script (about 8 minutes on one H100,
# plus about a minute for knowledge_scaling).
#
#   benchmarks/gpu.sh [RESULTS_DIR]       (default: $OUT)
#   ONLY="probe knowledge_scaling" benchmarks/gpu.sh OUT   (some entries; the peaks always run)
#   SUITE_TIMEOUT=900 benchmarks/gpu.sh OUT                (seconds; default 570)
#
# Writes RESULTS_DIR/<backend>-<device-kind>.{json,md} (the suite's usual files), log.txt and
# nvidia-smi.txt. The Python used is $PYTHON, else .venv-gpu/bin/python, else .venv/bin/python,
# else python3; when its JAX sees no GPU and the host has one, the script makes .venv-gpu with
# this package, its bench extra and CUDA JAX ("jax[cuda13]" where nvidia-smi reports a CUDA 13
# driver, else "jax[cuda12]", at the JAX version the CPU environment has; CUDA_EXTRA overrides)
# from the package index, or from a wheel directory given as PIP_FIND_LINKS with PIP_NO_INDEX=1
# on a host without one (INSTALL=0: never install). PyTorch and faiss-cpu are optional (their
# baselines are skipped when missing); the benchmarks themselves download nothing. The suite picks its accelerator sizes itself (larger
# stacks, batches and pools; see each benchmark's SIZES/CONFIGS), and the 8-device aligner check
# runs on forced host devices in a subprocess, as on a CPU machine. knowledge_scaling runs its
# 1-process rows on the first 1, 2, 4, 8 GPUs the host has, and its 2-process row (one GPU each,
# JAX's distributed runtime on loopback) when there are at least two.
set -euo pipefail

OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
  echo "usage: $0 RESULTS_DIR (or set \$OUT)" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GPU_VENV="${GPU_VENV:-.venv-gpu}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$GPU_VENV/bin/python" ]; then PY="$GPU_VENV/bin/python"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
: > "$LOG"

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT_DIR/nvidia-smi.txt"
backend() { "$1" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none; }
BACKEND="$(backend "$PY")"
if [ "$BACKEND" != "gpu" ] && [ "${INSTALL:-1}" = "1" ] && nvidia-smi -L >/dev/null 2>&1; then
  # Set-up: CUDA JAX in a virtual environment of its own (the CPU one stays as it is).
  JAX_VERSION="$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || true)"
  CUDA_MAJOR="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)"
  EXTRA="${CUDA_EXTRA:-$([ "${CUDA_MAJOR:-0}" -ge 13 ] && echo cuda13 || echo cuda12)}"
  SPEC="jax[$EXTRA]${JAX_VERSION:+==$JAX_VERSION}"
  echo "setting up $GPU_VENV: $SPEC and know2vec-jax[bench] (driver CUDA ${CUDA_MAJOR:-?})" | tee -a "$LOG"
  START_SETUP=$(date +%s)
  python3 -m venv "$GPU_VENV"
  "$GPU_VENV/bin/pip" install -q --upgrade pip 2>&1 | tee -a "$LOG"
  # faiss-cpu or torch may be missing from a wheel directory: the bench extra is best effort.
  "$GPU_VENV/bin/pip" install -q -e . "$SPEC" 2>&1 | tee -a "$LOG"
  "$GPU_VENV/bin/pip" install -q -e '.[bench]' 2>&1 | tee -a "$LOG" \
    || echo "bench extra not installed (its baselines are skipped)" | tee -a "$LOG"
  echo "set-up took $(( $(date +%s) - START_SETUP )) s" | tee -a "$LOG"
  PY="$GPU_VENV/bin/python"
  BACKEND="$(backend "$PY")"
fi
echo "python: $PY; jax backend: $BACKEND" | tee -a "$LOG"
if [ "$BACKEND" != "gpu" ] && [ "${ALLOW_CPU:-0}" != "1" ]; then
  echo "error: JAX sees no GPU (backend $BACKEND): no NVIDIA GPU found (nvidia-smi -L), or the CUDA JAX set-up above failed; ALLOW_CPU=1 runs the suite anyway" | tee -a "$LOG" >&2
  exit 1
fi
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import importlib
for name in ("torch", "faiss"):
  try:
    mod = importlib.import_module(name)
    print(f"{name} {getattr(mod, '__version__', '?')}")
  except ImportError:
    print(f"{name}: not installed (its baseline is skipped)")
PY

# The whole suite stays under 9.5 minutes; the timeout keeps a hung run from eating the machine.
# JAX must not preallocate most of the GPU: a CUDA PyTorch baseline and knowledge_scaling's
# worker processes share it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
ARGS=()
for name in ${ONLY:-}; do ARGS+=(--only "$name"); done
START=$(date +%s)
set +e
timeout "${SUITE_TIMEOUT:-570}" "$PY" -m benchmarks --out "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"} 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
echo "suite finished with status $STATUS in $(( $(date +%s) - START )) s" | tee -a "$LOG"
exit "$STATUS"
