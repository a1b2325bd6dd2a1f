# alignflow: `make demo` sets up and runs one round on the embedded model; `make test` sets up and runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast smoke bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/alignflow run --config configs/default.yaml

smoke: setup
	$(VENV)/bin/alignflow run --config configs/smoke.yaml

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf runs mlruns mlartifacts mlflow.db .pytest_cache
