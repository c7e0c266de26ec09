#!/usr/bin/env bash
# The full benchmark suite on a GPU machine, as one prepared script (about 8 minutes on one H100,
# plus about a minute for knowledge_scaling).
#
#   benchmarks/gpu.sh [RESULTS_DIR]       (default: $OUT)
#   ONLY="probe knowledge_scaling" benchmarks/gpu.sh OUT   (some entries; the peaks always run)
#   SUITE_TIMEOUT=900 benchmarks/gpu.sh OUT                (seconds; default 570)
#
# Writes RESULTS_DIR/<backend>-<device-kind>.{json,md} (the suite's usual files), log.txt and
# nvidia-smi.txt. Needs a Python with jax[cuda] and this package installed: $PYTHON, else
# .venv/bin/python, else python3. PyTorch and faiss-cpu are optional (their baselines are skipped
# when missing); nothing is downloaded. The suite picks its accelerator sizes itself (larger
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
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT_DIR/nvidia-smi.txt"
BACKEND="$("$PY" -c 'import jax; print(jax.default_backend())')"
echo "python: $PY; jax backend: $BACKEND" | tee "$LOG"
if [ "$BACKEND" != "gpu" ] && [ "${ALLOW_CPU:-0}" != "1" ]; then
  echo "error: JAX sees no GPU (backend $BACKEND); install jax[cuda] or set ALLOW_CPU=1" | tee -a "$LOG" >&2
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
