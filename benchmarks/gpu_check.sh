#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one command, one JSON, one table.
#   benchmarks/gpu_check.sh            full check on the GPU (at most 8 minutes on one H200)
#   benchmarks/gpu_check.sh --tiny     ResNet-18, 64 px, CPU, about a minute (CI runs this)
# Runs from the repository root with the active Python, else the README's .venv, else python3.
# Options are gpu_check.py's (--out, --device, --sections, --budget-scale, --threads).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true
if [[ -n "${PYTHON:-}" ]]; then
  python_bin=$PYTHON
elif [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
  python_bin=.venv/bin/python
else
  python_bin=$(command -v python || command -v python3)
fi
exec "$python_bin" benchmarks/gpu_check.py "$@"
