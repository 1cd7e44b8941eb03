#!/usr/bin/env bash
# Take the docs/ screenshots of a resnet18-vs-resnet34 comparison on the demo data in headless Chromium (needs
# Debian's `chromium` package):
#   mlflow_compare_runs.png  the compare-runs page of the two runs: parameters, final metrics, parallel coordinates;
#   mlflow_compare_charts.png  the experiment's chart view filtered to the comparison: per-epoch curves of each stage.
# Everything goes to a temporary store; the UI binds 127.0.0.1 and is stopped by PID at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-5055}  # not 5060: Chrome refuses it (ERR_UNSAFE_PORT)
WORK=$(mktemp -d)
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" PETS_HOME="$WORK/cache" DO_NOT_TRACK=1 \
  MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
  PETS_MLFLOW_UI_URL="http://127.0.0.1:$PORT"  # the links the runs print point at the UI started below

make -s install
.venv/bin/python -c "from tasks.data import make_synthetic_archive as m; print(m.fn(6, 24, '$WORK'))" > "$WORK/archive"
.venv/bin/pets compare --archs resnet18,resnet34 --data-url "file://$(cat "$WORK/archive")" --no-pretrained \
  --presize 96 --size 64 --bs 16 --freeze-epochs 1 --epochs 4 --base-lr 2e-3 --no-fp16 --workers 0 \
  --experiment pets-demo --registered-model pets-demo-classifier --out-dir "$WORK/out" --json | tail -1 > "$WORK/result.json"
read -r COMPARE_URL CHARTS_URL < <(.venv/bin/python - "$WORK/result.json" <<'PY'
import json, sys
from urllib.parse import quote
from tasks import tracking
result = json.load(open(sys.argv[1]))
experiment = tracking.ensure_experiment(result["experiment"])
search = quote(f"tags.comparison = '{result['comparison']}'")
query = f"workflowType=machine_learning&compareRunsMode=CHART&searchFilter={search}"
print(result["compare_url"], f"{tracking.ui_url()}/#/experiments/{experiment}/runs?{query}")
PY
)

setsid .venv/bin/pets ui --port "$PORT" > "$WORK/ui.log" 2>&1 &  # its own process group: mlflow and its workers
UI_PID=$!
trap 'kill -- -$UI_PID 2>/dev/null; wait $UI_PID 2>/dev/null; rm -rf "$WORK"' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 0.5; done

screenshot() {  # URL FILE HEIGHT; a fresh profile each time: the UI keeps view state in localStorage
  local profile
  profile=$(mktemp -d -p "$WORK")
  timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --disable-dev-shm-usage --user-data-dir="$profile" --hide-scrollbars \
    --window-size="1600,$3" --virtual-time-budget=10000 --screenshot="$2" "$1" 2> /dev/null
  echo "$2: $1"
}
screenshot "$COMPARE_URL" docs/mlflow_compare_runs.png 2400
screenshot "$CHARTS_URL" docs/mlflow_compare_charts.png 2000
