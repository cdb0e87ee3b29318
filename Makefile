# The two set-up-and-run commands (README.md): `make bench` (the main job) and `make test`.
# Each creates .venv if needed and installs what it needs, and no more: `make bench` the light bench set
# (triton, matplotlib, rich, POT, GeomLoss, Liger-Kernel: the `bench` extra), `make test` adds the test
# tools and the Hugging Face / TRL extras. torch is pinned to 2.13.0 only where no torch is installed yet
# (an unpinned torch would pull a multi-GB CUDA build on a CPU machine); it is installed first so that no
# extra (liger-kernel, geomloss) can resolve a torch of its own.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# pip -q, minus the one warning per package that this machine's pip configuration (local index folders
# that lack a package) prints; every other warning and error still shows.
PIP_NOISE := is ignored: it is neither a file nor a directory
PIP := $(PY) -m pip install -q --progress-bar off
BENCH_STAMP := $(VENV)/.fastkd-bench
TEST_STAMP := $(VENV)/.fastkd-test

.PHONY: setup setup-bench setup-test bench test lint csrc-check clean

$(PY):
	@if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV); fi

$(BENCH_STAMP): pyproject.toml setup.py | $(PY)
	@echo "make: [1/2] torch into $(VENV) (pinned to 2.13.0 only when no torch is installed)"
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0 2> >(grep -v "$(PIP_NOISE)" >&2)
	@echo "make: [2/2] fastkd (editable) + the bench extra: triton, matplotlib, rich, POT, GeomLoss, Liger-Kernel"
	@FASTKD_SKIP_CUDA_BUILD=1 $(PIP) -e ".[bench]" 2> >(grep -v "$(PIP_NOISE)" >&2)
	@touch $(BENCH_STAMP)

$(TEST_STAMP): $(BENCH_STAMP)
	@echo "make: adding the test tools and the Hugging Face / TRL extras to $(VENV)"
	@FASTKD_SKIP_CUDA_BUILD=1 $(PIP) -e ".[bench,test,hf]" 2> >(grep -v "$(PIP_NOISE)" >&2)
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

# ---- GPU checks (bench/model.py, bench/aot.py, bench/gpu_suite.py; README "GPU check") ----------------------
.PHONY: model gpu-aot gpu-check
GPU_PY ?= python3
OUT ?= bench/results/gpu-check
GPU_SUITE_CAP ?= 150

# cost model of the GPU suite's cases (model, not measured), on this CPU
model: setup-bench
	$(PY) bench/model.py --gpu h200

# every Triton kernel configuration the wrappers launch, compiled for sm_90 without a GPU (make test: a subset)
gpu-aot: setup-bench
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(PY) bench/aot.py --all

# one command on a machine with a CUDA GPU and no network (<= 8 min on one H200): install this checkout into
# $(GPU_PY)'s environment (no downloads) building csrc/ with all cores, the gpu tests with native Triton, then a
# trimmed suite (no torch.compile, short budget, total cap) that appends each case to $(OUT) when it finishes
gpu-check:
	@$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || { \
	  echo "make gpu-check: no CUDA GPU visible to $(GPU_PY) (torch.cuda.is_available() is False or torch is missing)."; \
	  echo "  It needs a CUDA machine; here use 'make test', 'make gpu-aot' and 'python bench/model.py'."; exit 2; }
	@mkdir -p $(OUT)
	set -o pipefail; MAX_JOBS=$$(nproc) timeout 120 $(GPU_PY) -m pip install -q --no-deps --no-build-isolation \
	  --no-index -e . 2>&1 | tee $(OUT)/install.log || { echo "csrc/ build failed: installing without the CUDA extension"; \
	  FASTKD_SKIP_CUDA_BUILD=1 $(GPU_PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .; }
	set -o pipefail; timeout 150 $(GPU_PY) -m pytest -q -m gpu -p no:cacheprovider --durations=10 --continue-on-collection-errors \
	  $$(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tee $(OUT)/pytest-gpu.log; echo $$? > $(OUT)/pytest.rc
	set -o pipefail; PYTHONUNBUFFERED=1 timeout $$(( $(GPU_SUITE_CAP) + 30 )) $(GPU_PY) bench/gpu_suite.py --no-compile \
	  --budget 0.5 --time-cap $(GPU_SUITE_CAP) --out $(OUT) --model bench/model_h200.json 2>&1 | tee $(OUT)/suite.log; \
	  echo $$? > $(OUT)/suite.rc
	@p=$$(cat $(OUT)/pytest.rc); s=$$(cat $(OUT)/suite.rc); \
	  echo "make gpu-check: pytest -m gpu exit $$p, gpu_suite exit $$s; logs and results in $(OUT)"; test "$$p$$s" = 00
