"""``return_stats=True`` of the sparse losses (issue 16): every backend against the float64 oracle
(``fastkd.sparse.reference.sparse_stats``), the kl == fkl-loss identity, and loss / gradient bitwise unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import teacher_slots

import fastkd
from fastkd.core import checks as C
from fastkd.core.stats import STATS_KEYS
from fastkd.sparse import reference as ref
from fastkd.sparse import triton_impl as TS
from fastkd.sparse.student_ids import union_ids

N, V, K, T = 7, 37, 5, 1.5  # odd V: with BLOCK_V = 16 the Triton kernels walk 3 tiles, the last one partial


BACKENDS = ["torch", "triton-row", "triton-split"]  # the Triton backend's two schedules (kernels/sparse*.py)


@pytest.fixture
def default_blocks():
    old = dict(TS.CONFIG)
    yield
    TS.CONFIG.update(old)


def use(backend: str) -> str:
    """The backend name for fastkd ("triton-row" / "triton-split" also pick the Triton schedule)."""
    if backend.startswith("triton"):
        TS.CONFIG["schedule"] = backend.split("-")[1]
        return "triton"
    return backend


def make(mode, values="logprobs", seed=0, n=N, v=V, k=K):
    """Student logits (float64) and a teacher built around them: some rows' top id is the student's argmax,
    others not; −inf student logits off and at the ids, padding slots with garbage values, one empty row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.where(torch.arange(n).unsqueeze(-1) % 2 == 0, 3 * z, torch.zeros_like(z))
    t = t + torch.randn(n, v, generator=g, dtype=torch.float64)
    ids, vals = teacher_slots(t, k, values, mode, g)
    if mode == "sampled" or values == "counts":
        ids[0, 0] = int(z[0].argmax())  # a drawn id at the student's argmax, with the most draws
        ids[0, 1:] = torch.where(ids[0, 1:] == ids[0, 0], (ids[0, 0] + 1) % v, ids[0, 1:])
        vals[0, 0] = 9.0
    z[2, ids[2, 1]] = -math.inf  # −inf at a teacher id: kl = +inf for that token
    off = [j for j in range(v) if j not in ids[3].tolist()][:3]
    z[3, off] = -math.inf  # −inf off the ids: entropies stay finite
    ids[1, -2:] = -1  # padding slots carry garbage values
    vals[1, -2:] = 7.0 if values != "logprobs" else -3.0
    if mode != "sampled" and values != "counts":
        ids[5] = -1  # no teacher slot at all: teacher entropy 0, no top id (topk: loss 0)
    return z, ids, vals


def check_stats(got, exp, keep, rtol=2e-5, atol=2e-5):
    assert set(got) == set(STATS_KEYS)
    for name in STATS_KEYS:
        g = got[name]
        assert g.dtype == torch.float32 and g.shape == (keep.numel(),) and not g.requires_grad, name
        assert (g[~keep] == 0).all(), name
        torch.testing.assert_close(g.double(), exp[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


CASES = [
    ("topk", "logprobs", "fkl"),
    ("topk", "logits", "rkl"),
    ("topk", "probs", "jsd"),
    ("topk_tail", "logprobs", "fkl"),
    ("topk_tail", "probs", "jsd"),
    ("sampled", "counts", "fkl"),
]


def _run(backend, mode, values, div, dtype=torch.float32, **kw):
    z, ids, vals = make(mode, values)
    mask = torch.ones(N, dtype=torch.bool)
    mask[4] = False
    zz = z.to(dtype).requires_grad_()
    tv = vals.to(dtype) if values not in ("counts",) and dtype != torch.float64 else vals
    loss, st = fastkd.sparse_distill_loss(zz, ids, tv, values=values, mode=mode, divergence=div, temperature=T,
                                          mask=mask, backend=use(backend), return_stats=True, **kw)
    # the oracle gets the values in their dtype: topk_tail's "no tail below 4·K·eps" rule uses their eps
    exp = ref.sparse_stats(zz.detach().double(), ids, tv, values=values, mode=mode, temperature=T, mask=mask, **kw)
    return loss, st, exp, mask


@pytest.mark.parametrize("mode,values,div", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_vs_float64(backend, mode, values, div, small_blocks):
    _, st, exp, keep = _run(backend, mode, values, div)
    check_stats(st, exp, keep)
    if mode != "sampled":
        assert 0 < st["top1_agree"].sum() < keep.sum() - 1 and st["top1_agree"][5] == 0  # both outcomes occur
    assert st["kl"][2] == math.inf and torch.isfinite(st["student_entropy"]).all()


def test_torch_float64_and_teacher_temperature():
    _, st, exp, keep = _run("torch", "topk", "logprobs", "rkl", dtype=torch.float64, teacher_temperature=0.7)
    check_stats(st, exp, keep, rtol=1e-6, atol=1e-6)  # the buffer is fp32 whatever the compute dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision(backend, dtype, small_blocks):
    _, st, exp, keep = _run(backend, "topk_tail", "logprobs", "rkl", dtype=dtype)
    check_stats(st, exp, keep, rtol=2e-3, atol=2e-3)  # the oracle reads the same bf16 logits and values


@pytest.mark.parametrize("backend", BACKENDS)
def test_union_mode(backend, small_blocks):
    z, ids, vals = make("topk", "logprobs")
    ids[5] = torch.arange(K)
    g = torch.Generator().manual_seed(1)
    s_ids = torch.stack([torch.randperm(V, generator=g)[:3] for _ in range(N)])
    s_ids[:, 0] = z.argmax(-1)  # the student's own argmax is proposed
    lp_full = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    lp_full.scatter_(1, ids.clamp_min(0), vals)  # the teacher's values at its own ids stay those
    lp_full = lp_full - torch.logsumexp(lp_full, -1, keepdim=True)
    tv = lp_full.gather(1, ids.clamp_min(0))
    sv = lp_full.gather(1, s_ids)
    zz = z.float().requires_grad_()
    labels = torch.zeros(N, dtype=torch.long)
    labels[6] = -100
    _, st = fastkd.sparse_distill_loss(zz, ids, tv.float(), mode="union", student_ids=s_ids,
                                       student_id_values=sv.float(), temperature=T, labels=labels,
                                       backend=use(backend), return_stats=True)
    u_ids, u_vals = union_ids(ids, tv.float(), s_ids, sv.float())
    exp = ref.sparse_stats(zz.detach().double(), u_ids, u_vals.double(), mode="topk_tail", temperature=T,
                           labels=labels)
    check_stats(st, exp, labels != -100)


@pytest.mark.parametrize("mode,values,div", [("topk", "logprobs", "rkl"), ("topk_tail", "logprobs", "jsd")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_is_the_fkl_loss_of_the_same_call(backend, mode, values, div, small_blocks):
    """kl == the per-token loss of the same call with divergence="fkl", reduction="none", no T², / weight."""
    z, ids, vals = make(mode, values)
    labels = torch.zeros(N, dtype=torch.long)
    labels[4] = -100
    kw = dict(values=values, mode=mode, temperature=T, labels=labels, backend=use(backend))
    _, st = fastkd.sparse_distill_loss(z.float(), ids, vals.float(), divergence=div, scale_by_t2=True,
                                       return_stats=True, **kw)
    fkl = fastkd.sparse_distill_loss(z.float(), ids, vals.float(), divergence="fkl", reduction="none", **kw)
    keep = labels != -100
    torch.testing.assert_close(st["kl"][keep], fkl[keep], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,values,div,reduction", [
    ("topk", "logprobs", "fkl", "mean"), ("topk", "probs", "jsd", "none"), ("topk_tail", "logprobs", "rkl", "none"),
    ("sampled", "counts", "fkl", "mean")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_grad_bitwise_unchanged(backend, mode, values, div, reduction, small_blocks):
    z, ids, vals = make(mode, values)
    mask = torch.ones(N, dtype=torch.bool)
    mask[4] = False
    z[2, ids[2, 1]] = 0.5  # finite everywhere here: compare finite losses and gradients
    out = []
    for want in (False, True):
        zz = z.float().requires_grad_()
        res = fastkd.sparse_distill_loss(zz, ids, vals.float(), values=values, mode=mode, divergence=div,
                                         temperature=T, mask=mask, reduction=reduction, backend=use(backend),
                                         return_stats=want)
        loss = res[0] if want else res
        loss.sum().backward()
        if want:
            assert all(s.grad_fn is None and not s.requires_grad for s in res[1].values())
        out.append((loss.detach(), zz.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_path(backend, small_blocks):
    """Fused stats equal the oracle on the (capped) logits; a reduction="none" backward with zero
    grad_output rows (its re-run of the chunks) leaves them unchanged; loss and grads bitwise unchanged."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, 8, generator=g, dtype=torch.float64)
    w = torch.randn(V, 8, generator=g, dtype=torch.float64)
    cap = 3.0
    logits = cap * torch.tanh(h @ w.T / cap)
    ids = logits.topk(K, -1).indices
    ids[1, -1] = -1
    vals = torch.log_softmax(logits + torch.randn(N, V, generator=g, dtype=torch.float64), -1).gather(
        1, ids.clamp_min(0))
    mask = torch.ones(N, dtype=torch.bool)
    mask[4] = False
    kw = dict(mode="topk_tail", divergence="rkl", temperature=T, mask=mask, softcap=cap, chunk_size=3,
              backend=use(backend))
    res = []
    for want in (False, True):
        hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
        out = fastkd.fused_linear_sparse_distill_loss(hh, ww, ids, vals.float(), reduction="none",
                                                      return_stats=want, **kw)
        loss, st = out if want else (out, None)
        go = torch.ones(N)
        go[[0, 2]] = 0.0  # the backward re-run sees weight 0 for these rows: stats must keep their values
        (loss * go).sum().backward()
        res.append((loss.detach(), hh.grad, ww.grad, st))
    assert all(torch.equal(a, b) for a, b in zip(res[0][:3], res[1][:3]))
    exp = ref.sparse_stats(logits, ids, vals, mode="topk_tail", temperature=T, mask=mask)
    check_stats(res[1][3], exp, mask)
    _, st = fastkd.fused_linear_sparse_distill_loss(h.float(), w.float(), ids, vals.float(), return_stats=True,
                                                    **kw)
    check_stats(st, exp, mask)  # a scalar reduction computes the stats in its (only) forward pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_ids_without_value_checks(backend, small_blocks):
    """Duplicated ids only pass with value checks off: stats treat each slot as its own outcome, as the loss."""
    z, ids, vals = make("topk", "logprobs")
    ids[0, 2] = ids[0, 0]
    C.set_input_checks(False)
    try:
        _, st = fastkd.sparse_distill_loss(z.float(), ids, vals.float(), temperature=T, backend=use(backend),
                                           return_stats=True)
        fkl = fastkd.sparse_distill_loss(z.float(), ids, vals.float(), temperature=T, backend=use(backend),
                                         reduction="none")
    finally:
        C.set_input_checks(None)
    exp = ref.sparse_stats(z, ids, vals, temperature=T)
    check_stats(st, exp, torch.ones(N, dtype=torch.bool))
    torch.testing.assert_close(st["kl"], fkl, rtol=1e-6, atol=1e-7)


def test_ties_first_index(small_blocks):
    """Student argmax ties across Triton tiles and with the ids: the first index wins, as torch.argmax."""
    z = torch.zeros(3, V)
    z[:, [5, 20, 33]] = 2.0  # tied maxima in tiles 0, 1, 2
    ids = torch.tensor([[20, 33, 1], [5, 33, 2], [33, 20, -1]])
    vals = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.4, 0.1], [0.5, 0.3, 0.0]]))
    for backend in BACKENDS:
        for mode in ("topk", "topk_tail"):
            _, st = fastkd.sparse_distill_loss(z, ids, vals, mode=mode, backend=use(backend), return_stats=True)
            # student argmax 5: row 0's top id 20 disagrees; row 1's tied teacher ids 5 / 33 give 5; row 2's 33
            assert st["top1_agree"].tolist() == [0.0, 1.0, 0.0], (backend, mode)
            exp = ref.sparse_stats(z.double(), ids, vals.double(), mode=mode)
            check_stats(st, exp, torch.ones(3, dtype=torch.bool))


def test_torch_compile_sees_the_mutated_stats():
    """fastkd::sparse_rows mutates its optional stats output: torch.compile (aot_eager: functionalization, no
    inductor build) gives the same loss and statistics as eager."""
    z, ids, vals = make("topk_tail", "logprobs")

    def f(x):
        return fastkd.sparse_distill_loss(x, ids, vals.float(), mode="topk_tail", temperature=T, backend="torch",
                                          return_stats=True)

    loss, st = f(z.float())
    loss_c, st_c = torch.compile(f, backend="aot_eager")(z.float())
    assert torch.equal(loss, loss_c) and all(torch.equal(st[k], st_c[k]) for k in STATS_KEYS)


@pytest.mark.parametrize("schedule", ["split", "row"])
def test_cost_model_no_extra_pass(schedule, default_blocks):
    """bench/costcount.py (model, not measured): with stats the sparse kernels make the same launches and their
    HBM bytes grow only by the per-row outputs and the split kernel's per-segment workspace, not by a pass over
    the (N, V) logits."""
    costcount = pytest.importorskip("fastkd.bench.costcount")
    n, v, k = 6, 1000, 4
    TS.CONFIG.update(block_v=128, num_warps=4, schedule=schedule)
    z, ids, vals = make("topk_tail", "logprobs", n=n, v=v, k=k)
    out = {}
    for want in (False, True):
        counter = costcount.TritonCounter()
        with counter.active():
            fastkd.sparse_distill_loss(z.to(torch.bfloat16).requires_grad_(), ids, vals.float(), mode="topk_tail",
                                       backend="triton", return_stats=want)
        launches = [st for st in counter.launches if "sparse" in st.kernel]
        out[want] = ([st.kernel for st in launches], sum(st.cost(costcount.GPUS["h200"]).bytes for st in launches))
    assert out[True][0] == out[False][0]
    segments = -(-v // 128)
    extra = n * (2 * 3 * 4 * segments + 4 * k + 4 * 8)  # workspace written + read, s at the ids, 4 row scalars
    assert out[False][1] <= out[True][1] <= out[False][1] + extra < out[False][1] + n * v * 2, out


@pytest.mark.gpu  # skipped by conftest without a real GPU or under the interpreter
@pytest.mark.parametrize("backend", ["cuda", "triton-row", "triton-split"])
@pytest.mark.parametrize("mode,values,div", CASES)
def test_gpu_stats_vs_float64(backend, mode, values, div, default_blocks):
    z, ids, vals = make(mode, values, n=64, v=5003, k=16)
    mask = torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.2
    dev = "cuda"
    zz = z.float().to(dev).requires_grad_()
    kw = dict(values=values, mode=mode, temperature=T)
    loss, st = fastkd.sparse_distill_loss(zz, ids.to(dev), vals.float().to(dev), divergence=div, mask=mask.to(dev),
                                          backend=use(backend), return_stats=True, **kw)
    exp = ref.sparse_stats(zz.detach().double().cpu(), ids, vals.float().double(), mask=mask, **kw)
    check_stats({k: x.cpu() for k, x in st.items()}, exp, mask, rtol=1e-4, atol=1e-4)
    zz2 = z.float().to(dev).requires_grad_()
    loss2 = fastkd.sparse_distill_loss(zz2, ids.to(dev), vals.float().to(dev), divergence=div, mask=mask.to(dev),
                                       backend=use(backend), **kw)
    loss.backward()
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(zz.grad, zz2.grad)
