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

.PHONY: setup setup-bench setup-test bench test test-triton-min lint csrc-check clean

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
	@start=$$(date +%s); $(PY) -m pytest -q; rc=$$?; \
	  echo "make test: pytest wall time $$(( $$(date +%s) - start )) s"; exit $$rc
	@$(MAKE) --no-print-directory test-triton-min

# The oldest supported Triton (pyproject's triton floor, the GPU image's version) with the numpy its interpreter
# needs: installed into a side folder that shadows the venv's triton and numpy (PYTHONPATH), then the Triton
# interpreter tests and the sm_90 compile subset run against it.
TRITON_MIN := 3.6.0
TRITON_MIN_NUMPY := numpy<2.4
TRITON_MIN_DIR := $(VENV)/triton-min
TRITON_MIN_TESTS := tests/distill/test_triton_distill.py tests/sparse/test_sparse_split.py tests/distill/test_distill_akl.py \
  tests/ot/test_sinkhorn.py tests/tooling/test_aot.py
$(TRITON_MIN_DIR)/.stamp: | $(TEST_STAMP)
	@echo "make: triton==$(TRITON_MIN) and '$(TRITON_MIN_NUMPY)' into $(TRITON_MIN_DIR) (the Triton floor)"
	@$(PIP) --no-deps --target $(TRITON_MIN_DIR) "triton==$(TRITON_MIN)" "$(TRITON_MIN_NUMPY)" \
	  2> >(grep -v "$(PIP_NOISE)" >&2)
	@touch $@

test-triton-min: $(TRITON_MIN_DIR)/.stamp
	@start=$$(date +%s); PYTHONPATH=$(TRITON_MIN_DIR) $(PY) -c \
	  "import triton, numpy; assert triton.__version__ == '$(TRITON_MIN)', triton.__file__; \
	  print('make test-triton-min: triton', triton.__version__, 'numpy', numpy.__version__)" && \
	  PYTHONPATH=$(TRITON_MIN_DIR) $(PY) -m pytest -q -p no:cacheprovider $(TRITON_MIN_TESTS); rc=$$?; \
	  echo "make test-triton-min: wall time $$(( $$(date +%s) - start )) s"; exit $$rc

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
# $(GPU_PY)'s environment (no downloads) building csrc/ with all cores, `fastkd info`, the gpu tests with native
# Triton, then a trimmed suite (no torch.compile, short budget, total cap) that appends each case to $(OUT) when it
# finishes, beside the cost model's prediction (bench/gpu_check.py; `--dry-run` runs the same steps on a CPU)
gpu-check:
	$(GPU_PY) bench/gpu_check.py --out $(OUT) --suite-cap $(GPU_SUITE_CAP)
