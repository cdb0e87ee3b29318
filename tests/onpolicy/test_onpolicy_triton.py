"""The Triton row math of the on-policy family (fastkd.kernels.onpolicy, run in the interpreter) vs float64.

The kernels compute in fp32 (they take fp32 / bf16 / fp16 logits; float64 heads use the torch row math), so the
float64 references are met with fp32 tolerances; bf16 / fp16 heads are held to the torch backend on the same
rounded inputs and to float64 with a bound from the dtype. Every test checks that the kernels actually ran.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.core.registry import BackendUnavailableError
from fastkd.onpolicy import op as O
from fastkd.onpolicy import reference as R
from fastkd.onpolicy import triton_impl as TI
from fastkd.onpolicy.estimators import token_loss

F64 = torch.float64
TOL32 = dict(rtol=2e-5, atol=2e-6)  # fp32 row math against float64 (log-probs of order 1-10)
GTOL32 = dict(rtol=1e-4, atol=1e-5)  # gradients: + the fp32 GEMMs' accumulation over V and N

ESTIMATORS = [
    dict(estimator="k1"), dict(estimator="k2"), dict(estimator="k3"),
    dict(estimator="advantage"), dict(estimator="advantage", sampling=True),
    dict(estimator="advantage", sampling=True, clip=(0.2, 0.28)),
    dict(estimator="advantage", sampling=True, importance_ratio=False),
]


@pytest.fixture(params=[(16, 1), (4096, 8)], ids=["tiles16", "default"])
def launches(request, monkeypatch):
    """Count the Triton row launches (a test that expects them asserts they happened), with 16-column tiles (several
    per row) or the default block."""
    monkeypatch.setitem(TI.CONFIG, "block_v", request.param[0])
    monkeypatch.setitem(TI.CONFIG, "num_warps", request.param[1])
    calls = {"lse": 0, "grad": 0}
    lse, grad = TI.row_logprobs, TI.row_grad_

    def counted_lse(*a, **k):
        calls["lse"] += 1
        return lse(*a, **k)

    def counted_grad(*a, **k):
        calls["grad"] += 1
        return grad(*a, **k)

    monkeypatch.setattr(TI, "row_logprobs", counted_lse)
    monkeypatch.setattr(TI, "row_grad_", counted_grad)
    return calls


def _head(n, h, v, seed, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h) * 3).to(dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=F64).to(dtype).requires_grad_(True) if bias else None
    return hid, w, b, g


def _f64(*xs):
    """float64 leaves of the same (rounded) values."""
    return [None if x is None else x.detach().double().requires_grad_(True) for x in xs]


# ---- the kernels themselves -----------------------------------------------------------------------------------
@pytest.mark.parametrize("c,v,k,temp", [(7, 37, 1, 1.0), (13, 300, 5, 0.7), (33, 61, 3, 2.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_kernels_match_float64(launches, c, v, k, temp, dtype):
    g = torch.Generator().manual_seed(c * v + k)
    z = (torch.randn(c, v, generator=g, dtype=F64) * 3 + 40).to(dtype)  # an offset: the split lse keeps accuracy
    z[1, 5:9] = -math.inf
    z[2, ::3] = -math.inf
    ids = torch.randint(0, v, (c, k), generator=g)
    if k > 1:
        ids[0, 1] = ids[0, 0]  # a repeated id adds up
        ids[3, :] = ids[3, 0]
    ids[1, 0] = 6  # an id at a −inf logit: log-prob −inf, gradient exactly g there
    gk = torch.randn(c, k, generator=g, dtype=torch.float32)
    shift, ld, lq = TI.row_logprobs(z, ids, temp)
    z64 = z.double() / temp
    logq = torch.log_softmax(z64, -1)
    want = logq.gather(1, ids)
    torch.testing.assert_close(lq.double(), want, **TOL32)
    assert lq[1, 0] == -math.inf
    rs, rl, rq = O.torch_row_logprobs(z, ids, temp)  # the op's torch contract agrees
    torch.testing.assert_close(shift, rs)
    torch.testing.assert_close(ld, rl)
    torch.testing.assert_close(lq, rq, equal_nan=True)
    out = z.clone()
    TI.row_grad_(out, ids, gk, shift, ld, temp)
    ref = torch.zeros(c, v, dtype=F64).scatter_add_(1, ids, gk.double())
    ref = (ref - logq.exp() * gk.double().sum(-1, keepdim=True)) / temp
    # fp32 math, one rounding to the dtype on top of the fp32 error: half an ulp (fp16), a whole one for bf16 (the
    # interpreter's fp32 → bf16 conversion truncates; a GPU rounds to nearest)
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=eps + 1e-5, atol=1e-6)
    assert launches == {"lse": 1, "grad": 1}


def test_row_kernels_nan_row_and_out_of_range_ids(launches):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 41, generator=g)
    z[2, 7] = math.nan
    ids = torch.randint(0, 41, (5, 2), generator=g)
    ids[4, 1] = 41  # outside the row: never read, NaN log-prob
    ids[3, 0] = -1
    shift, ld, lq = TI.row_logprobs(z, ids, 1.0)
    assert lq[2].isnan().all() and lq[4, 1].isnan() and lq[3, 0].isnan()
    assert lq[[0, 1]].isfinite().all() and lq[4, 0].isfinite() and lq[3, 1].isfinite()
    out = z.clone()
    safe = torch.where((ids >= 0) & (ids < 41), ids, 0)
    TI.row_grad_(out, safe, torch.ones(5, 2), shift, ld, 1.0)
    assert out[2].isnan().all() and out[[0, 1, 3, 4]].isfinite().all()


# ---- through the public functions ------------------------------------------------------------------------------
def _kw(est, s):
    kw = {k: v for k, v in est.items() if k != "sampling"}
    if est.get("sampling"):
        kw["sampling_logprobs"] = s
    return kw


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_on_policy_loss_matches_float64(launches, est, reduction):
    n, h, v = 23, 6, 53
    hid, w, b, g = _head(n, h, v, 7)
    x = torch.randint(0, v, (n,), generator=g)
    t = -torch.rand(n, generator=g) * 4
    s = -torch.rand(n, generator=g) * 4
    mask = torch.rand(n, generator=g) > 0.25
    tw = torch.rand(n, generator=g) + 0.5
    temp, cap = 1.3, 6.0
    out = fastkd.on_policy_distill_loss(hid, w, x, t, bias=b, temperature=temp, softcap=cap, mask=mask,
                                        token_weight=tw, reduction=reduction, chunk_size=7, backend="triton",
                                        **_kw(est, s))
    h64, w64, b64 = _f64(hid, w, b)
    lq, _, _ = R.logprobs(h64, w64, x, bias=b64, temperature=temp, softcap=cap)
    clip = est.get("clip")
    per = token_loss(lq, t.double(), s.double() if est.get("sampling") else None, est["estimator"],
                     est.get("importance_ratio", True), clip)
    per = torch.where(mask, per, 0.0) * tw.double()
    want = per if reduction == "none" else per.sum() / (mask.sum() if reduction == "mean" else 1)
    torch.testing.assert_close(out.double(), want, **TOL32)
    go = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * go).sum(), (hid, w, b))
    ref = torch.autograd.grad((want * go.double()).sum(), (h64, w64, b64))
    for a, e in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), e, **GTOL32)
    assert launches["lse"] > 0 and launches["grad"] > 0


@pytest.mark.parametrize("k,cap", [(1, None), (2, 5.0), (5, None)])
def test_logprobs_from_hidden_matches_float64(launches, k, cap):
    n, h, v = 19, 5, 97
    hid, w, b, g = _head(n, h, v, k)
    ids = torch.randint(0, v, (n, k), generator=g)
    ids[4, :] = ids[4, 0]  # a repeated id
    with torch.no_grad():
        b[3] = -math.inf  # a column no token can take (−cap with a softcap)
    ids[2, 0] = 3
    out = fastkd.logprobs_from_hidden(hid, w, ids, bias=b, temperature=0.8, softcap=cap, chunk_size=6,
                                      backend="triton")
    h64, w64, b64 = _f64(hid, w, b)
    want, _, _ = R.logprobs(h64, w64, ids, bias=b64, temperature=0.8, softcap=cap)
    torch.testing.assert_close(out.double(), want, **TOL32)
    go = torch.randn(n, k, generator=g)
    if cap is None:
        assert out[2, 0] == -math.inf
        go[2, 0] = 0.0  # a −inf log-prob has no finite gradient
    got = torch.autograd.grad((out * go).sum(), (hid, w, b))
    ref = torch.autograd.grad((torch.where(go != 0, want, 0.0) * go.double()).sum(), (h64, w64, b64))
    for a, e in zip(got, ref, strict=True):
        assert a.isfinite().all()
        torch.testing.assert_close(a.double(), e, **GTOL32)
    assert launches["lse"] > 0 and launches["grad"] > 0


def test_logprobs_extras_keep_the_torch_row_math(launches):
    hid, w, b, g = _head(9, 4, 37, 3)
    ids = torch.randint(0, 37, (9,), generator=g)
    out = fastkd.logprobs_from_hidden(hid, w, ids, bias=b, return_entropy=True, return_topk=2, backend="triton")
    lq, ent, _ = R.logprobs(*_f64(hid, w), ids, bias=b.detach().double())
    torch.testing.assert_close(out.logprobs.double(), lq, **TOL32)
    torch.testing.assert_close(out.entropy.double(), ent, **TOL32)
    out.logprobs.sum().backward()
    assert launches == {"lse": 0, "grad": 0}


@pytest.mark.parametrize("sem,kw", [("verl_topk", dict(log_prob_min_clamp=-4.0)),
                                    ("verl_topk_tail", dict()), ("trl_tail", dict(divergence="jsd", beta=0.3))])
def test_framework_semantics_match_float64_torch(launches, sem, kw):
    """The framework semantics (autograd inside the chunk) on the Triton row math vs the torch path in float64
    (itself held to each framework's formula in test_onpolicy.py), with padding slots (the sparse API refuses a
    repeated id)."""
    n, h, v, k = 21, 6, 43, 4
    hid, w, b, g = _head(n, h, v, 17)
    t_lp, ids = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * 2.5, -1).topk(k, -1)
    ids[2, 1] = -1  # a padding slot
    ids[5] = -1  # an all-padding token
    t_lp = t_lp.float()
    loss, mass = fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, student_bias=b, temperature=0.8,
                                                         semantics=sem, return_mass=True, reduction="none",
                                                         chunk_size=5, backend="triton", **kw)
    h64, w64, b64 = _f64(hid, w, b)
    want, wmass = fastkd.fused_linear_sparse_distill_loss(h64, w64, ids, t_lp.double(), student_bias=b64,
                                                          temperature=0.8, semantics=sem, return_mass=True,
                                                          reduction="none", chunk_size=5, **kw)
    assert loss[5] == 0
    torch.testing.assert_close(loss.double(), want, **TOL32)
    for name in ("student_mass", "teacher_mass"):
        torch.testing.assert_close(mass[name].double(), wmass[name], **TOL32)
    go = torch.rand(n, generator=g)
    got = torch.autograd.grad((loss * go).sum(), (hid, w, b))
    ref = torch.autograd.grad((want * go.double()).sum(), (h64, w64, b64))
    for a, e in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), e, **GTOL32)
    assert launches["lse"] > 0 and launches["grad"] > 0  # reduction="none": the gradient in backward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_heads(launches, dtype):
    """bf16 / fp16 heads: the Triton and torch row math read the same rounded workspace logits and write the
    gradient in the workspace dtype, so they agree to fp32 on the loss and to about one ulp of the gradient per
    logit; against float64 of the same inputs the logits' own rounding (half an ulp of |z| ≲ 8) bounds the
    log-probs' error."""
    n, h, v = 29, 16, 131
    hid, w, b, g = _head(n, h, v, 11, dtype=dtype, bias=False)
    x = torch.randint(0, v, (n,), generator=g)
    t = -torch.rand(n, generator=g) * 4
    res = {}
    for be in ("torch", "triton"):
        loss = fastkd.on_policy_distill_loss(hid, w, x, t, estimator="k3", temperature=1.5, chunk_size=8, backend=be)
        res[be] = (loss, *torch.autograd.grad(loss, (hid, w)))
    assert launches["lse"] > 0 and launches["grad"] > 0
    torch.testing.assert_close(res["triton"][0], res["torch"][0], rtol=1e-5, atol=1e-6)
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for a, e in zip(res["triton"][1:], res["torch"][1:]):
        assert a.dtype == dtype
        err = (a.double() - e.double()).norm() / e.double().norm()
        assert err <= 2 * ulp, err
    h64, w64 = _f64(hid, w)
    lq, _, _ = R.logprobs(h64, w64, x, temperature=1.5)
    r = lq - t.double()
    want = (torch.expm1(-r) + r).mean()
    zmax = float((h64 @ w64.t()).detach().abs().max())
    bound = 2 * zmax * ulp / 2 / 1.5  # lse and the gathered logit each off by half an ulp of |z|, over T
    assert abs(float(res["triton"][0]) - float(want)) <= bound * float((1 - torch.exp(-r)).abs().mean()) + 1e-4
    lq_t = fastkd.logprobs_from_hidden(hid, w, x, temperature=1.5, backend="triton")
    assert (lq_t.double() - lq).abs().max() <= bound


def test_nan_in_nan_out(launches):
    hid, w, b, g = _head(8, 4, 29, 2)
    with torch.no_grad():
        hid[3, 1] = math.nan
    x = torch.randint(0, 29, (8,), generator=g)
    t = -torch.rand(8, generator=g)
    per = fastkd.on_policy_distill_loss(hid, w, x, t, estimator="k2", reduction="none", backend="triton")
    assert per[3].isnan() and per[[0, 1, 2, 4, 5, 6, 7]].isfinite().all()
    loss = fastkd.on_policy_distill_loss(hid, w, x, t, estimator="k2", backend="triton")
    assert loss.isnan()
    gh, gw = torch.autograd.grad(loss, (hid, w))
    assert gh[3].isnan().all() and gw.isnan().any()
    lq = fastkd.logprobs_from_hidden(hid, w, x, backend="triton")
    assert lq[3].isnan() and lq[[0, 1, 2, 4, 5, 6, 7]].isfinite().all()
    assert launches["lse"] > 0


def test_invalid_ids_without_value_checks(launches, no_value_checks):
    hid, w, b, g = _head(6, 4, 17, 5)
    ids = torch.randint(0, 17, (6, 3), generator=g)
    ids[1, 2], ids[4, 0] = -1, 17
    out = fastkd.logprobs_from_hidden(hid, w, ids, backend="triton")
    assert out[1, 2].isnan() and out[4, 0].isnan()
    keep = (ids >= 0) & (ids < 17)
    assert out[keep].isfinite().all()
    want, _, _ = R.logprobs(*_f64(hid, w), ids.clamp(0, 16))
    torch.testing.assert_close(out[keep].double(), want[keep], **TOL32)
    gh, gw = torch.autograd.grad(torch.where(keep, out, 0.0).sum(), (hid, w))
    assert gh.isfinite().all() and gw.isfinite().all()


def test_backend_choice_and_errors(launches):
    hid, w, b, g = _head(5, 4, 19, 1)
    x = torch.randint(0, 19, (5,), generator=g)
    t = -torch.rand(5, generator=g)
    fastkd.on_policy_distill_loss(hid, w, x, t)  # "auto" on CPU tensors: the torch row math
    fastkd.logprobs_from_hidden(hid, w, x)
    assert launches == {"lse": 0, "grad": 0}
    assert O.rows_backend("auto", hid, torch.float32, O.LOCAL) == "torch"
    assert O.rows_backend("triton", hid, torch.float32, O.LOCAL) == "triton"
    with pytest.raises(BackendUnavailableError, match="float64"):
        fastkd.on_policy_distill_loss(hid.double(), w.double(), x, t.double(), backend="triton")
    with pytest.raises(BackendUnavailableError, match="does not implement"):
        fastkd.logprobs_from_hidden(hid, w, x, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        fastkd.on_policy_distill_loss(hid, w, x, t, backend="gpu")
    with pytest.raises(BackendUnavailableError, match="collectives"):
        O.rows_backend("triton", hid, torch.float32, type("Sharded", (O.RowOps,), {})())


def test_chunk_rows_of_the_row_kernel():
    """No (rows, V) temporaries: the same budget holds more rows — the workspace in its dtype (+ the cap derivative,
    + the engine's fp32 gradient staging off CUDA) instead of 16 B per logit."""
    from fastkd.core.lmhead import auto_chunk_rows

    cpu, v, n = torch.device("cpu"), 128256, 10**6

    def rows(per_logit):
        return auto_chunk_rows(n, v, cpu, bytes_per_col=per_logit)

    assert O.chunk_rows(None, n, v, cpu) == rows(16)
    assert O.chunk_rows(None, n, v, cpu, "triton", torch.bfloat16, None, on_cuda=True) == rows(2) > rows(16)
    assert O.chunk_rows(None, n, v, cpu, "triton", torch.bfloat16, 30.0, on_cuda=True) == rows(4)
    assert O.chunk_rows(None, n, v, cpu, "triton", torch.bfloat16, None) == rows(6)
    assert O.chunk_rows(None, n, v, cpu, "triton", torch.float32, None, on_cuda=True) == rows(4)
    assert O.chunk_rows(5, n, v, cpu, "triton", torch.bfloat16) == 5

