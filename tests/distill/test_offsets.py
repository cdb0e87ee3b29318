"""fp32 accuracy does not depend on a constant logit offset (softmax is shift-invariant; the kernels keep each
log-normaliser split as max + log-sum, so ``x − max`` is exact and no sum is rounded at the offset's magnitude).

``s + 1e4``, ``t + 1e4`` (``torch.randn(4, 37) * 2`` at seeds 1 and 2, plus one ``-inf`` column) against the
float64 reference of the same fp32 inputs, on torch, Triton (interpreter: default schedule and the two-pass
fallback) and CUDA (skipped without a GPU). taid included: every kernel interpolates the max-subtracted logits
(docs/DESIGN.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from distill_backends import BACKENDS

import fastkd
from fastkd.distill import reference as R
from fastkd.distill import triton_impl as TD

DIVS = list(fastkd.DIVERGENCES)


@pytest.mark.parametrize(("backend", "sched"), BACKENDS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("offset", [1e4, -3e3])
def test_constant_offset_keeps_fp32_accuracy(div, backend, sched, seed, offset):
    torch.manual_seed(seed)
    s = torch.randn(4, 37) * 2 + offset
    t = torch.randn(4, 37) * 2 + offset
    s[3, 4] = t[3, 4] = -math.inf
    labels = torch.randint(0, 37, (4,))
    labels[3] = 0
    sd = s.double().requires_grad_(True)
    ref = R.distill_loss(sd, t.double(), div, ce_weight=0.5, labels=labels)
    (ref_g,) = torch.autograd.grad(ref, sd)
    dev = "cuda" if backend == "cuda" else "cpu"
    x = s.to(dev).requires_grad_(True)
    with TD.override_config(block_v=16 if sched == "two_pass" else None, schedule=sched):
        loss = fastkd.distill_loss(x, t.to(dev), div, ce_weight=0.5, labels=labels.to(dev), backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double().cpu(), ref_g, rtol=0, atol=1e-6 * float(ref_g.abs().max()))
