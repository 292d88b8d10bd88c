# lightning_dbq — `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
# uv is installed on demand (pip install uv) when it is not on PATH.
UV := $(shell command -v uv 2>/dev/null || echo "$(PY) -m uv")
# optional extras installed by `make setup` (onnx: ONNX export + ONNX Runtime for serving)
EXTRAS ?= --extra onnx
RUN := $(UV) run --frozen $(EXTRAS)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup train search test test-fast test-slow lint format typecheck bench gpu-check clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

setup: ## install uv if missing, then the locked environment (.venv)
	@command -v uv >/dev/null 2>&1 || $(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install --quiet uv
	$(UV) sync --frozen $(EXTRAS)

train: setup ## run the main job: {8,6,4,2} multi-precision training on the bundled digits (outputs/train/...)
	$(RUN) dbq-train $(ARGS)

search: setup ## post-training SubNet search: make search ARGS="checkpoint=PATH"
	$(RUN) dbq-search $(ARGS)

lint: setup ## ruff lint + format check, mypy on the library
	$(RUN) ruff check lightning_dbq tests experiments
	$(RUN) ruff format --check lightning_dbq tests experiments
	$(RUN) mypy lightning_dbq

format: setup ## apply ruff format and autofixes
	$(RUN) ruff check --fix lightning_dbq tests experiments
	$(RUN) ruff format lightning_dbq tests experiments

test: lint ## lint, then the test suite (slow tests excluded)
	$(RUN) pytest -m "not slow" -n 2 $(PYTEST_ARGS)

test-fast: setup ## the test suite without lint
	$(RUN) pytest -m "not slow" -n 2 $(PYTEST_ARGS)

test-slow: setup ## only the slow tests (minutes)
	$(RUN) pytest -m slow $(PYTEST_ARGS)

bench: setup ## benchmarks P1-P9 -> experiments/results/bench.json and experiments/README.md table
	@$(UV) sync --frozen $(EXTRAS) --extra bench || echo "the bench extra (Brevitas) did not install: P1/P8 run without it"
	$(UV) run --frozen --no-sync python -m experiments.bench.run_all

gpu-check: setup ## GPU check (tests -m gpu, P1/P8, CIFAR-10 study) -> experiments/results/gpu/; GPU_SMOKE=1: CPU smoke
	$(RUN) python -m experiments.gpu.check $(ARGS)

clean: ## remove caches and run outputs
	rm -rf .pytest_cache .mypy_cache .ruff_cache outputs multirun lightning_logs wandb
