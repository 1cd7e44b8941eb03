#!/usr/bin/env bash
# GPU benchmarks, a few minutes on one card: resnet50 at 224 px, bs 64, fp16, channels_last (fastbook ch. 5's model).
# Training throughput against the model-only loop (with and without torch.compile), the loader against the model,
# and memory. Each prints one JSON line; record them and the card in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then make install >&2; fi
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-outputs/bench/gpu-results.jsonl}
GPU=(--device cuda --arch resnet50 --size 224 --presize 460 --bs 64 --precision fp16 --breeds 37 --per-breed 40)
mkdir -p "$(dirname "$RESULTS")"
: > "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
run() {
    echo "== bench.$*" >&2
    "$PYTHON" -m "bench.$1" "${@:2}" 2>> outputs/bench/gpu.log | tee -a "$RESULTS"
}
run train_throughput "${GPU[@]}" --repeats 3
run train_throughput "${GPU[@]}" --repeats 3 --compile
run data_pipeline "${GPU[@]}" --epochs 2
run memory "${GPU[@]}" --epochs 3
echo "Results: $RESULTS" >&2
