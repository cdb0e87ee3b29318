"""The on-policy loss's two gradient paths: scalar reductions get the gradient in the forward chunk loop (three GEMMs
per chunk), reduction="none" defers it to backward (the logits GEMM again). Both equal the generic composition
(logprobs_from_hidden + the per-token formula under autograd) and the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd.onpolicy import reference as R
from fastkd.onpolicy.estimators import on_policy_distill_loss, token_loss

F64 = torch.float64

ESTIMATORS = [
    dict(estimator="k1"), dict(estimator="k2"), dict(estimator="k3"),
    dict(estimator="advantage"), dict(estimator="advantage", sampling=True),
    dict(estimator="advantage", sampling=True, clip=(0.2, 0.28)),
    dict(estimator="advantage", sampling=True, importance_ratio=False),
]


def _problem(n, h, v, seed, dtype=F64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h) * 3).to(dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=F64).to(dtype).requires_grad_(True) if bias else None
    x = torch.randint(0, v, (n,), generator=g)
    t = -torch.rand(n, generator=g, dtype=F64) * 4
    s = -torch.rand(n, generator=g, dtype=F64) * 4
    mask = torch.rand(n, generator=g) > 0.25
    tw = torch.rand(n, generator=g, dtype=F64) + 0.5
    return hid, w, b, x, t, s, mask, tw, g


def _kw(est, s):
    kw = {k: v for k, v in est.items() if k != "sampling"}
    if est.get("sampling"):
        kw["sampling_logprobs"] = s
    return kw


def _ref_per_token(hid, w, b, x, t, s, est, temperature, softcap):
    lq, _, _ = R.logprobs(hid, w, x, bias=b, temperature=temperature, softcap=softcap)
    clip = est.get("clip")
    return token_loss(lq, t, s if est.get("sampling") else None, est["estimator"], est.get("importance_ratio", True),
                      None if clip is None else tuple(float(c) for c in clip))


def _grads(out, leaves):
    return torch.autograd.grad(out, [x for x in leaves if x is not None])


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("reduction,go", [("mean", 1.0), ("mean", -1.7), ("sum", 0.3)])
def test_scalar_path_equals_deferred_and_generic(est, reduction, go):
    n, h, v, chunk, temp, cap = 29, 7, 53, 6, 0.8, 4.0
    hid, w, b, x, t, s, mask, tw, _ = _problem(n, h, v, seed=len(str(est)) + n)
    kw = dict(bias=b, temperature=temp, softcap=cap, mask=mask, token_weight=tw, chunk_size=chunk, **_kw(est, s))
    leaves = (hid, w, b)
    scalar = on_policy_distill_loss(hid, w, x, t, reduction=reduction, **kw)
    per = on_policy_distill_loss(hid, w, x, t, reduction="none", **kw)  # the deferred path
    norm = mask.sum() if reduction == "mean" else 1
    deferred = per.sum() / norm
    # generic: the op's log-probs (its own backward) and the formula under autograd
    lq = fastkd.logprobs_from_hidden(hid, w, x, bias=b, temperature=temp, softcap=cap, chunk_size=chunk)
    lq = torch.where(mask, lq, 0.0)
    generic = (torch.where(mask, token_loss(lq, t, s if est.get("sampling") else None, est["estimator"],
                                            est.get("importance_ratio", True), est.get("clip")), 0.0) * tw).sum() / norm
    ref = (torch.where(mask, _ref_per_token(hid, w, b, x, t, s, est, temp, cap), 0.0) * tw).sum() / norm
    for got in (scalar, deferred, generic):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    want = _grads(ref * go, leaves)
    for got in (scalar, deferred, generic):
        for a, e in zip(_grads(got * go, leaves), want, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_none_reduction_returns_weighted_values_and_their_gradient():
    """reduction="none" returns loss·token_weight (0 where masked) and the gradient of exactly that."""
    hid, w, b, x, t, s, mask, tw, g = _problem(17, 5, 31, seed=4)
    per = on_policy_distill_loss(hid, w, x, t, estimator="k3", bias=b, mask=mask, token_weight=tw,
                                 reduction="none", chunk_size=5)
    ref = torch.where(mask, _ref_per_token(hid, w, b, x, t, s, dict(estimator="k3"), 1.0, None), 0.0) * tw
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn(17, generator=g, dtype=F64)
    for a, e in zip(_grads((per * go).sum(), (hid, w, b)), _grads((ref * go).sum(), (hid, w, b)), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    summed = on_policy_distill_loss(hid, w, x, t, estimator="k3", bias=b, mask=mask, token_weight=tw,
                                    reduction="sum", chunk_size=5)
    torch.testing.assert_close(summed, per.sum(), rtol=1e-12, atol=1e-12)


def test_gradient_accumulation_two_backward_calls():
    """Two losses, two backward calls (gradient accumulation, grad_output ≠ 1): .grad is the sum of both."""
    hid, w, b, x, t, s, mask, tw, g = _problem(23, 6, 41, seed=9)
    x2 = torch.randint(0, 41, (23,), generator=g)
    t2 = -torch.rand(23, generator=g, dtype=F64) * 3
    kw = dict(bias=b, sampling_logprobs=s, mask=mask, chunk_size=7)
    (on_policy_distill_loss(hid, w, x, t, **kw) * 0.5).backward()
    (on_policy_distill_loss(hid, w, x2, t2, **kw) * 2.0).backward()
    ref = 0.0
    for ids, tt, go in ((x, t, 0.5), (x2, t2, 2.0)):
        per = torch.where(mask, _ref_per_token(hid, w, b, ids, tt, s, dict(estimator="advantage", sampling=True),
                                               1.0, None), 0.0)
        ref = ref + go * per.sum() / mask.sum()
    want = _grads(ref, (hid, w, b))
    for leaf, e in zip((hid, w, b), want, strict=True):
        torch.testing.assert_close(leaf.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scalar_path_equals_deferred_low_precision(dtype):
    """bf16 / fp32 heads, odd shapes, masks: both paths within the dtype's error of the float64 reference of the
    same rounded inputs, and close to each other (they differ only in where grad_output is applied)."""
    n, h, v = 37, 16, 67
    hid, w, b, x, t, s, mask, tw, _ = _problem(n, h, v, seed=21, dtype=dtype, bias=False)
    t, s = t.float(), s.float()
    go = -1.3
    kw = dict(sampling_logprobs=s, mask=mask, chunk_size=8)
    scalar = on_policy_distill_loss(hid, w, x, t, **kw)
    deferred = on_policy_distill_loss(hid, w, x, t, reduction="none", **kw).sum() / mask.sum()
    assert scalar.dtype == torch.float32
    est = dict(estimator="advantage", sampling=True)
    ref = torch.where(mask, _ref_per_token(hid, w, None, x, t.double(), s.double(), est, 1.0, None), 0.0).sum()
    ref = ref / mask.sum()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(scalar.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(deferred, scalar, rtol=1e-6, atol=1e-6)
    gs, gd, gr = _grads(scalar * go, (hid, w)), _grads(deferred * go, (hid, w)), _grads(ref * go, (hid, w))
    for a, d, e in zip(gs, gd, gr, strict=True):
        assert a.dtype == dtype and d.dtype == dtype
        scale = e.abs().max().item()
        bound = (5e-2 if dtype == torch.bfloat16 else 1e-4) * scale
        assert (a.double() - e).abs().max().item() <= bound
        assert (d.double() - e).abs().max().item() <= bound
        assert (a.double() - d.double()).abs().max().item() <= bound


class _GemmCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.gemms += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction,per_chunk", [("mean", 3), ("sum", 3), ("none", 4)])
def test_gemms_per_chunk(reduction, per_chunk):
    """Scalar reductions: logits, grad-hidden, grad-weight once per chunk (no re-run in backward); "none" and the
    generic op run the logits GEMM again in backward."""
    hid, w, _, x, t, _, _, _, _ = _problem(20, 4, 13, seed=1, bias=False)
    with _GemmCounter() as c:
        out = on_policy_distill_loss(hid, w, x, t, estimator="k2", reduction=reduction, chunk_size=5)
        (out.sum() if reduction == "none" else out).backward()
    assert c.gemms == per_chunk * 4
    with _GemmCounter() as c:
        fastkd.logprobs_from_hidden(hid, w, x, chunk_size=5).sum().backward()
    assert c.gemms == 4 * 4
