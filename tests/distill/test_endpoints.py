"""Every hyperparameter at the ends of its range, on every backend, equals the exact limit.

One parametrised table: (divergence, hyperparameters, the limit as a float64 reference divergence). Backends:
torch, Triton (interpreter) on each schedule it has for that divergence (split-row / akl split and the two-pass
fallback), CUDA when a GPU and the extension are present. Inputs: ``torch.randn(4, 37) * 2`` at seeds 1 and 2,
plus a row with ``-inf`` teacher / student entries. Loss and gradient are compared with the limit's float64
reference (autograd).

ab has no endpoint (α, β ≠ 0): its tiny-exponent cases are compared with the float64 reference of the ab formula
(cancellation-free near α → 0 / β → 0) and, at α = 1, β → 0, with forward KL.
"""

from __future__ import annotations

import math

import pytest
import torch
from distill_backends import BACKENDS

import fastkd
from fastkd.distill import reference as R
from fastkd.distill import triton_impl as TD

# (divergence, hyperparameters, limit divergence, its hyperparameters)
ENDPOINTS = [
    ("jsd", {"beta": 0.0}, "fkl", {}),
    ("jsd", {"beta": 1.0}, "rkl", {}),
    ("symkl", {"beta": 0.0}, "rkl", {}),
    ("symkl", {"beta": 1.0}, "fkl", {}),
    ("skl", {"alpha": 0.0}, "fkl", {}),
    ("skl", {"alpha": 1.0}, "zero", {}),
    ("srkl", {"alpha": 0.0}, "rkl", {}),
    ("srkl", {"alpha": 1.0}, "zero", {}),
    ("akl", {"mu": 1.0}, "fkl", {}),
    ("akl", {"mu": 0.0}, "akl", {"mu": 0.0}),  # head = the top token only (its own formula)
    ("taid", {"t": 0.0}, "taid", {"t": 0.0}),  # KL(q‖q) = 0, the teacher not read (its own formula)
    ("taid", {"t": 1.0}, "fkl", {}),
]


def _inputs(seed: int, with_inf: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    s = torch.randn(4, 37) * 2
    t = torch.randn(4, 37) * 2
    if with_inf:  # masked vocabulary entries: the same column on both sides, and a student-only one
        s[1, 5] = t[1, 5] = -math.inf
        t[2, 7] = -math.inf
    return s, t


def _limit(s, t, name, kw):
    sd = s.double().requires_grad_(True)
    loss = R.distill_loss(sd, t.double(), name, **kw)
    (g,) = torch.autograd.grad(loss, sd)
    return loss.detach(), g


def _run(s, t, div, kw, backend, sched):
    dev = "cuda" if backend == "cuda" else "cpu"
    x = s.to(dev).requires_grad_(True)
    with TD.override_config(block_v=16 if sched == "two_pass" else None, schedule=sched):
        loss = fastkd.distill_loss(x, t.to(dev), div, backend=backend, **kw)
    loss.backward()
    return loss.detach().double().cpu(), x.grad.double().cpu()


@pytest.mark.parametrize(("backend", "sched"), BACKENDS)
@pytest.mark.parametrize(("div", "kw", "lim", "lim_kw"), ENDPOINTS,
                         ids=[f"{d}-{k}" for d, k, *_ in ENDPOINTS])
@pytest.mark.parametrize("seed", [1, 2])
def test_endpoint_is_the_limit(div, kw, lim, lim_kw, backend, sched, seed):
    for with_inf in (False, True):
        s, t = _inputs(seed, with_inf)
        if with_inf and lim == "fkl" and div in ("akl",):  # p > 0 = q: fkl is +inf, only the finite case
            t[2, 7] = 0.0
        ref, ref_g = _limit(s, t, lim, lim_kw)
        loss, g = _run(s, t, div, kw, backend, sched)
        if not math.isfinite(ref):
            assert loss == ref, (loss, ref)
            continue
        torch.testing.assert_close(loss, ref, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)


# ab: tiny exponents (no endpoint: α, β ≠ 0), the reference is the ab formula itself (stable form)
AB_TINY = [(1e-6, 1.0), (1e-4, 1.0), (1.0, 1e-6), (1.0, 1e-4), (0.5, 1e-6), (1e-6, 0.5), (-1e-6, 1.0),
           (1.0, -1e-5)]


@pytest.mark.parametrize(("backend", "sched"), BACKENDS)
@pytest.mark.parametrize(("alpha", "beta"), AB_TINY)
@pytest.mark.parametrize("seed", [1, 2])
def test_ab_tiny_exponents(alpha, beta, backend, sched, seed):
    s, t = _inputs(seed, False)
    kw = dict(alpha=alpha, beta=beta)
    ref, ref_g = _limit(s, t, "ab", kw)
    loss, g = _run(s, t, "ab", kw, backend, sched)
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(g, ref_g, rtol=2e-5, atol=1e-7)


def test_ab_reference_limits():
    """The float64 reference at tiny exponents tends to its KL-like limits (and at α = 1, β → 0 to fkl)."""
    s, t = _inputs(1, False)
    sd, td = s.double(), t.double()
    fkl = R.distill_loss(sd, td, "fkl")
    for beta in (1e-6, 1e-8):
        torch.testing.assert_close(R.distill_loss(sd, td, "ab", alpha=1.0, beta=beta), fkl, rtol=10 * beta, atol=0)
    # α → 0 at β = 1: (1/β²)·Σ (q^β log q^β ... ) — the limit is Σ q (log q − log p) − (1 − Σ q·...) = rkl here
    rkl = R.distill_loss(sd, td, "rkl")
    torch.testing.assert_close(R.distill_loss(sd, td, "ab", alpha=1e-8, beta=1.0), rkl, rtol=1e-6, atol=0)
