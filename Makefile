# anomaly3d developer tasks. `make demo` and `make test` install first when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint bench serve clean

install: $(STAMP)

# CPU build of torch unless an NVIDIA GPU is present; then the project with its dev extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch==$(TORCH_VERSION); \
	else \
		$(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu --timeout 10 --retries 1 torch==$(TORCH_VERSION) \
		|| $(BIN)/pip install -q torch==$(TORCH_VERSION); \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/anomaly3d demo --out demo_output --config experiments/configs/brain_mri_multiseq.yaml

# Serve a model over HTTP: a registered one (models:/NAME@ALIAS, from the tracking store
# MLFLOW_TRACKING_URI, default sqlite:///mlruns.db) or a model folder. MLflow starts `uvicorn` by
# name, so the venv's bin goes on PATH (as in an activated venv).
MODEL ?= models:/anomaly3d-demo@champion
PORT  ?= 5001
serve: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///mlruns.db}" \
		$(BIN)/mlflow models serve --env-manager local -m "$(MODEL)" -p $(PORT)

# tests/test_plugin_packages.py also builds examples/anomaly3d-example-plugin with pip, installs it
# into a temporary folder (not the venv) and runs its own test suite and the CLI on it.
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check anomaly3d_core plugins experiments tests examples
	$(BIN)/ruff format --check anomaly3d_core plugins experiments tests examples

# Every benchmark table and the speed figures in README (several hours on 2 CPU cores: the
# multi-sequence tables fit every preset on each sequence set, with cross-fitted validation).
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python experiments/benchmark.py --data bench_output/data --out experiments/results
	$(BIN)/python experiments/benchmark_native.py --data bench_output/data/native --out experiments/results
	$(BIN)/python experiments/benchmark_multiseq.py --space template --data bench_output/data/multiseq --out experiments/results
	$(BIN)/python experiments/benchmark_multiseq.py --space native --data bench_output/data/multiseq_native --out experiments/results
	$(BIN)/python experiments/bench_calibration.py --data bench_output/data/calibration --out experiments/results
	$(BIN)/python experiments/joint_training_check.py --data bench_output/data --out experiments/results
	$(BIN)/python experiments/bench_speed.py --out experiments/results
	$(BIN)/python experiments/bench_memory.py --data bench_output/data/native --out experiments/results
	$(BIN)/python experiments/recommend.py --results experiments/results
	$(BIN)/python experiments/bench_limits.py --out experiments/results
	$(BIN)/python experiments/bench_spark.py --data bench_output/spark --out experiments/results

clean:
	rm -rf demo_output bench_output mlruns.db mlartifacts .pytest_cache
