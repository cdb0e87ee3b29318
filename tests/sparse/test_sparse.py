"""sparse_distill_loss / fused_linear_sparse_distill_loss vs float64 formulas (torch and Triton backends)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import teacher_slots
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.core.registry import BackendUnavailableError
from fastkd.distill import reference as ref_dense
from fastkd.sparse import reference as ref
from fastkd.sparse import triton_impl as TS

CASES = [("topk", "logprobs", d) for d in ("fkl", "rkl", "jsd")] + [
    ("topk", "probs", "jsd"),
    ("topk", "logits", "fkl"),
    ("topk", "logits", "rkl"),
    ("topk", "counts", "fkl"),
    ("topk_tail", "logprobs", "fkl"),
    ("topk_tail", "logprobs", "rkl"),
    ("topk_tail", "probs", "jsd"),
    ("sampled", "counts", "fkl"),
]


def formula(z, ids, vals, kind, mode, div, T=1.0, Tg=None, beta=0.5):
    """Per-token float64 loss written slot by slot (independent of fastkd.sparse.reference)."""
    out = []
    for i in range(z.shape[0]):
        s = z[i] / T
        log_q = s - torch.logsumexp(s, 0)
        slots = [k for k in range(ids.shape[1]) if ids[i, k] >= 0]
        sid = [int(ids[i, k]) for k in slots]
        u = [vals[i, k].double() for k in slots]
        if mode == "topk_tail":
            pk = [x.exp() if kind == "logprobs" else x for x in u]
            pt = (1 - sum(pk)).clamp_min(0)
            qk = [log_q[j].exp() for j in sid]
            qt = sum(log_q[j].exp() for j in range(z.shape[1]) if j not in sid)
            P, Q = [*pk, pt], [*qk, qt]
        else:
            lu = [x if kind in ("logprobs", "logits") else x.log() for x in u]
            f = 1 / T if kind == "logits" else (Tg / T if Tg else 1.0)
            lse_u = torch.logsumexp(torch.stack(lu) * f, 0)
            P = [(x * f - lse_u).exp() for x in lu]
            if div == "fkl":
                out.append(sum(p * (p.log() - log_q[j]) for p, j in zip(P, sid)))
                continue
            lse_s = torch.logsumexp(torch.stack([s[j] for j in sid]), 0)
            Q = [(s[j] - lse_s).exp() for j in sid]
        kl = lambda a, b: sum(x * (x.log() - y.log()) for x, y in zip(a, b) if x > 0)
        if div == "fkl":
            out.append(kl(P, Q))
        elif div == "rkl":
            out.append(kl(Q, P))
        else:
            M = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
            out.append(beta * kl(P, M) + (1 - beta) * kl(Q, M))
    return torch.stack(out)


def make(n, v, k, kind, mode, dtype=torch.float64, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ids, vals = teacher_slots(t, k, kind, mode, g)
    if pad and n > 1 and k > 2:
        ids[1, -2:] = -1  # padding slots carry garbage values
        vals[1, -2:] = 7.0 if kind in ("logits", "probs", "counts") else -3.0
    return z, ids, vals


@pytest.mark.parametrize("mode,kind,div", CASES)
def test_reference_matches_slotwise_formula(mode, kind, div):
    z, ids, vals = make(3, 9, 4, kind, mode)
    for T, Tg in ((1.0, None), (2.0, 1.5 if mode == "topk" and kind in ("logprobs", "probs") else None)):
        a = ref.sparse_distill_loss(
            z, ids, vals, values=kind, mode=mode, divergence=div, temperature=T, teacher_temperature=Tg
        )
        torch.testing.assert_close(a, formula(z, ids, vals, kind, mode, div, T, Tg), rtol=1e-10, atol=1e-12)


def _check_vs_ref(backend, mode, kind, div, dtype, n=6, v=37, k=5, T=1.5, rtol=1e-9, atol=1e-10):
    z, ids, vals = make(n, v, k, kind, mode, dtype=torch.float64)
    z[2, 4] = -math.inf  # a masked vocabulary entry (not among the ids unless chance)
    ids[2] = torch.where(ids[2] == 4, torch.tensor(5 if 5 not in ids[2] else -1), ids[2])
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    zz = z.to(dtype).requires_grad_()
    z64 = zz.detach().double().requires_grad_()
    kw = dict(values=kind, mode=mode, divergence=div, temperature=T, scale_by_t2=True)
    loss = fastkd.sparse_distill_loss(
        zz,
        ids,
        vals.to(dtype) if kind != "counts" else vals,
        mask=mask,
        reduction="none",
        backend=backend,
        **kw,
    )
    go = torch.rand(n, dtype=torch.float64) + 0.5
    (loss.double() * go).sum().backward()
    exp = ref.sparse_distill_loss(z64, ids, vals, **kw) * mask
    (exp * go).sum().backward()
    torch.testing.assert_close(loss.double(), exp, rtol=rtol, atol=atol)
    torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=rtol, atol=atol)
    assert zz.grad[3].abs().max() == 0 and loss[3] == 0


@pytest.mark.parametrize("mode,kind,div", CASES)
def test_torch_backend_float64(mode, kind, div):
    _check_vs_ref("torch", mode, kind, div, torch.float64)


@pytest.mark.parametrize("mode,kind,div", CASES)
def test_triton_backend_float32(mode, kind, div, small_blocks):
    _check_vs_ref("triton", mode, kind, div, torch.float32, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "mode,kind,div",
    [
        ("topk", "logprobs", "fkl"),
        ("topk", "logprobs", "jsd"),
        ("topk_tail", "logprobs", "rkl"),
        ("sampled", "counts", "fkl"),
    ],
)
def test_bf16_within_pytorch_error(backend, mode, kind, div, small_blocks):
    z, ids, vals = make(8, 50, 6, kind, mode)
    zb = z.bfloat16().requires_grad_()
    z64 = zb.detach().double().requires_grad_()
    kw = dict(values=kind, mode=mode, divergence=div, reduction="sum")
    out = fastkd.sparse_distill_loss(zb, ids, vals.float(), backend=backend, **kw)
    out.backward()
    assert out.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16
    kw.pop("reduction")
    exp = ref.sparse_distill_loss(z64, ids, vals, **kw).sum()
    exp.backward()
    # PyTorch's own bf16: the student's log-softmax in bf16, gradient rounded to bf16
    zt = zb.detach().clone().requires_grad_()
    own = ref.sparse_distill_loss(zt, ids, vals, **kw).sum()
    own.backward()
    loss_tol = 2 * abs(float(own.detach()) - float(exp.detach())) + 1e-3 * abs(float(exp.detach()))
    grad_tol = 2 * float((zt.grad.double() - z64.grad).abs().max()) + 1e-3
    assert abs(float(out.detach()) - float(exp.detach())) <= loss_tol
    assert float((zb.grad.double() - z64.grad).abs().max()) <= grad_tol


@pytest.mark.parametrize(
    "mode,kind,div",
    [
        ("topk", "logprobs", "fkl"),
        ("topk", "logprobs", "rkl"),
        ("topk_tail", "logprobs", "jsd"),
        ("sampled", "counts", "fkl"),
    ],
)
def test_finite_differences(mode, kind, div):
    z, ids, vals = make(3, 7, 3, kind, mode)
    go = torch.rand(3, dtype=torch.float64) + 0.5  # a grad_output != 1 per token
    f = lambda x: (
        fastkd.sparse_distill_loss(
            x,
            ids,
            vals,
            values=kind,
            mode=mode,
            divergence=div,
            temperature=1.3,
            backend="torch",
            reduction="none",
        )
        * go
    ).sum()
    # finite differences by hand: the Function refuses the repeated backward torch's gradcheck performs
    zz = z.clone().requires_grad_()
    f(zz).backward()
    num = torch.zeros_like(z)
    eps = 1e-6
    for idx in range(z.numel()):
        d = torch.zeros(z.numel(), dtype=torch.float64)
        d[idx] = eps
        d = d.view_as(z)
        num.view(-1)[idx] = (f(z + d) - f(z - d)) / (2 * eps)
    torch.testing.assert_close(zz.grad, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "mode,kind,div,reduction",
    [
        ("topk", "logprobs", "fkl", "mean"),
        ("topk_tail", "logprobs", "jsd", "sum"),
        ("topk", "logits", "rkl", "none"),
    ],
)
def test_fused_matches_reference(backend, mode, kind, div, reduction, small_blocks):
    n, h, v = 11, 8, 29
    g = torch.Generator().manual_seed(1)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.5
    b = torch.randn(v, generator=g) * 0.1
    _, ids, vals = make(n, v, 4, kind, mode)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5]] = -100
    leaves = [x.clone().requires_grad_() for x in (hid, w, b)]
    loss = fastkd.fused_linear_sparse_distill_loss(
        leaves[0],
        leaves[1],
        ids,
        vals.float(),
        student_bias=leaves[2],
        softcap=3.0,
        chunk_size=4,
        values=kind,
        mode=mode,
        divergence=div,
        temperature=1.7,
        labels=labels,
        reduction=reduction,
        backend=backend,
    )
    go = torch.rand(loss.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(0.7)
    (loss.double() * go).sum().backward()
    leaves64 = [x.double().requires_grad_() for x in (hid, w, b)]
    z = ref_dense.apply_softcap(leaves64[0] @ leaves64[1].t() + leaves64[2], 3.0)
    per = ref.sparse_distill_loss(z, ids, vals, values=kind, mode=mode, divergence=div, temperature=1.7)
    keep = (labels != -100).double()
    exp = (
        per * keep if reduction == "none" else (per * keep).sum() / (keep.sum() if reduction == "mean" else 1)
    )
    (exp * go).sum().backward()
    torch.testing.assert_close(loss.double(), exp, rtol=1e-4, atol=1e-5)
    for got, want in zip(leaves, leaves64):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


def test_fused_equals_unfused_torch():
    n, h, v = 10, 6, 23
    hid, w = torch.randn(n, h), torch.randn(v, h)
    _, ids, vals = make(n, v, 5, "logprobs", "topk_tail")
    a = [x.clone().requires_grad_() for x in (hid, w)]
    b = [x.clone().requires_grad_() for x in (hid, w)]
    kw = dict(mode="topk_tail", divergence="fkl", backend="torch")
    la = fastkd.fused_linear_sparse_distill_loss(a[0], a[1], ids, vals.float(), chunk_size=3, **kw)
    lb = fastkd.sparse_distill_loss(b[0] @ b[1].t(), ids, vals.float(), **kw)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[0].grad, b[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1].grad, b[1].grad, rtol=1e-5, atol=1e-6)


def test_topk_with_all_ids_equals_dense_fkl():
    z, t = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    ids = torch.arange(12).expand(4, 12).flip(-1).contiguous()
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    for mode in ("topk", "topk_tail"):
        got = fastkd.sparse_distill_loss(z, ids, lp, mode=mode, reduction="none", backend="torch")
        torch.testing.assert_close(got, ref_dense.per_token(z, t, "fkl"), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tail_to_zero_is_stable(backend, small_blocks):
    # the student puts ~e^-60 outside the K ids; the teacher's tail is ~1e-9: 1 − Σq would cancel to 0
    v = 40
    z = torch.full((2, v), -60.0, dtype=torch.float64)
    ids = torch.tensor([[3, 7, 11, 20], [0, 1, 2, 39]])
    z.scatter_(1, ids, torch.tensor([[2.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64))
    dtype = torch.float64 if backend == "torch" else torch.float32
    tail = 1e-9 if dtype == torch.float64 else 1e-4  # the teacher's tail: tiny but above value rounding
    p = torch.tensor([[0.5, 0.3, 0.2 - tail, 0.0], [0.25, 0.25, 0.25, 0.25 - tail]], dtype=torch.float64)
    vals = p.clamp_min(1e-30).log().to(dtype).double()
    for div in ("fkl", "rkl", "jsd"):
        zz = z.to(dtype).detach().clone().requires_grad_()
        z64 = z.detach().clone().requires_grad_()
        got = fastkd.sparse_distill_loss(
            zz, ids, vals.to(dtype), mode="topk_tail", divergence=div, reduction="sum", backend=backend
        )
        got.backward()
        exp = ref.sparse_distill_loss(z64, ids, vals, mode="topk_tail", divergence=div).sum()
        exp.backward()
        assert torch.isfinite(got) and torch.isfinite(zz.grad).all()
        tol = 1e-9 if backend == "torch" else 1e-5
        torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol)
        torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=tol, atol=tol)


def test_sampled_gradient_is_unbiased():
    """Average of the sampled-KD gradient over many teacher draws = the exact dense forward-KL gradient."""
    g = torch.Generator().manual_seed(3)
    v, draws, trials = 13, 6, 4000
    z = torch.randn(v, dtype=torch.float64, generator=g)
    p = torch.softmax(torch.randn(v, dtype=torch.float64, generator=g) * 1.5, -1)
    samples = torch.multinomial(p.expand(trials, v), draws, replacement=True, generator=g)
    counts = torch.zeros(trials, v, dtype=torch.float64).scatter_add_(
        1, samples, torch.ones_like(samples).double()
    )
    order = counts.sort(dim=-1, descending=True, stable=True).indices[
        :, :draws
    ]  # ≤ draws distinct ids per trial
    cnt = counts.gather(1, order)
    ids = torch.where(cnt > 0, order, -1)
    zz = z.expand(trials, v).clone().requires_grad_()
    fastkd.sparse_distill_loss(
        zz, ids, cnt, values="counts", mode="sampled", reduction="sum", backend="torch"
    ).backward()
    exact = torch.softmax(z, -1) - p
    mean, se = zz.grad.mean(0), zz.grad.std(0) / math.sqrt(trials)
    assert ((mean - exact).abs() <= 4.5 * se + 1e-12).all(), (mean - exact) / se
    # the test has power: deterministic top-k (renormalised) is biased by many standard errors
    top = p.topk(draws)
    zt = z.clone().requires_grad_()
    fastkd.sparse_distill_loss(
        zt[None], top.indices[None], top.values.log()[None], backend="torch"
    ).backward()
    assert ((zt.grad - exact).abs() / (se + 1e-12)).max() > 10


def test_teacher_temperature_retempering():
    z, ids, vals = make(3, 10, 4, "logprobs", "topk")
    got = fastkd.sparse_distill_loss(z, ids, vals, temperature=2.0, teacher_temperature=1.0, reduction="none")
    valid = ids >= 0
    pw = torch.where(valid, vals.exp() ** 0.5, 0)  # p^(T_gen/T)
    pt = pw / pw.sum(-1, keepdim=True)
    log_q = torch.log_softmax(z / 2, -1).gather(-1, ids.clamp_min(0))
    exp = torch.where(valid & (pt > 0), pt * (pt.log() - log_q), 0).sum(-1)
    torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_masked_and_padding_rows(backend, small_blocks):
    z, ids, vals = make(4, 20, 3, "logprobs", "topk", dtype=torch.float32)
    z.requires_grad_()
    out = fastkd.sparse_distill_loss(
        z, ids, vals.float(), mask=torch.zeros(4, dtype=torch.bool), backend=backend
    )
    out.backward()
    assert out == 0 and z.grad.abs().max() == 0
    z.grad = None
    ids2 = ids.clone()
    ids2[0] = -1  # a token with no teacher slot contributes 0
    out = fastkd.sparse_distill_loss(z, ids2, vals.float(), reduction="none", backend=backend)
    out.sum().backward()
    assert out[0] == 0 and z.grad[0].abs().max() == 0 and torch.isfinite(z.grad).all()


def test_reductions_and_determinism():
    z, ids, vals = make(6, 15, 4, "logprobs", "topk", dtype=torch.float32)
    vals = vals.float()
    per = fastkd.sparse_distill_loss(z, ids, vals, reduction="none")
    torch.testing.assert_close(fastkd.sparse_distill_loss(z, ids, vals, reduction="sum"), per.sum())
    torch.testing.assert_close(fastkd.sparse_distill_loss(z, ids, vals), per.mean())
    torch.testing.assert_close(fastkd.sparse_distill_loss(z, ids, vals, num_items_in_batch=4), per.sum() / 4)
    a = fastkd.sparse_distill_loss(z.view(2, 3, 15), ids.view(2, 3, 4), vals.view(2, 3, 4), reduction="none")
    assert a.shape == (2, 3) and torch.equal(a.reshape(-1), per)
    assert torch.equal(per, fastkd.sparse_distill_loss(z, ids, vals, reduction="none"))
    icounts = torch.randint(1, 4, (6, 4))  # integer counts are accepted
    fastkd.sparse_distill_loss(z, ids, icounts, values="counts", mode="sampled")


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 5),
    v=st.integers(2, 30),
    k=st.integers(1, 6),
    t=st.floats(0.5, 3.0),
    case=st.sampled_from(CASES),
    beta=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_property_torch_vs_reference(n, v, k, t, case, beta):
    mode, kind, div = case
    k = min(k, v)
    z, ids, vals = make(n, v, k, kind, mode, pad=False, seed=n * 1000 + v)
    zz, z64 = z.clone().requires_grad_(), z.clone().requires_grad_()
    kw = dict(values=kind, mode=mode, divergence=div, temperature=t, beta=beta)
    got = fastkd.sparse_distill_loss(zz, ids, vals, reduction="sum", backend="torch", **kw)
    got.backward()
    exp = ref.sparse_distill_loss(z64, ids, vals, **kw).sum()
    exp.backward()
    torch.testing.assert_close(got, exp, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(zz.grad, z64.grad, rtol=1e-8, atol=1e-9)


def test_bad_inputs():
    z, ids, vals = make(3, 10, 4, "logprobs", "topk", dtype=torch.float32)
    vals = vals.float()
    f = fastkd.sparse_distill_loss

    def bad(exc, match, *args, **kw):
        with pytest.raises(exc, match=match):
            f(*args, **kw)

    bad(ValueError, "teacher_ids must be in", z, ids.clamp_max(5) + 5, vals)
    bad(ValueError, "teacher_ids must be in", z, torch.full_like(ids, -2), vals)
    dup = ids.clone()
    dup[1, 1] = dup[1, 0]
    bad(ValueError, "duplicated", z, dup, vals)
    bad(ValueError, "must be >= 0", z, ids, -vals.exp(), values="probs")
    bad(ValueError, "must be >= 0", z, ids, -torch.ones(3, 4), values="counts", mode="sampled")
    bad(ValueError, "teacher_values shape", z, ids, vals[:, :3])
    bad(ValueError, "K = 0", z, ids[:, :0], vals[:, :0])
    bad(ValueError, "teacher_ids must have shape", z, ids[:2], vals[:2])
    bad(ValueError, "device", z, ids.to("meta"), vals)
    bad(TypeError, "integer tensor", z, ids.float(), vals)
    bad(TypeError, "teacher_values must be a float", z, ids, vals.long())
    bad(ValueError, "requires grad", z, ids, vals.clone().requires_grad_())
    bad(ValueError, "mode must be", z, ids, vals, mode="dense")
    bad(ValueError, "divergence must be", z, ids, vals, divergence="tvd")
    bad(ValueError, "values must be", z, ids, vals, values="scores")
    bad(ValueError, "forward KL only", z, ids, vals.exp(), values="counts", mode="sampled", divergence="rkl")
    bad(ValueError, "values='counts'", z, ids, vals, mode="sampled")
    bad(ValueError, "only meaningful with mode='topk'", z, ids, vals, values="logits", mode="topk_tail")
    bad(ValueError, "no tail mass", z, ids, vals.exp(), values="counts", mode="topk_tail")
    bad(ValueError, "teacher_temperature", z, ids, vals, mode="topk_tail", teacher_temperature=2.0)
    bad(ValueError, "teacher_temperature", z, ids, vals, teacher_temperature=0.0)
    bad(ValueError, "values='logits'", z, ids, vals.abs() + 1)
    bad(ValueError, "more than 1", z, ids, torch.full_like(vals, -0.1), mode="topk_tail")
    bad(ValueError, "temperature", z, ids, vals, temperature=0)
    bad(ValueError, "beta", z, ids, vals, beta=1.5)
    bad(BackendUnavailableError, "float64", z.double(), ids, vals.double(), backend="triton")
    with pytest.raises(ValueError, match="student_hidden has hidden size"):
        fastkd.fused_linear_sparse_distill_loss(torch.randn(3, 5), torch.randn(10, 4), ids, vals)
    with pytest.raises(ValueError, match="teacher_ids must be in"):
        fastkd.fused_linear_sparse_distill_loss(
            torch.randn(3, 4), torch.randn(8, 4), ids.clamp_min(0) + 2, vals
        )


def _stats_triton(z, ids, T=1.0):
    """The Triton stats kernel alone: (shift, lse, lse_tail, s_ids) of rows z (N, V) and ids (N, K); the last
    three are relative to the shift (the row max)."""
    n, v = z.shape
    k = ids.shape[1]
    shift, lse, lse_tail = torch.empty(n), torch.empty(n), torch.empty(n)
    s_ids = torch.empty(n, k)
    bv = min(TS.CONFIG["block_v"], max(16, 1 << (v - 1).bit_length()))
    TS.K_._sparse_stats_kernel[(n,)](z, ids, ids.sort(1).values, shift, lse, lse_tail, s_ids, lse, ids, v, k,
                                     z.stride(0), ids.stride(0), 1.0 / T, HAS_TAIL=True, STATS=False, BLOCK_V=bv,
                                     BLOCK_K=max(2, 1 << (k - 1).bit_length()), num_warps=1)
    return shift, lse, lse_tail, s_ids


@pytest.mark.parametrize("k", [1, 7, 64, 200])
@pytest.mark.parametrize("block_v", [16, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_membership_vs_float64(k, block_v, dtype):
    """The sorted-id tile walk excludes exactly the row's ids from the tail: odd V (a partial last tile), ids
    clustered in one tile and spread over many, −inf logits, padding −1 and repeated ids (excluded once), ids
    outside [−1, V) (never a column; their s is NaN)."""
    if TS._IMPORT_ERROR is not None:
        pytest.skip(TS._IMPORT_ERROR)
    n, v = 5, 301
    g = torch.Generator().manual_seed(k * 7 + block_v)
    z = (torch.randn(n, v, generator=g) * 3).to(dtype)
    z[:, 17] = -math.inf
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ids[1] = torch.arange(k) + 40 if k < 64 else torch.arange(k) + 200  # clustered: one or a few tiles
    if k >= 7:
        ids[2, -3:] = -1  # padding
        ids[3, 1] = ids[3, 0]  # a repeated id: one column
        ids[4, 0], ids[4, 1] = v, -5  # out of range: no column
    ids[0, 0] = 17  # an id at a −inf logit
    old = dict(TS.CONFIG)
    TS.CONFIG.update(block_v=block_v)
    try:
        shift, lse, lse_tail, s_ids = _stats_triton(z, ids)
    finally:
        TS.CONFIG.update(old)
    zd = z.double()
    assert torch.equal(shift, z.float().amax(-1))
    for i in range(n):
        cols = {int(c) for c in ids[i] if 0 <= int(c) < v}
        keep = torch.tensor([c not in cols for c in range(v)])
        zi = zd[i] - shift[i].double()
        torch.testing.assert_close(lse[i].double(), torch.logsumexp(zi, 0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse_tail[i].double(), torch.logsumexp(zi[keep], 0), rtol=1e-6, atol=1e-6)
        for j, c in enumerate(ids[i].tolist()):
            want = zi[c] if 0 <= c < v else (-math.inf if c == -1 else math.nan)
            torch.testing.assert_close(s_ids[i, j].double(), torch.tensor(want, dtype=torch.float64),
                                       equal_nan=True)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_topk_tail_k64_triton_vs_float64(div, small_blocks):
    """topk_tail at K = 64 on an odd vocabulary through the public function (loss and gradient, masked row)."""
    _check_vs_ref("triton", "topk_tail", "logprobs", div, torch.float32, n=4, v=131, k=64, rtol=2e-5, atol=2e-6)


def test_custom_op_arguments_are_the_sparse_params_fields(monkeypatch):
    """fastkd::sparse_rows takes the SparseParams fields (but softcap) as typed scalars, in field order (mode as
    sparse_mode), and the backend receives the record unchanged: None chunk_size and bool survive the boundary."""
    import dataclasses

    from fastkd.core.params import SparseParams
    from fastkd.sparse import op as sparse_op

    schema = sparse_op.sparse_rows._opoverload._schema
    names = [a.name for a in schema.arguments][8:]
    assert names == [{"mode": "sparse_mode"}.get(f.name, f.name) for f in dataclasses.fields(SparseParams)
                     if f.name != "softcap"]
    seen = []
    real = sparse_op.select
    monkeypatch.setattr(sparse_op, "select", lambda op, backend, **kw: seen.append(kw["params"]) or real(
        op, backend, **kw))
    z = torch.randn(3, 9, dtype=torch.float64)
    ids = torch.tensor([[0, 4, 7], [1, 2, 8], [5, 3, -1]])
    lp = torch.log_softmax(torch.randn(3, 3, dtype=torch.float64), -1)
    w = torch.ones(3, dtype=torch.float64)
    p = SparseParams(divergence="jsd", temperature=1.5, scale_by_t2=True, beta=0.25, mode="topk", chunk_size=2)
    sparse_op._backend_fn("torch")(z, ids, lp, None, w, None, p)
    sparse_op._backend_fn("torch")(z, ids, lp, None, w, None, SparseParams())
    assert seen[0] == p and isinstance(seen[0].scale_by_t2, bool) and isinstance(seen[0].chunk_size, int)
    assert seen[1].chunk_size is None
