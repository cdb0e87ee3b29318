"""Test configuration: run Triton kernels in the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the
test modules import fastkd's kernels. GPU-only tests use the `gpu` marker / `requires_cuda` skip.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI explores the same examples on every run (a fresh clone has no example database); locally,
# property tests keep drawing new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
