"""Property tests (hypothesis): torch and Triton (interpreter) backends against the float64 references.

Covers every divergence of ``fastkd.DIVERGENCES`` (dense and fused), every sparse mode / value kind /
divergence (plain and fused), with adversarial draws: large logit scales, sharpened students (student =
teacher × 20, or × 5 at T = 0.25), students whose tail mass underflows fp32, masked tokens, and NaN/inf
inputs. Properties: where the float64 reference is finite, both backends are finite and agree with it (loss
and gradient, to an fp32 tolerance); a NaN input in a kept token gives a NaN loss for that token on every
backend. Shapes stay tiny and example counts bounded (the Triton interpreter runs on the CPU): the module
takes well under a minute. The number of examples each property ran is printed at the end of the module
(and a minimum is asserted), so a silently skipped property shows up.
"""

from __future__ import annotations

import collections
import contextlib
import math

import pytest
import torch
from helpers import teacher_slots
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.distill import reference as dref
from fastkd.distill import triton_impl as TD
from fastkd.sparse import reference as sref
from fastkd.sparse import triton_impl as TS

BACKENDS = ("torch", "triton")
RUN: collections.Counter[str] = collections.Counter()
MIN_EXAMPLES = 5  # per property that ran at all (hypothesis may stop early only on an exhausted space)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    old = dict(TS.CONFIG)
    TS.CONFIG.update(block_v=16, num_warps=1)  # several vocabulary tiles even at tiny V
    with TD.override_config(block_v=16, num_warps=1):
        yield
    TS.CONFIG.update(old)
    line = "hypothesis examples run: " + ", ".join(f"{k}={v}" for k, v in sorted(RUN.items()))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\ntests/core/test_properties.py {line} (total {sum(RUN.values())})", flush=True)
    low = {k: v for k, v in RUN.items() if v < MIN_EXAMPLES}
    assert not low, f"properties ran too few examples: {low}"


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2e-3) -> None:
    """fp32 result vs float64 reference: equal where the reference is finite, to tol · (1 + scale)."""
    got, want = got.double(), want.double()
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite where the float64 reference is finite"
    scale = float(want[fin].abs().max()) if bool(fin.any()) else 0.0
    torch.testing.assert_close(got[fin], want[fin], rtol=tol, atol=tol * (1 + scale), msg=what)


@st.composite
def logits_pair(draw, max_n=4, max_v=40):
    """(student, teacher, mask, T): fp32 logits with adversarial scales and sharpened students."""
    n = draw(st.integers(1, max_n))
    v = draw(st.integers(2, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 4.0, 12.0]))
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    kind = draw(st.sampled_from(["random", "sharpened", "sharpened_cold", "underflow_tail"]))
    temperature = 1.0
    if kind == "random":
        s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    elif kind == "sharpened":  # student = teacher × 20 at T = 1
        s = t * 20
    elif kind == "sharpened_cold":  # × 5 at T = 0.25
        s, temperature = t * 5, 0.25
    else:  # a few columns hold all the student's mass; the rest sits ~200 nats below
        s = torch.randn(n, v, generator=g, dtype=torch.float64) - 200.0
        s[:, : max(1, v // 8)] += 200.0
    temperature = draw(st.sampled_from([temperature, 2.0])) if kind == "random" else temperature
    mask = torch.rand(n, generator=g) > 0.25
    return s.float(), t.float(), mask, temperature


@settings(max_examples=14, **SETTINGS)
@given(data=logits_pair(), div=st.sampled_from(fastkd.DIVERGENCES))
def test_dense_backends_match_reference(data, div):
    RUN["dense"] += 1
    s, t, mask, temperature = data
    s64 = s.double().requires_grad_()
    want = dref.distill_loss(s64, t.double(), div, temperature=temperature, mask=mask, reduction="none")
    want.sum().backward()
    for backend in BACKENDS:
        x = s.clone().requires_grad_()
        loss = fastkd.distill_loss(x, t, div, temperature=temperature, mask=mask, reduction="none",
                                   backend=backend)
        loss.sum().backward()
        _close(loss.detach(), want.detach(), f"{backend} {div} loss")
        _close(x.grad, s64.grad, f"{backend} {div} grad")


@settings(max_examples=6, **SETTINGS)
@given(data=logits_pair(max_n=3, max_v=24), div=st.sampled_from(fastkd.DIVERGENCES),
       h=st.integers(1, 5))
def test_fused_dense_matches_reference(data, div, h):
    RUN["fused_dense"] += 1
    s, t, mask, temperature = data
    n, v = s.shape
    g = torch.Generator().manual_seed(n * 131 + v)
    hs, ht = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    ws, wt = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
    ws64 = ws.double().requires_grad_()
    want = dref.distill_loss(hs.double() @ ws64.T, ht.double() @ wt.double().T, div, temperature=temperature,
                             mask=mask, reduction="sum")
    want.backward()
    for backend in BACKENDS:
        w = ws.clone().requires_grad_()
        loss = fastkd.fused_linear_distill_loss(hs, w, ht, wt, divergence=div, temperature=temperature,
                                                mask=mask, reduction="sum", backend=backend)
        loss.backward()
        _close(loss.detach(), want.detach(), f"fused {backend} {div} loss")
        _close(w.grad, ws64.grad, f"fused {backend} {div} grad")


SPARSE_CASES = [
    ("topk", "logprobs", "fkl"), ("topk", "logprobs", "rkl"), ("topk", "logprobs", "jsd"),
    ("topk", "probs", "fkl"), ("topk", "logits", "jsd"), ("topk", "counts", "fkl"),
    ("topk_tail", "logprobs", "fkl"), ("topk_tail", "logprobs", "rkl"), ("topk_tail", "logprobs", "jsd"),
    ("topk_tail", "probs", "fkl"), ("sampled", "counts", "fkl"),
]


@st.composite
def sparse_inputs(draw, max_n=4, max_v=40):
    s, t, mask, temperature = draw(logits_pair(max_n=max_n, max_v=max_v))
    mode, kind, div = draw(st.sampled_from(SPARSE_CASES))
    n, v = s.shape
    k = draw(st.integers(1, min(6, v)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids, vals = teacher_slots(t.double(), k, kind, mode, g)
    if draw(st.booleans()) and k > 1:  # padding slots with garbage values
        ids[0, -1] = -1
        vals[0, -1] = 3.0
    return s, ids, vals, mask, temperature, mode, kind, div


@settings(max_examples=30, **SETTINGS)
@given(data=sparse_inputs())
def test_sparse_backends_match_reference(data):
    RUN["sparse"] += 1
    s, ids, vals, mask, temperature, mode, kind, div = data
    kw = dict(values=kind, mode=mode, divergence=div, temperature=temperature)
    vals = vals.float() if kind != "counts" else vals.int()  # the reference sees the very values fastkd gets
    s64 = s.double().requires_grad_()
    want = sref.sparse_distill_loss(s64, ids, vals, **kw) * mask
    want.sum().backward()
    for backend in BACKENDS:
        x = s.clone().requires_grad_()
        loss = fastkd.sparse_distill_loss(x, ids, vals, mask=mask, reduction="none", backend=backend, **kw)
        loss.sum().backward()
        _close(loss.detach(), want.detach(), f"{backend} {mode}/{kind}/{div} loss")
        _close(x.grad, s64.grad, f"{backend} {mode}/{kind}/{div} grad")


@settings(max_examples=10, **SETTINGS)
@given(data=sparse_inputs(max_n=3, max_v=24), h=st.integers(1, 5))
def test_fused_sparse_matches_reference(data, h):
    RUN["fused_sparse"] += 1
    s, ids, vals, mask, temperature, mode, kind, div = data
    n, v = s.shape
    g = torch.Generator().manual_seed(n * 977 + v)
    hs, ws = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 3
    kw = dict(values=kind, mode=mode, divergence=div, temperature=temperature)
    vals = vals.float() if kind != "counts" else vals.int()
    ws64 = ws.double().requires_grad_()
    want = (sref.sparse_distill_loss(hs.double() @ ws64.T, ids, vals, **kw) * mask).sum()
    want.backward()
    for backend in BACKENDS:
        w = ws.clone().requires_grad_()
        loss = fastkd.fused_linear_sparse_distill_loss(hs, w, ids, vals, mask=mask, reduction="sum", backend=backend,
                                                       **kw)
        loss.backward()
        _close(loss.detach(), want.detach(), f"fused {backend} {mode}/{kind}/{div} loss")
        _close(w.grad, ws64.grad, f"fused {backend} {mode}/{kind}/{div} grad")


@settings(max_examples=10, **SETTINGS)
@given(data=logits_pair(max_n=3, max_v=20), div=st.sampled_from(fastkd.DIVERGENCES),
       where=st.sampled_from(["student", "teacher"]), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       pos=st.integers(0, 10**6))
def test_dense_nonfinite_inputs(data, div, where, bad, pos):
    """NaN in a kept token → NaN loss there on every backend; ±inf → both backends agree with each other."""
    RUN["dense_nonfinite"] += 1
    s, t, _, temperature = data
    n, v = s.shape
    row, col = pos % n, (pos // n) % v
    clean = dref.distill_loss(s.double(), t.double(), div, temperature=temperature, reduction="none")
    (s if where == "student" else t)[row, col] = bad
    others = [i for i in range(n) if i != row]
    out = {}
    for backend in BACKENDS:
        x = s.clone().requires_grad_()
        loss = fastkd.distill_loss(x, t, div, temperature=temperature, reduction="none", backend=backend)
        loss.sum().backward()
        out[backend] = (loss.detach(), x.grad)
        if math.isnan(bad):
            assert torch.isnan(loss[row]), f"{backend} {div}: NaN {where} gave {loss[row]}"
        _close(loss.detach()[others], clean[others], f"{backend} {div}: the other tokens")
    lt, gt = out["torch"]
    lx, gx = out["triton"]
    assert torch.equal(lt.isnan(), lx.isnan()), (div, where, bad, lt, lx)
    _close(lx, lt, f"{div}: triton vs torch")


@settings(max_examples=15, **SETTINGS)
@given(data=sparse_inputs(max_n=3, max_v=20), where=st.sampled_from(["student_id", "student_other", "teacher"]),
       pos=st.integers(0, 10**6))
def test_sparse_nan_inputs(data, where, pos):
    """A NaN in a kept token's student logits or teacher values → NaN loss for that token, every backend."""
    RUN["sparse_nan"] += 1
    s, ids, vals, _, temperature, mode, kind, div = data
    n, v = s.shape
    row = pos % n
    kw = dict(values=kind, mode=mode, divergence=div, temperature=temperature)
    vals = vals.float() if kind != "counts" else vals.int()
    clean = sref.sparse_distill_loss(s.double(), ids, vals, **kw)
    slots = [j for j in range(ids.shape[1]) if ids[row, j] >= 0]
    off_ids = [c for c in range(v) if c not in ids[row].tolist()]
    if where == "teacher":
        assume(kind != "counts")
        vals = vals.clone()
        vals[row, slots[pos % len(slots)]] = math.nan
    elif where == "student_id":
        s[row, int(ids[row, slots[pos % len(slots)]])] = math.nan
    else:
        # topk rkl/jsd renormalise the student over the ids: a NaN elsewhere does not enter the loss
        assume(off_ids and not (mode == "topk" and div != "fkl"))
        s[row, off_ids[pos % len(off_ids)]] = math.nan
    for backend in BACKENDS:
        x = s.clone().requires_grad_()
        loss = fastkd.sparse_distill_loss(x, ids, vals, reduction="none", backend=backend, **kw)
        loss.sum().backward()
        assert torch.isnan(loss[row]), f"{backend} {mode}/{kind}/{div}: NaN {where} gave {loss[row]}"
        others = [i for i in range(n) if i != row]
        _close(loss.detach()[others], clean[others], f"{backend} {mode}/{kind}/{div}: the other tokens")
