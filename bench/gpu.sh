#!/usr/bin/env bash
# One prepared GPU benchmark: installs fastai from .whl/ when the Python lacks it, then
# runs bench/bench_gpu.py (data generation, pipeline vs bare training, eval with and
# without TTA, paper-profile wall-time estimate). Results: $OUT/gpu.csv and
# $OUT/gpu_estimate.csv when $OUT is set, else reports/bench/.
#
# Usage (from anywhere):  bash bench/gpu.sh [--small] [bench_gpu.py options]
#   PYTHON=...      interpreter to use (default: python3)
#   GPU_SITE=...    where the wheels are installed (default: /tmp/site)
# On the device machine, carry .whl (ignored by git) with the working tree; put the
# accelerate wheel there too, or the 1 vs 2 processes rows are skipped (with a message).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SITE="${GPU_SITE:-/tmp/site}"

if ! "$PY" -c "import fastai" >/dev/null 2>&1; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu.sh: fastai not importable; installing .whl/*.whl into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu.sh: fastai is not importable by $PY and there is no .whl/ folder" >&2
        exit 2
    fi
fi
# pcamlib is not pip-installed on the device machine: the repo root goes on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The optimiser step on the GPU: ForeachSGD vs fastai's per-parameter loop (gpu_optim.csv).
OPTIM_OUT="${OUT:-reports/bench}/gpu_optim.csv"
if [ "${1:-}" = "--small" ]; then
    "$PY" bench/bench_optim.py --quick --out "$OPTIM_OUT"
else
    "$PY" bench/bench_optim.py --out "$OPTIM_OUT"
fi
exec "$PY" bench/bench_gpu.py "$@"
