# The two set-up-and-run commands (README.md): `make bench` (the main job) and `make test`.
# Each creates .venv if needed and installs what it needs. torch is pinned to 2.13.0 only where no torch
# is installed yet (an unpinned torch would pull a multi-GB CUDA build on a CPU machine).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastkd-installed

.PHONY: setup bench test lint csrc-check clean

$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	FASTKD_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q -e ".[triton,test,bench,hf,ot]"
	@touch $(STAMP)

setup: $(STAMP)

bench: setup
	$(VENV)/bin/fastkd bench

lint: setup
	$(PY) -m ruff check .

csrc-check: setup
	@if command -v nvcc >/dev/null 2>&1; then $(PY) fastkd_build.py --check; \
	else echo "nvcc not found: skipping the csrc/ compile check"; fi

test: setup lint csrc-check
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info bench/results
