"""Regression tests of issue 13 (reliability): each case failed on f72e89e.

Sparse losses: finite gradients where the float64 math is finite (underflowing student tails), NaN teachers
give NaN on every backend, untrusted ids (>= V, < −1, duplicated) handled on the device; ``sinkd_loss`` at
small ε in fp32; tensor ``num_items_in_batch``; cosine Sinkhorn with a zero vector; empty vocabulary.
The teacher-cache cases live in tests/cache/test_cache.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.core import checks
from fastkd.ot.losses import sinkd_loss
from fastkd.sparse import reference as ref

BACKENDS = ["torch", "triton"]


def _loss_grad(z, ids, vals, backend, **kw):
    x = z.detach().clone().requires_grad_()
    loss = fastkd.sparse_distill_loss(x, ids, vals, backend=backend, reduction="none", **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def _ref_loss_grad(z, ids, vals, **kw):
    x = z.detach().double().requires_grad_()
    loss = ref.sparse_distill_loss(x, ids, vals.double(), **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


# ------------------------------------------------------------------------------------------------ item 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_tail_fkl_underflowing_tail_has_finite_gradient(backend, small_blocks):
    s = torch.tensor([[0.0, -200.0, -400.0]])
    loss, grad = _loss_grad(s, torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]), backend, mode="topk_tail")
    want_loss, want = _ref_loss_grad(s, torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]), mode="topk_tail")
    assert torch.isfinite(grad).all(), grad
    torch.testing.assert_close(grad.double(), want, atol=1e-6, rtol=1e-5)  # [0.5, -0.5, -6.9e-88]
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("sharpen,T", [(20.0, 1.0), (5.0, 0.25)])
def test_topk_tail_sharpened_student_matches_float64(backend, div, sharpen, T, small_blocks):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 40, generator=g) * 8  # ×20: most rows' tail mass exp(s − lse) is below fp32's range
    top = torch.log_softmax(t, -1).topk(5, -1)
    z = t * sharpen  # the student is a sharpened copy of the teacher: its tail mass underflows in fp32
    kw = dict(mode="topk_tail", divergence=div, temperature=T)
    loss, grad = _loss_grad(z, top.indices, top.values, backend, **kw)
    want_loss, want = _ref_loss_grad(z, top.indices, top.values, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(grad.double(), want, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_sparse_topk_tail_underflowing_tail_has_finite_gradient(backend, small_blocks):
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[0.0], [-200.0], [-400.0]], requires_grad=True)  # logits [0, -200, -400]
    loss = fastkd.fused_linear_sparse_distill_loss(h, w, torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]),
                                                   mode="topk_tail", backend=backend)
    loss.backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()
    torch.testing.assert_close(w.grad[:, 0], torch.tensor([0.5, -0.5, 0.0]), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ item 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,values,bad", [
    ("topk", "logprobs", math.nan), ("topk", "probs", math.inf), ("topk", "logits", math.nan),
    ("topk_tail", "logprobs", math.nan), ("topk_tail", "probs", math.nan), ("sampled", "counts", math.nan),
])
def test_nan_or_inf_teacher_gives_nan(backend, mode, values, bad, no_value_checks, small_blocks):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 20, generator=g)
    ids = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(3)])
    vals = torch.full((3, 4), 0.1) if values in ("probs", "counts") else torch.full((3, 4), -2.5)
    vals[1, 2] = bad
    loss, grad = _loss_grad(z, ids, vals, backend, mode=mode, values=values)
    assert torch.isnan(loss[1]), loss
    assert torch.isnan(grad[1]).any(), grad[1]
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_teacher_tail_gives_nan(backend, small_blocks):
    z = torch.randn(2, 12)
    tail = torch.tensor([math.log(0.5), math.nan])
    loss, _ = _loss_grad(z, torch.tensor([[1, 2], [3, 4]]), torch.full((2, 2), math.log(0.25)), backend,
                         mode="topk_tail", teacher_tail=tail)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


# ------------------------------------------------------------------------------------------------ item 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,div", [("topk", "fkl"), ("topk", "rkl"), ("topk_tail", "fkl"), ("topk_tail", "jsd")])
@pytest.mark.parametrize("bad_id", [20, 21, 10**6, -5])
def test_out_of_range_id_poisons_only_its_token(backend, mode, div, bad_id, no_value_checks, small_blocks):
    """Ids outside [−1, V) are never dereferenced: that token's loss is NaN, the others are exact."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 20, generator=g)
    t = torch.log_softmax(torch.randn(4, 20, generator=g), -1)
    top = t.topk(3, -1)
    ids, vals = top.indices.clone(), top.values.clone()
    vals = vals - 0.1  # leave a tail for topk_tail
    ids[2, 1] = bad_id
    loss, grad = _loss_grad(z, ids, vals, backend, mode=mode, divergence=div)
    assert torch.isnan(loss[2]), loss
    assert torch.isnan(grad[2]).any()
    good = [0, 1, 3]
    want_loss, want = _ref_loss_grad(z[good], ids[good], vals[good], mode=mode, divergence=div)
    torch.testing.assert_close(loss[good].double(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[good].double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode,div", [("topk", "fkl"), ("topk", "jsd"), ("topk_tail", "fkl"), ("topk_tail", "jsd"),
                                      ("topk_tail", "rkl")])
def test_duplicate_ids_are_summed_on_every_backend(mode, div, no_value_checks, small_blocks):
    """With value checks off, a duplicated id is two slots of one column: gradients add up (no lost store)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 24, generator=g)
    ids = torch.tensor([[5, 5, 7, 1], [2, 9, 9, 9], [0, 3, -1, 3]])
    vals = torch.log(torch.tensor([[0.2, 0.1, 0.3, 0.1], [0.1, 0.2, 0.2, 0.2], [0.3, 0.2, 0.5, 0.1]]))
    want_loss, want = _ref_loss_grad(z, ids, vals, mode=mode, divergence=div)
    got = {b: _loss_grad(z, ids, vals, b, mode=mode, divergence=div) for b in BACKENDS}
    for backend, (loss, grad) in got.items():
        torch.testing.assert_close(loss.double(), want_loss, atol=1e-5, rtol=1e-5, msg=backend)
        if (mode, div) != ("topk_tail", "rkl"):
            # the closed-form tail rkl gradient drops Σ_e q_e·1 = 1 terms, which a repeated event breaks
            torch.testing.assert_close(grad.double(), want, atol=1e-6, rtol=1e-5, msg=backend)
    torch.testing.assert_close(got["triton"][1], got["torch"][1], atol=1e-6, rtol=1e-5)


def test_duplicate_ids_rejected_when_value_checks_run():
    with pytest.raises(ValueError, match="duplicated id"):
        fastkd.sparse_distill_loss(torch.randn(1, 8), torch.tensor([[3, 3]]), torch.tensor([[-1.0, -2.0]]))


# ------------------------------------------------------------------------------------------------ item 5


def test_sinkd_small_eps_fp32_is_finite_and_matches_fp64():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(5, 37, generator=g), torch.randn(5, 37, generator=g)
    for eps in (0.005, 0.003, 1e-4):
        x = s.clone().requires_grad_()
        loss = sinkd_loss(x, t, eps=eps)
        loss.backward()
        x64 = s.double().requires_grad_()
        want = sinkd_loss(x64, t.double(), eps=eps)
        want.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), eps
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-3)


def test_sinkd_log_domain_keeps_the_division_semantics():
    """The log-domain normalisation is the same P (and gradient) as dividing by the row/column sums."""
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 11, generator=g, dtype=torch.float64), torch.randn(4, 11, generator=g, dtype=torch.float64)

    def direct(x):
        ps, pt = torch.softmax(x / 2.0, -1), torch.softmax(t / 2.0, -1)
        w = (ps[:, None, :] - pt[None, :, :]).abs().sum(-1)
        p = torch.exp(-w / 0.1)
        for _ in range(7):
            p = p / p.sum(1, keepdim=True)
            p = p / p.sum(0, keepdim=True)
        return (p * w).sum() / x.shape[0]

    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got, want = sinkd_loss(x1, t, eps=0.1, n_iter=7), direct(x2)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ item 6


@pytest.mark.parametrize("n", [0, -3, math.inf, math.nan])
@pytest.mark.parametrize("op", ["distill", "sparse"])
def test_tensor_num_items_in_batch_validated(n, op):
    z, t = torch.randn(3, 7), torch.randn(3, 7)
    ids, vals = torch.tensor([[0, 1]] * 3), torch.log(torch.tensor([[0.5, 0.25]] * 3))

    def run():
        if op == "distill":
            return fastkd.distill_loss(z, t, num_items_in_batch=torch.tensor(n))
        return fastkd.sparse_distill_loss(z, ids, vals, num_items_in_batch=torch.tensor(n))

    with pytest.raises(ValueError, match="num_items_in_batch"):
        run()
    checks.set_input_checks(False)  # no host sync: never a silent inf or negative loss, NaN instead
    try:
        assert torch.isnan(run())
    finally:
        checks.set_input_checks(None)
    good = fastkd.distill_loss(z, t, num_items_in_batch=torch.tensor(2)) if op == "distill" else None
    assert good is None or torch.isfinite(good)


def test_cosine_sinkhorn_zero_vector():
    x, y = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    x[1, 2] = 0
    with pytest.raises(ValueError, match=r"x has a zero vector \(problem 1, point 2\)"):
        fastkd.sinkhorn(x=x, y=y, metric="cosine")
    checks.set_input_checks(False)
    try:  # the documented value without checks: similarity 0, i.e. cost 1, on every backend
        vals = [fastkd.sinkhorn(x=x, y=y, metric="cosine", backend=b).value for b in BACKENDS]
        x1 = x.clone()
        x1[1, 2] = 0
        cost = fastkd.ot.sinkhorn.pairwise_cost(x1, y, "cosine")
        assert torch.isfinite(cost).all() and torch.equal(cost[1, 2], torch.ones(5))
    finally:
        checks.set_input_checks(None)
    for v in vals:
        assert torch.isfinite(v).all()
    torch.testing.assert_close(vals[0], vals[1], atol=1e-5, rtol=1e-5)
    want = fastkd.sinkhorn(cost=cost).value
    torch.testing.assert_close(vals[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_empty_vocabulary_is_a_clear_error(backend, no_value_checks):
    with pytest.raises(ValueError, match="vocabulary .* is empty"):
        fastkd.sparse_distill_loss(torch.zeros(2, 0), torch.full((2, 3), -1), torch.zeros(2, 3), backend=backend)
    with pytest.raises(ValueError, match="empty"):
        fastkd.fused_linear_sparse_distill_loss(torch.randn(2, 4), torch.zeros(0, 4), torch.full((2, 3), -1),
                                                torch.zeros(2, 3), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_tail_rkl_teacher_logprobs_near_minus_1e4(backend, dtype, small_blocks):
    """Very small stored log-probs with the tail derived from them: finite and equal to float64 (issue 13)."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, 50, generator=g)
    ids = torch.stack([torch.randperm(50, generator=g)[:5] for _ in range(4)])
    z.scatter_(1, ids, z.gather(1, ids) + 20)  # the student agrees the ids hold the mass
    vals = (-1e4 + torch.randn(4, 5, generator=g)).to(dtype)
    loss, grad = _loss_grad(z, ids, vals, backend, mode="topk_tail", divergence="rkl")
    want_loss, want = _ref_loss_grad(z, ids, vals.float(), mode="topk_tail", divergence="rkl")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-2, rtol=1e-5)
    # the id-column gradient q_k·(r_k − Σ_e q_e r_e) with r ≈ 1e4 cancels: fp32 keeps ~1e4·6e-8 absolute
    torch.testing.assert_close(grad.double(), want, atol=1e-2, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["topk", "topk_tail"])
def test_fused_sparse_nan_teacher_gives_nan(backend, mode, small_blocks):
    g = torch.Generator().manual_seed(9)
    h, w = torch.randn(3, 4, generator=g), torch.randn(20, 4, generator=g).requires_grad_()
    ids = torch.stack([torch.randperm(20, generator=g)[:3] for _ in range(3)])
    vals = torch.full((3, 3), math.log(0.2))
    vals[2, 0] = math.nan
    loss = fastkd.fused_linear_sparse_distill_loss(h, w, ids, vals, mode=mode, reduction="none", backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()
