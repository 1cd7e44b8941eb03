# Single entry point. `make demo` and `make test` do all the set-up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MLFLOW_DIR ?= $(CURDIR)/mlflow
UI_PORT ?= 5000

# Offline by default: no telemetry from Prefect or MLflow (Prefect 3.9: server/services/telemetry.py
# honours PREFECT_SERVER_ANALYTICS_ENABLED, the SDK DO_NOT_TRACK; MLflow 3.17 docs, "Usage Tracking").
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo test test-slow lint format ui clean bench stack stack-down

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pets demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make test`: everything but the `slow` end-to-end cases, under 10 minutes on two cores; CI (.ci/run) adds those.
test: lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Every CPU benchmark, one JSON line each, into outputs/bench/results.jsonl (BENCHMARKS.md). GPU: bench/gpu.sh.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	PYTHON=$(BIN)/python bench/run_all.sh

# `pets ui` serves the store below on 127.0.0.1 with artifacts beside it (flows/cli.py; MLflow 3.17 `mlflow server`).
ui: $(STAMP)
	MLFLOW_TRACKING_URI=sqlite:///$(MLFLOW_DIR)/mlflow.db $(BIN)/pets ui --port $(UI_PORT)

# The local production stack on PostgreSQL (README, "Production stack"; lib/ops/stack.py): state in outputs/stack/.
stack: $(STAMP)
	$(BIN)/pets stack up

stack-down: $(STAMP)
	$(BIN)/pets stack down

clean:
	rm -rf outputs .pytest_cache .ruff_cache
