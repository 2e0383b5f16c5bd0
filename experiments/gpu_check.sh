#!/usr/bin/env bash
# The GPU check in one call: CUDA tests, an AMP fit, a 2-rank torchrun fit (NCCL on 2 GPUs) and the
# speed figures, into gpu_check.json ($OUT if set, else experiments/results). Without a GPU it runs
# its CPU fallback (gloo, no AMP, tiny sizes, about a minute) and still exits 0 when that passes.
# Options are passed on to experiments/gpu_check.py (--cpu, --skip-speed, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi
exec "$PY" experiments/gpu_check.py "$@"
