# One command each: set up, serve the default model, run the tests.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
# The CPU build of torch; on a CUDA machine install the torch build you want first and set TORCH=.
TORCH ?= torch==2.13.0
# setup also compiles the CPU kernels for this machine (about a minute), rather than a server's first start.

.PHONY: setup serve test lint proto

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/pip install --quiet "$(TORCH)")
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m engine.model.cpu_kernels

serve:
	$(BIN)/goodspeed serve

test:
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy api engine server client bench

proto:
	$(BIN)/python -m api.pb.generate
