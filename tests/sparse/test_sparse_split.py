"""The split-row sparse kernel (fastkd.kernels.sparse_split, the default Triton schedule) vs the float64 reference.

Every mode / divergence / value kind the Triton backend serves, on both schedules ("split" and the row-per-program
fallback "row"), with odd vocabularies (a partial last segment), several segments per row, −inf logits, masked
rows, padding, duplicated and out-of-range ids, bf16 / fp16, temperature, a grad_output != 1, the forward-only launch,
phase-0 sub-tiles (SUB_V < BLOCK_V), lags of 1, 2, 3 and N rows between a row's terms and its gradient, the
fused LM-head path (the gradient written into the logits buffer) and the cost model's L2 verdict.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd import reference as R
from fastkd.core.params import SparseParams
from fastkd.sparse import triton_impl as TS

pytestmark = pytest.mark.skipif(TS._IMPORT_ERROR is not None, reason=str(TS._IMPORT_ERROR))

CASES = [("topk", "logprobs", d) for d in ("fkl", "rkl", "jsd")] + [
    ("topk", "probs", "jsd"),
    ("topk", "logits", "rkl"),
    ("topk", "counts", "fkl"),
    ("topk_tail", "logprobs", "fkl"),
    ("topk_tail", "logprobs", "rkl"),
    ("topk_tail", "probs", "jsd"),
    ("sampled", "counts", "fkl"),
]
SCHEDULES = ("split", "row")


@pytest.fixture
def config():
    """Small blocks (several segments per row, a partial last one at odd V) and a lag of 2 rows at S = 3 (rows'
    terms and gradients interleaved); yields the CONFIG dict to set."""
    old = dict(TS.CONFIG)
    TS.CONFIG.update(block_v=16, num_warps=1, lag_units=4)
    yield TS.CONFIG
    TS.CONFIG.clear()
    TS.CONFIG.update(old)


def make(n, v, k, kind, mode, seed=0):
    """Random logits (float64) and a teacher: a real top-k (+ a tail) or random ids with counts."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    lp = torch.log_softmax(t, -1)
    if mode == "sampled" or kind == "counts":
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        return z, ids, torch.randint(1, 6, (n, k), generator=g).double()
    top = lp.topk(k, -1)
    ids, vals = top.indices.clone(), top.values.clone()
    vals = {"probs": vals.exp(), "logits": t.gather(-1, ids)}.get(kind, vals)
    return z, ids, vals


def run(z, ids, vals, dtype=torch.float32, go=None, **kw):
    """(loss (N,) float64, grad float64) of the Triton backend, reduction="none", weighted by go."""
    x = z.to(dtype).requires_grad_()
    loss = fastkd.sparse_distill_loss(x, ids, vals, reduction="none", backend="triton", **kw)
    (loss * (1.0 if go is None else go)).sum().backward()
    return loss.detach().double(), x.grad.double()


def reference(z, ids, vals, go=None, mask=None, **kw):
    x = z.detach().double().requires_grad_()
    loss = R.sparse_distill_loss(x, ids, vals.double(), **kw)
    if mask is not None:
        loss = loss * mask
    (loss * (1.0 if go is None else go)).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("mode,kind,div", CASES)
def test_vs_float64(mode, kind, div, sched, config):
    """V = 37 in 16-wide segments, T = 1.5 with T², a masked row, padding, a −inf logit, grad_output != 1."""
    config["schedule"] = sched
    n, v, k = 6, 37, 5
    z, ids, vals = make(n, v, k, kind, mode, seed=len(mode) + len(div))
    ids[1, -2:] = -1  # padding slots carry garbage values
    vals[1, -2:] = 7.0 if kind in ("logits", "probs", "counts") else -3.0
    z[2, 4] = -math.inf
    ids[2] = torch.where(ids[2] == 4, torch.tensor(5 if 5 not in ids[2] else -1), ids[2])
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    go = torch.rand(n, dtype=torch.float64) + 0.5
    kw = dict(values=kind, mode=mode, divergence=div, temperature=1.5, scale_by_t2=True)
    loss, grad = run(z, ids, vals.float() if kind != "counts" else vals, go=go, mask=mask, **kw)
    want_loss, want = reference(z, ids, vals, go=go, mask=mask, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, want, rtol=2e-5, atol=2e-6)
    assert loss[3] == 0 and grad[3].abs().max() == 0


@pytest.mark.parametrize("lag_units", [1, 9, 10**6])
@pytest.mark.parametrize("mode,div", [("topk_tail", "jsd"), ("topk", "rkl")])
def test_lag(mode, div, lag_units, config):
    """Gradient units lag = 1 (the terms unit writes its own segment next), 3 and every row (all terms first)."""
    config["lag_units"] = lag_units
    z, ids, vals = make(7, 37, 5, "logprobs", mode, seed=lag_units % 97)
    mask = torch.tensor([True, True, False, True, True, True, True])
    loss, grad = run(z, ids, vals.float(), mode=mode, divergence=div, mask=mask)
    want_loss, want = reference(z, ids, vals, mode=mode, divergence=div, mask=mask)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("mode,kind,div", [("topk_tail", "logprobs", "fkl"), ("topk", "logprobs", "jsd"),
                                           ("topk", "logprobs", "rkl"), ("sampled", "counts", "fkl")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_within_pytorch_error(mode, kind, div, dtype, config):
    z, ids, vals = make(8, 50, 6, kind, mode, seed=3)
    zb = z.to(dtype)
    kw = dict(values=kind, mode=mode, divergence=div)
    loss, grad = run(zb.double(), ids, vals.float(), dtype=dtype, **kw)
    want_loss, want = reference(zb, ids, vals, **kw)
    x = zb.clone().requires_grad_()  # PyTorch's own half: log-softmax in bf16 / fp16, gradient rounded
    own = R.sparse_distill_loss(x, ids, vals, **kw)
    own.sum().backward()
    loss_tol = 2 * (own.detach().double() - want_loss).abs().max() + 1e-3 * want_loss.abs().max()
    assert (loss - want_loss).abs().max() <= loss_tol
    assert (grad - want).abs().max() <= 2 * (x.grad.double() - want).abs().max() + 1e-3


@pytest.mark.parametrize("mode,div", [("topk", "fkl"), ("topk", "jsd"), ("topk_tail", "fkl"), ("topk_tail", "rkl"),
                                      ("topk_tail", "jsd")])
def test_duplicated_padded_and_out_of_range_ids(mode, div, config, no_value_checks):
    """A repeated id adds its slots' gradients (like the row kernels), −1 is padding, an id outside [−1, V)
    makes its token NaN (never read or written) and leaves the other tokens exact; split == row."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 41, generator=g, dtype=torch.float64)
    ids = torch.tensor([[5, 5, 7, 1], [2, 40, 40, 40], [0, 33, -1, 33], [3, 41, 8, 9], [-5, 1, 2, 3]])
    vals = torch.log(torch.tensor([[0.2, 0.1, 0.3, 0.1], [0.1, 0.2, 0.2, 0.2], [0.3, 0.2, 0.5, 0.1],
                                   [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]))
    kw = dict(mode=mode, divergence=div)
    got = {}
    for sched in SCHEDULES:
        config["schedule"] = sched
        got[sched] = run(z, ids, vals, **kw)
    loss, grad = got["split"]
    assert torch.isnan(loss[3:]).all() and torch.isnan(grad[3:]).any(dim=1).all()
    good = [0, 1, 2]
    want_loss, want = reference(z[good], ids[good], vals[good], **kw)
    torch.testing.assert_close(loss[good], want_loss, rtol=1e-5, atol=1e-5)
    if (mode, div) != ("topk_tail", "rkl"):  # the closed-form tail rkl gradient assumes distinct events
        torch.testing.assert_close(grad[good], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["split"][0], got["row"][0], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got["split"][1], got["row"][1], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("k", [64, 200])
def test_sub_tiles_and_many_ids(k):
    """Default-sized segments (BLOCK_V = 2048: SUB_V = 1024 phase-0 tiles with a tail), V = 3001, K = 64 spread
    or K = 200 clustered in one tile, a −inf logit at an id; topk_tail fkl and rkl, forward-only too."""
    old = dict(TS.CONFIG)
    TS.CONFIG.update(block_v=2048, num_warps=4)
    try:
        z, ids, vals = make(3, 3001, k, "logprobs", "topk_tail", seed=k)
        ids[1] = torch.arange(k) + 1000  # clustered across the sub-tile boundary at 1024
        vals[1] = torch.log_softmax(torch.randn(k, dtype=torch.float64), -1) - 0.5
        z[0, ids[0, 3]] = -math.inf
        for div in ("rkl", "fkl"):  # fkl: row 0's loss is +inf (teacher mass on a −inf logit), as the reference
            loss, grad = run(z, ids, vals.float(), mode="topk_tail", divergence=div)
            want_loss, want = reference(z, ids, vals, mode="topk_tail", divergence=div)
            torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-6)
            torch.testing.assert_close(grad, want, rtol=2e-5, atol=2e-6)
        with torch.no_grad():  # HAS_GRAD=False: only the terms units work
            out = fastkd.sparse_distill_loss(z.float(), ids, vals.float(), mode="topk_tail", divergence="fkl",
                                             reduction="none", backend="triton")
        torch.testing.assert_close(out.double(), want_loss, rtol=2e-5, atol=2e-6)
        assert math.isinf(out[0]) and torch.isfinite(out[1:]).all()
    finally:
        TS.CONFIG.update(old)


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("mode,div", [("topk_tail", "fkl"), ("topk", "rkl"), ("sampled", "fkl")])
def test_fused_linear_path(mode, div, sched, config):
    """fused_linear_sparse_distill_loss: chunks of 5 rows, the gradient written into the logits buffer."""
    config["schedule"] = sched
    g = torch.Generator().manual_seed(7)
    n, hd, v, k = 13, 8, 45, 6
    h = torch.randn(n, hd, generator=g, dtype=torch.float64)
    w = torch.randn(v, hd, generator=g, dtype=torch.float64) * 0.5
    kind = "counts" if mode == "sampled" else "logprobs"
    _, ids, vals = make(n, v, k, kind, mode, seed=11)
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    kw = dict(values=kind, mode=mode, divergence=div, temperature=2.0)
    loss = fastkd.fused_linear_sparse_distill_loss(hf, wf, ids, vals.float() if kind != "counts" else vals,
                                                   chunk_size=5, backend="triton", **kw)
    loss.backward()
    hd_, wd_ = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = R.sparse_distill_loss(hd_ @ wd_.T, ids, vals, **kw).mean()
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hf.grad.double(), hd_.grad, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(wf.grad.double(), wd_.grad, rtol=2e-4, atol=2e-5)


def test_schedule_choice(config):
    """Split by default, with or without statistics (both schedules compute them); the row kernels when forced;
    a bad name raises.
    The launcher that actually ran is observed, not assumed."""
    p = SparseParams(mode="topk_tail", divergence="fkl", temperature=1.0, scale_by_t2=False, beta=0.5)
    config["schedule"] = None
    assert TS.schedule(p)[0] == "split"
    assert TS.schedule(p, torch.empty(1, 4))[0] == "split"
    config["schedule"] = "row"
    assert TS.schedule(p) == ("row", "forced by CONFIG['schedule'] = 'row'")
    config["schedule"] = "both"
    with pytest.raises(ValueError, match="schedule"):
        TS.schedule(p)
    z, ids, vals = make(2, 20, 3, "logprobs", "topk_tail")
    seen = []
    for sched in SCHEDULES:
        config["schedule"] = sched
        real = TS._split_forward
        TS._split_forward = lambda *a, _real=real, _s=sched, **kw: (seen.append(_s), _real(*a, **kw))[1]
        try:
            run(z, ids, vals.float(), mode="topk_tail")
        finally:
            TS._split_forward = real
    assert seen == ["split"]


def test_deterministic(config):
    """The S partials merge in a fixed order: two runs are bitwise equal."""
    z, ids, vals = make(4, 77, 7, "logprobs", "topk_tail", seed=9)
    a = run(z, ids, vals.float(), mode="topk_tail", divergence="jsd")
    b = run(z, ids, vals.float(), mode="topk_tail", divergence="jsd")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cost_model_reads_each_logit_once(config):
    """bench/costcount.py's L2 rule on the split kernel (model, not measured): the gradient's re-read of a
    segment (S programs later) is an L2 hit, so HBM sees the logits read once and the gradient written once
    (+ the ids, the teacher's K values and the workspace); the row schedule pays the second read."""
    costcount = pytest.importorskip("fastkd.bench.costcount")
    n, v, k = 4, 1000, 4
    config.update(block_v=128, num_warps=4)
    z, ids, vals = make(n, v, k, "logprobs", "topk_tail", seed=5)
    hbm = {}
    for sched in SCHEDULES:
        config["schedule"] = sched
        counter = costcount.TritonCounter()
        with counter.active():
            run(z, ids, vals.float(), dtype=torch.bfloat16, mode="topk_tail")
        costs = [st.cost(costcount.GPUS["h200"]) for st in counter.launches if "sparse" in st.kernel]
        hbm[sched] = sum(c.bytes for c in costs)
    floor = 2 * n * v * 2  # bf16 logits read once + gradient written once
    assert floor <= hbm["split"] <= 1.1 * floor, hbm
    assert hbm["row"] >= 1.4 * floor, hbm


def _many_rows(n, v, k, mode, div, dev):
    """Split (lag 1 and the default lag) vs the row kernels vs the float64 loss on n rows of bf16 logits."""
    g = torch.Generator(device=dev).manual_seed(12)
    z = (torch.randn(n, v, generator=g, device=dev) * 2).bfloat16()
    z[1, :: max(1, v // 40)] = -math.inf  # masked vocabulary entries (kept off the ids below)
    t_lp = torch.log_softmax(torch.randn(n, v, generator=g, device=dev, dtype=torch.float64) * 2, -1)
    t_lp[1, :: max(1, v // 40)] = -math.inf
    lp, ids = t_lp.topk(k, -1)
    ids[3, -5:] = -1  # padding
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    mask[::7] = False
    go = torch.rand(n, device=dev, dtype=torch.float64) + 0.5
    kw = dict(mode=mode, divergence=div, mask=mask)
    out = {}
    for name, sched, lag_units in (("split1", "split", 1), ("split", "split", TS.CONFIG["lag_units"]),
                                   ("row", "row", 1)):
        old = dict(TS.CONFIG)
        TS.CONFIG.update(schedule=sched, lag_units=lag_units)
        try:
            out[name] = run(z.double(), ids, lp.float(), dtype=torch.bfloat16, go=go, **kw)
        finally:
            TS.CONFIG.update(old)
    want_loss, want = reference(z, ids, lp, go=go, **kw)
    for name, (loss, grad) in out.items():
        torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5, msg=name)
        err = (grad - want).abs().max().item()
        assert err <= 8 * 2**-8 * want.abs().max().item() + 1e-7, (name, err)  # bf16 rounding of the gradient
        assert torch.all(grad[~mask] == 0)
    assert torch.equal(out["split"][1], out["split1"][1])  # the lag changes the schedule, not one bit


@pytest.mark.parametrize("mode,div", [("topk_tail", "fkl"), ("topk", "rkl")])
def test_many_rows_helper(mode, div, config):
    """The GPU test's body on CPU at 8 x 200 (so that it is known to work before a GPU runs it)."""
    config.update(block_v=64)
    _many_rows(8, 200, 12, mode, div, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,div", [("topk_tail", "fkl"), ("topk", "rkl")])
def test_gpu_many_rows(mode, div):
    """Native Triton on a GPU (``pytest -m gpu``): 4096 rows of V = 50257 bf16, K = 64 (~53k ticketed units,
    real cross-program waits and spinning), lag 1 and the default lag, vs the row kernels and float64."""
    _many_rows(4096, 50257, 64, mode, div, "cuda")
