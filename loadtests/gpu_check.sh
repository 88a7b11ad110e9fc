#!/usr/bin/env bash
# The CUDA checks, as one script for a machine with an NVIDIA GPU (not part of CI):
#   1. the CUDA conformance test (the batched runner's torch path on CUDA gives torch CPU's greedy tokens);
#   2. a throughput sweep of the default configuration on CUDA (1, 16, 64 streams), fnserve alone.
# PY is a Python with a CUDA build of torch and fnserve's dependencies (default: .venv/bin/python, e.g. after
# `make setup TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128`). Writes pytest's output, the
# sweep's summary.json and plot.png under ${OUT:-gpu-check}:
#     OUT=/tmp/gpu bash loadtests/gpu_check.sh
set -euo pipefail
out=${OUT:-gpu-check}
py=${PY:-.venv/bin/python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -m pytest -q -p no:cacheprovider -m cuda tests/shared/backends/test_conformance.py 2>&1 | tee "$out/conformance.txt"
FNSERVE_BACKEND=cuda FNSERVE_LOG_LEVEL=warning HF_HUB_OFFLINE=1 "$py" -m shared.cli serve --port 8030 \
    >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:8030/readiness >/dev/null && break; sleep 1; done
"$py" -m shared.cli loadtest --url http://127.0.0.1:8030 --scenario sweep --steps 1,16,64 --hold 20 \
    --max-tokens 128 --out "$out/sweep" 2>&1 | tail -8 | tee "$out/sweep.txt"
