# Two entry points, each self-sufficient on a fresh machine (venv, dependencies, build):
#   make test     the test suite
#   make report   the benchmark report (python -m kfuse); ARGS="--quick" for a short run
# CUDA kernels are built when a GPU is visible (KFUSE_CUDA=1 forces them, 0 skips them).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
KFUSE_CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
MAX_JOBS ?= $(shell nproc)
export KFUSE_CUDA MAX_JOBS
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: test report build lint bench clean

test: build
	$(PY) -m pytest -q tests

report: build
	$(PY) -m kfuse $(ARGS)

bench: build
	$(PY) -m pytest -q bench/bench_*.py --benchmark-only

lint: $(VENV)/.deps
	$(PY) -m ruff check .

build: $(VENV)/.build-cuda$(KFUSE_CUDA)

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Editable install: kfuse (python/kfuse, triton_kernels/) plus the extension kfuse._C.
$(VENV)/.build-cuda$(KFUSE_CUDA): $(VENV)/.deps $(SOURCES)
	rm -f $(VENV)/.build-cuda*
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build python/kfuse/_C*.so $(VENV)/.build-cuda*
