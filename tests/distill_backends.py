"""The distill backends a parametrised test runs on: torch, Triton on its default schedule and forced two-pass
(the interpreter on CPU), and CUDA where a GPU and fastkd._C exist. Shared by the endpoint and offset tests."""

from __future__ import annotations

import pytest
import torch

from fastkd.distill import triton_impl as TD

needs_triton = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")


def cuda_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    from fastkd.core.registry import cuda_ext_reasons

    return not cuda_ext_reasons(torch.zeros(1, device="cuda"))


# (backend, forced Triton schedule)
BACKENDS = [
    ("torch", None),
    pytest.param("triton", None, marks=needs_triton, id="triton-default"),
    pytest.param("triton", "two_pass", marks=needs_triton, id="triton-two_pass"),
    pytest.param("cuda", None, marks=pytest.mark.skipif(not cuda_ok(), reason="needs a GPU and fastkd._C"),
                 id="cuda"),
]
