# The two set-up-and-run commands (README.md): `make bench` (the main job) and `make test`.
# Each creates .venv if needed and installs what it needs, and no more: `make bench` the light bench set
# (triton, matplotlib, rich, POT, GeomLoss, Liger-Kernel: the `bench` extra), `make test` adds the test
# tools and the Hugging Face / TRL extras. torch is pinned to 2.13.0 only where no torch is installed yet
# (an unpinned torch would pull a multi-GB CUDA build on a CPU machine); it is installed first so that no
# extra (liger-kernel, geomloss) can resolve a torch of its own.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --progress-bar off
BENCH_STAMP := $(VENV)/.fastkd-bench
TEST_STAMP := $(VENV)/.fastkd-test

.PHONY: setup setup-bench setup-test bench test lint csrc-check clean

$(PY):
	@if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV); fi

$(BENCH_STAMP): pyproject.toml setup.py | $(PY)
	@echo "make: installing the bench environment into $(VENV) (torch, triton, matplotlib, rich, POT, GeomLoss, Liger-Kernel)"
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	FASTKD_SKIP_CUDA_BUILD=1 $(PIP) -e ".[bench]"
	@touch $(BENCH_STAMP)

$(TEST_STAMP): $(BENCH_STAMP)
	@echo "make: adding the test tools and the Hugging Face / TRL extras to $(VENV)"
	FASTKD_SKIP_CUDA_BUILD=1 $(PIP) -e ".[bench,test,hf]"
	@touch $(TEST_STAMP)

setup-bench: $(BENCH_STAMP)
setup-test: $(TEST_STAMP)
setup: setup-test

bench: setup-bench
	$(VENV)/bin/fastkd bench

lint: setup-test
	$(PY) -m ruff check .

csrc-check: setup-test
	@if command -v nvcc >/dev/null 2>&1; then $(PY) fastkd_build.py --check; \
	else echo "nvcc not found: skipping the csrc/ compile check"; fi

test: setup-test lint csrc-check
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info bench/results
