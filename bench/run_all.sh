#!/usr/bin/env bash
# Run every CPU benchmark in turn (`make bench`); each prints one JSON line, collected in outputs/bench/results.jsonl.
# Run them on an otherwise idle machine: each ratio is measured within one run, but a busy neighbour still adds noise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-outputs/bench/results.jsonl}
mkdir -p "$(dirname "$RESULTS")"
: > "$RESULTS"
for benchmark in train_throughput data_pipeline memory warm_rerun duplicates overhead vs_fastai serving predict_images data_parallel; do
    echo "== bench.$benchmark" >&2
    "$PYTHON" -m "bench.$benchmark" 2> "outputs/bench/$benchmark.log" | tee -a "$RESULTS"
done
echo "Results: $RESULTS (logs beside it)" >&2
