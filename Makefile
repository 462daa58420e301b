# The Makefile is the entry point: every target installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
# CPU build of torch on these machines (a local wheel); on GPU hosts an existing CUDA torch is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-gpu lint typecheck model bench clean help

help:
	@echo "make install    create $(VENV) and install pdmesh with its dev tools"
	@echo "make test       install if needed, then run the test suite (GPU tests skip without a GPU)"
	@echo "make test-gpu   run only the GPU-marked tests"
	@echo "make lint       ruff"
	@echo "make typecheck  mypy"
	@echo "make model      fetch and convert the default model into the cache dir"
	@echo "make bench      offline engine throughput vs transformers (CPU or GPU)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check pdmesh services tests
	$(PY) -m ruff format --check pdmesh services tests

typecheck: $(STAMP)
	$(PY) -m mypy pdmesh services

model: $(STAMP)
	$(PY) -m pdmesh.models.fetch

bench: $(STAMP)
	$(PY) -m pdmesh.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
