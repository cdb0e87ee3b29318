"""Test configuration: Triton kernels run in the CPU interpreter, whatever the host has.

* ``TRITON_INTERPRET=1`` is set in :func:`pytest_configure`, before any test module imports fastkd's
  kernels (it must be set before an ``@triton.jit`` function is defined), so the interpreter tests give the
  same results on a laptop, in CI and on a GPU host. Exception — native Triton, for the ``gpu`` tests on
  a CUDA host: ``pytest -m gpu`` (what ``make gpu-check`` runs), or ``FASTKD_TRITON_NATIVE=1``
  (``FASTKD_TRITON_NATIVE=0`` forces the interpreter).
* ``gpu``-marked tests are skipped without a real CUDA device, and in an interpreter session (their
  Triton kernels must be compiled for the GPU: run ``pytest -m gpu``).
* ``FASTKD_FAKE_CUDA=1`` patches ``torch.cuda.is_available`` to return True, to check that the interpreter
  tests do not depend on the host (``FASTKD_FAKE_CUDA=1 pytest tests/distill/test_triton_distill.py``).
"""

from __future__ import annotations

import os

import torch

REAL_CUDA = torch.cuda.is_available()
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

try:  # optional here: a machine without hypothesis still runs every test module that does not use it
    from hypothesis import settings
except ImportError:
    settings = None
if settings is not None:
    # CI explores the same examples on every run (a fresh clone has no example database); locally,
    # property tests keep drawing new examples.
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")

requires_cuda = pytest.mark.skipif(not REAL_CUDA, reason="needs a CUDA GPU")


def _native_triton(config: pytest.Config) -> bool:
    flag = os.environ.get("FASTKD_TRITON_NATIVE", "")
    if flag in ("0", "1"):
        return flag == "1"
    expr = (config.getoption("markexpr", "") or "").replace(" ", "")
    return REAL_CUDA and expr == "gpu"


def pytest_configure(config: pytest.Config) -> None:
    if _native_triton(config):
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("FASTKD_FAKE_CUDA") == "1":
        torch.cuda.is_available = lambda: True  # noqa: E731  (a host check; no CUDA call is made)


# The fast tier for local work is `pytest -m "not slow"`: these modules (Triton-interpreter sweeps over both
# schedules, subprocess builds and runs, 2-rank process groups, end-to-end trainers and examples) are marked slow
# as a whole here; single slow tests elsewhere carry @pytest.mark.slow. `make test` and CI run everything.
SLOW_MODULES = frozenset({
    "test_aot", "test_cache_extract", "test_determinism", "test_distill_akl", "test_distributed",
    "test_distributed_engines", "test_distributed_teacher", "test_endpoints", "test_example", "test_gpu_check",
    "test_mixture", "test_offsets",
    "test_onpolicy_compile", "test_onpolicy_distributed", "test_onpolicy_triton", "test_packaging", "test_properties",
    "test_sparse_offsets",
    "test_sparse_split",
    "test_stats",
    "test_stats_sparse", "test_token_select", "test_triton_distill", "test_trl_trainer_e2e",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(slow)
    if os.environ.get("FASTKD_FAKE_CUDA") == "1":
        # host_device tests run real work on the host's default device (torch.compile / inductor, fastkd
        # check and bench, the CUDA RNG): with a faked is_available torch itself would try CUDA. On a real GPU
        # host they run on the GPU; every other test (all interpreter tests) must pass under the fake.
        fake = pytest.mark.skip(reason="FASTKD_FAKE_CUDA=1: this test runs on the host's real default device")
        for item in items:
            if "host_device" in item.keywords:
                item.add_marker(fake)
    if not REAL_CUDA:
        reason = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = "gpu tests compile Triton for the device: run `pytest -m gpu` (make gpu-check)"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def small_blocks():
    """The sparse Triton kernels with 16-column vocabulary blocks and one warp: several blocks on small V."""
    from fastkd.sparse import triton_impl as TS

    old = dict(TS.CONFIG)
    TS.CONFIG.update(block_v=16, num_warps=1)
    yield
    TS.CONFIG.update(old)


@pytest.fixture
def no_value_checks():
    """What a CUDA user gets by default: no data-dependent (host-syncing) input checks."""
    from fastkd.core import checks

    checks.set_input_checks(False)
    yield
    checks.set_input_checks(None)


@pytest.fixture
def head_compute_dtypes(monkeypatch):
    """The compute dtype of every LM-head chunker (``fastkd.core.lmhead.LMHeadChunker``) built in the test, in order."""
    from fastkd.core import lmhead

    seen = []
    init = lmhead.LMHeadChunker.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen.append(self._cdt)

    monkeypatch.setattr(lmhead.LMHeadChunker, "__init__", spy)
    return seen
