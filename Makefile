# One entry point per gate. Every install step lives here, so a fresh clone needs only python3.11 and make.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
HTTP_PORT ?= 8000
GRPC_PORT ?= 50051

REDIS_PORT ?= 6379
# NOTE: Triton's own client, for the KServe v2 compatibility tests; its own venv, since it pins protobuf<7
TRITON_VENV := build/tritonclient-venv

.PHONY: help serve model backtest backtest-hourly seeds test lint typecheck proto check-proto pytest clean install-serve install-dev redis smoke soak \
	triton-venv \
	bench bench-smoke

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Serving only: no torch.
$(VENV)/.serve: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	@touch $@

# Everything the tests need: serving, training (torch CPU build) and the dev tools.
$(VENV)/.dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[train,dev]'
	@touch $@ $(VENV)/.serve

$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q 'tritonclient[grpc,http]==2.73.0' 'numpy>=1.26'
	@touch $@

triton-venv: $(TRITON_VENV)/.installed  ## Triton's client in its own virtualenv (for the KServe v2 tests)

install-serve: $(VENV)/.serve  ## install what serving needs
install-dev: $(VENV)/.dev  ## install serving, training and dev tools

serve: $(VENV)/.serve  ## serve the shipped models on 127.0.0.1:8000 (REST) and :50051 (gRPC)
	$(BIN)/lstm-serve serve --models models --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

# NOTE: the hourly model's flags, each measured on its data (README "The shipped models"): its 48-hour highway
# starts at the ridge fit, and one or two epochs at a low learning rate are what validation asks for
HOURLY = --csv vega:seattle-temps.csv --target temp --time-col date --name seattle-temps --version 1 \
	--horizon 24 --window 168 --context 168 --ar-lags 48 --season 24 --highway-lags 48 --highway-init \
	--ensemble 1 --lr 3e-4 --epochs 8 --min-epochs 1 --patience 4

model: $(VENV)/.dev  ## retrain and re-export the shipped models (models/seattle-weather/1, models/seattle-temps/1)
	$(BIN)/lstm-serve train --name seattle-weather --version 1 --models models
	$(BIN)/lstm-serve train $(HOURLY) --models models

backtest: $(VENV)/.dev  ## the shipped model's rolling-origin backtest (4 folds, ~3 min): models/seattle-weather/1/backtest.*
	$(BIN)/lstm-serve backtest --name seattle-weather --folds 4 --out models/seattle-weather/1

seeds: $(VENV)/.dev  ## the default recipe from top-level seeds 1-5 (~4 min): models/seattle-weather/1/seeds.*
	$(BIN)/lstm-serve seeds --name seattle-weather --seeds 1 2 3 4 5 --out models/seattle-weather/1

backtest-hourly: $(VENV)/.dev  ## the hourly model's rolling-origin backtest (4 folds, ~3 min): models/seattle-temps/1/backtest.*
	$(BIN)/lstm-serve backtest $(HOURLY) --folds 4 --out models/seattle-temps/1

proto: $(VENV)/.dev  ## regenerate the gRPC code in service/grpc/_generated from protos/
	bash scripts/gen_proto.sh service/grpc/_generated

check-proto: $(VENV)/.dev  ## fail if the generated gRPC code is out of date
	@rm -rf build/proto-check && mkdir -p build/proto-check
	@bash scripts/gen_proto.sh build/proto-check
	@diff -r -x __pycache__ build/proto-check service/grpc/_generated && echo "generated code is up to date" \
	  || { echo "generated code is stale: run 'make proto' and commit"; exit 1; }

lint: $(VENV)/.dev  ## ruff (lint + format check)
	$(BIN)/ruff check service model tests bench deploy examples
	$(BIN)/ruff format --check service model tests bench deploy examples

typecheck: $(VENV)/.dev  ## mypy --strict on service and model
	$(BIN)/mypy

# The tests use a real Redis (the shared session store): start one if none answers.
redis: $(VENV)/.dev  ## make sure a Redis answers on 127.0.0.1:$(REDIS_PORT) (started without persistence if not)
	@$(PY) -c "import redis; redis.Redis(port=$(REDIS_PORT), socket_timeout=1).ping()" 2>/dev/null \
	  || { command -v redis-server >/dev/null || { echo "the tests need Redis: apt-get install redis-server"; exit 1; }; \
	       redis-server --daemonize yes --port $(REDIS_PORT) --save "" --appendonly no >/dev/null \
	       && for i in 1 2 3 4 5 6 7 8 9 10; do $(PY) -c "import redis; redis.Redis(port=$(REDIS_PORT)).ping()" \
	            2>/dev/null && break; sleep 0.3; done; }

pytest: $(VENV)/.dev redis triton-venv
	$(BIN)/pytest

test: $(VENV)/.dev lint typecheck check-proto pytest bench-smoke  ## everything CI runs

soak: $(VENV)/.dev redis  ## 10 minutes of mixed traffic with session churn, once per session store
	$(PY) bench/soak.py --seconds 600 --store memory
	$(PY) bench/soak.py --seconds 600 --store redis

bench: $(VENV)/.dev redis  ## the benchmark: every target against its floor, in one run (~16 min); writes bench/results/
	$(PY) bench/run.py $(BENCH_ARGS)

bench-smoke: $(VENV)/.dev redis  ## every part of the benchmark once, tiny: checks that the harness works, not the numbers
	$(PY) bench/run.py --smoke
	$(PY) bench/core.py --smoke >/dev/null

smoke: $(VENV)/.dev  ## build the image, run it, then the compose stack and two replicas (needs Docker)
	bash deploy/smoke.sh

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
