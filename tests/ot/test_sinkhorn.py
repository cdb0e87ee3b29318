"""fastkd.sinkhorn vs the float64 reference, POT and GeomLoss; gradients; Triton (interpreter); bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.core import checks as Cm
from fastkd.ot import reference as R
from fastkd.ot.sinkhorn import SinkhornNonConvergenceError

F64 = torch.float64


def _simplex(*shape, dtype=F64):
    w = torch.rand(*shape, dtype=dtype) + 0.05
    return w / w.sum(-1, keepdim=True)


def _problem(bsz=3, n=13, m=19, d=2, dtype=F64):
    x = torch.rand(bsz, n, d, dtype=dtype)
    y = torch.rand(bsz, m, d, dtype=dtype) + 0.2
    return _simplex(bsz, n, dtype=dtype), _simplex(bsz, m, dtype=dtype), x, y


@pytest.mark.parametrize("eps", [0.5, 0.05, 1e-3])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_matches_reference_fixed_iterations(eps, dtype):
    a, b, x, y = _problem()
    cost = R.pairwise_cost(x, y)
    ref = R.sinkhorn(a, b, cost, eps, 150)
    r = fastkd.sinkhorn(a.to(dtype), b.to(dtype), cost=cost.to(dtype), eps=eps, max_iter=150, tol=0,
                        return_plan=True)
    tol = 1e-10 if dtype == F64 else 2e-5
    assert r.n_iter == 150 and r.value.dtype == dtype
    torch.testing.assert_close(r.value.double(), ref["value"], rtol=tol, atol=tol)
    torch.testing.assert_close(r.reg_value.double(), ref["reg_value"], rtol=tol, atol=tol)
    torch.testing.assert_close(r.f.double(), ref["f"], rtol=tol, atol=tol * 10)
    torch.testing.assert_close(r.g.double(), ref["g"], rtol=tol, atol=tol * 10)
    torch.testing.assert_close(r.plan.double(), ref["plan"], rtol=tol * 10, atol=tol)
    # reported error = row-marginal violation of the returned plan
    err = (ref["plan"].sum(-1) - a).abs().sum(-1)
    torch.testing.assert_close(r.error.double(), err, rtol=1e-3, atol=1e-6 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "l1", "cosine"])
def test_points_metrics_and_tiled_path(metric, monkeypatch):
    a, b, x, y = _problem(2, 11, 9, 3)
    ref = R.sinkhorn(a, b, R.pairwise_cost(x, y, metric), 0.1, 60)
    r = fastkd.sinkhorn(a, b, x=x, y=y, metric=metric, eps=0.1, max_iter=60, tol=0)
    torch.testing.assert_close(r.value, ref["value"], rtol=1e-9, atol=1e-10)
    # force the tiled (cost-on-the-fly) path with tiny tiles
    import fastkd.ot.sinkhorn as S
    import fastkd.ot.torch_impl as T
    monkeypatch.setattr(T, "_DENSE_MAX_ELEMS", 0)
    monkeypatch.setattr(S, "TILE_ELEMS", 2 * 9 * 4)
    r2 = fastkd.sinkhorn(a, b, x=x, y=y, metric=metric, eps=0.1, max_iter=60, tol=0)
    torch.testing.assert_close(r2.value, ref["value"], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(r2.f, ref["f"], rtol=1e-9, atol=1e-9)


@pytest.mark.host_device
def test_vs_pot():
    ot = pytest.importorskip("ot")
    a, b, x, y = _problem(2, 15, 12)
    cost = R.pairwise_cost(x, y)
    r = fastkd.sinkhorn(a, b, cost=cost, eps=0.05, max_iter=2000, tol=1e-11, return_plan=True)
    assert float(r.error.max()) < 1e-11
    for i in range(2):
        v = ot.sinkhorn2(a[i], b[i], cost[i], 0.05, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
        torch.testing.assert_close(r.value[i], v, rtol=1e-8, atol=1e-10)
        plan = ot.bregman.sinkhorn_log(a[i], b[i], cost[i], 0.05, numItermax=5000, stopThr=1e-12)
        torch.testing.assert_close(r.plan[i], plan, rtol=1e-6, atol=1e-10)
        res = ot.solve(cost[i], a[i], b[i], reg=0.05, max_iter=5000, tol=1e-12)  # reg_type="KL"
        torch.testing.assert_close(r.reg_value[i], res.value, rtol=1e-7, atol=1e-9)
    if hasattr(ot, "batch"):
        rb = ot.batch.solve_batch(cost, reg=0.05, a=a, b=b, method="log_sinkhorn", max_iter=80, tol=0)
        mine = fastkd.sinkhorn(a, b, cost=cost, eps=0.05, max_iter=80, tol=0)
        torch.testing.assert_close(mine.value, rb.value_linear, rtol=1e-7, atol=1e-12)


def test_vs_geomloss_debiased():
    geomloss = pytest.importorskip("geomloss")
    x, y = torch.rand(1, 20, 2, dtype=F64), torch.rand(1, 25, 2, dtype=F64) + 0.3
    blur = 0.3  # GeomLoss runs one iteration per ε step: a large blur and slow scaling make it converge
    eps = blur**2  # GeomLoss p=2: cost ‖x−y‖²/2, ε = blur^p
    for debias in (False, True):
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.999, debias=debias,
                                    backend="tensorized")
        want = loss(x, y)
        # fastkd cost ‖x−y‖² = 2 × GeomLoss' cost: run with 2ε and halve.
        r = fastkd.sinkhorn(x=x, y=y, eps=2 * eps, max_iter=3000, tol=1e-12, debias=debias)
        torch.testing.assert_close(0.5 * r.reg_value, want, rtol=2e-7, atol=1e-9)


def test_debias_matches_reference_and_is_zero_on_identical():
    a, b, x, y = _problem(2, 9, 7)
    r = fastkd.sinkhorn(a, b, x=x, y=y, eps=0.1, max_iter=80, tol=0, debias=True)
    ref = R.sinkhorn_divergence(a, b, x, y, 0.1, 80)
    torch.testing.assert_close(r.reg_value, ref, rtol=1e-9, atol=1e-12)
    same = fastkd.sinkhorn(a, a, x=x, y=x, eps=0.1, max_iter=80, tol=0, debias=True)
    torch.testing.assert_close(same.reg_value, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)


def test_unbatched_tol_and_nonconvergence():
    a, b, x, y = _problem(1, 10, 12)
    cost = R.pairwise_cost(x, y)[0]
    r = fastkd.sinkhorn(a[0], b[0], cost=cost, eps=0.1, max_iter=1000, tol=1e-8)
    assert r.value.shape == () and r.f.shape == (10,) and r.plan is None
    assert r.n_iter < 1000 and r.n_iter % 10 == 0 and float(r.error) < 1e-8
    slow = fastkd.sinkhorn(a[0], b[0], cost=cost, eps=1e-3, max_iter=5, tol=1e-9)
    assert slow.n_iter == 5 and float(slow.error) > 1e-9
    with pytest.raises(SinkhornNonConvergenceError, match="did not converge"):
        fastkd.sinkhorn(a[0], b[0], cost=cost, eps=1e-3, max_iter=5, tol=1e-9, raise_on_nonconvergence=True)


def test_eps_scaling_converges_to_same_solution():
    a, b, x, y = _problem(2, 16, 16)
    cost = R.pairwise_cost(x, y)
    plain = fastkd.sinkhorn(a, b, cost=cost, eps=0.01, max_iter=5000, tol=1e-10)
    ann = fastkd.sinkhorn(a, b, cost=cost, eps=0.01, max_iter=5000, tol=1e-10, eps_scaling=0.7)
    assert float(ann.error.max()) < 1e-10
    torch.testing.assert_close(ann.value, plain.value, rtol=1e-7, atol=1e-9)
    pts = fastkd.sinkhorn(a, b, x=x, y=y, eps=0.01, max_iter=5000, tol=1e-10, eps_scaling=0.5)
    torch.testing.assert_close(pts.value, plain.value, rtol=1e-7, atol=1e-9)


def test_small_eps_is_finite_fp32():
    a, b, x, y = _problem(4, 32, 40, dtype=torch.float32)
    r = fastkd.sinkhorn(a, b, x=x, y=y, eps=1e-3, max_iter=400, tol=0)
    assert torch.isfinite(r.value).all() and torch.isfinite(r.f).all() and torch.isfinite(r.g).all()
    ref = R.sinkhorn(a.double(), b.double(), R.pairwise_cost(x.double(), y.double()), 1e-3, 400)
    torch.testing.assert_close(r.value.double(), ref["value"], rtol=1e-4, atol=1e-6)


def test_zero_mass_points():
    a, b, x, y = _problem(1, 8, 8)
    a[0, 3] = 0
    a = a / a.sum(-1, keepdim=True)
    r = fastkd.sinkhorn(a, b, x=x, y=y, eps=0.1, max_iter=50, tol=0, return_plan=True)
    ref = R.sinkhorn(a, b, R.pairwise_cost(x, y), 0.1, 50)
    assert torch.all(r.plan[0, 3] == 0) and torch.isfinite(r.value).all()
    torch.testing.assert_close(r.value, ref["value"])


# --------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------


def test_envelope_gradients_match_finite_differences_at_convergence():
    a, b, x, y = _problem(2, 6, 5)
    cost = R.pairwise_cost(x, y).requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    kw = dict(eps=0.2, max_iter=3000, tol=1e-13)
    r = fastkd.sinkhorn(a, b, cost=cost, **kw)
    w = torch.tensor([1.0, -0.7], dtype=F64)  # grad_output != 1
    ga, gb, gc = torch.autograd.grad((r.reg_value * w).sum(), (a, b, cost))

    def f(aa, bb, cc):
        return (fastkd.sinkhorn(aa, bb, cost=cc, **kw).reg_value * w).sum()

    h = 1e-6
    dc = torch.randn_like(cost)
    a0, b0, c0 = a.detach(), b.detach(), cost.detach()
    fd = f(a0, b0, c0 + h * dc) - f(a0, b0, c0 - h * dc)
    torch.testing.assert_close((gc * dc).sum(), fd / (2 * h), rtol=1e-5, atol=1e-8)
    da = torch.randn_like(a)
    da -= da.mean(-1, keepdim=True)  # stay on the simplex: the potentials are defined up to a constant
    fd = f(a.detach() + h * da, b.detach(), cost.detach()) - f(a.detach() - h * da, b.detach(), cost.detach())
    torch.testing.assert_close((ga * da).sum(), fd / (2 * h), rtol=1e-5, atol=1e-8)
    db = torch.randn_like(b)
    db -= db.mean(-1, keepdim=True)
    fd = f(a.detach(), b.detach() + h * db, cost.detach()) - f(a.detach(), b.detach() - h * db, cost.detach())
    torch.testing.assert_close((gb * db).sum(), fd / (2 * h), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "l1", "cosine"])
def test_envelope_point_gradients(metric, monkeypatch):
    a, b, x, y = _problem(2, 7, 6, 3)
    x.requires_grad_()
    y.requires_grad_()
    r = fastkd.sinkhorn(a, b, x=x, y=y, metric=metric, eps=0.1, max_iter=200, tol=0)
    gx, gy = torch.autograd.grad(r.value.sum() + 2 * r.reg_value.sum(), (x, y))
    # expected: P fixed, gradient through the cost only
    plan = R.sinkhorn(a, b, R.pairwise_cost(x, y, metric).detach(), 0.1, 200)["plan"]
    ex, ey = torch.autograd.grad(3 * (plan * R.pairwise_cost(x, y, metric)).sum(), (x, y))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gy, ey)
    import fastkd.ot.sinkhorn as S
    monkeypatch.setattr(S, "TILE_ELEMS", 2 * 6 * 4)  # tiled backward
    r = fastkd.sinkhorn(a, b, x=x, y=y, metric=metric, eps=0.1, max_iter=200, tol=0)
    gx2, gy2 = torch.autograd.grad(3 * r.value.sum(), (x, y))
    torch.testing.assert_close(gx2, ex)
    torch.testing.assert_close(gy2, ey)


def test_unroll_matches_autograd_through_reference():
    a, b, x, y = _problem(2, 5, 6)
    cost = R.pairwise_cost(x, y)
    for eps in (0.3, 0.02):
        c1, c2 = cost.clone().requires_grad_(), cost.clone().requires_grad_()
        a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        r = fastkd.sinkhorn(a1, b, cost=c1, eps=eps, max_iter=30, tol=0, grad="unroll", return_plan=True)
        ref = R.sinkhorn(a2, b, c2, eps, 30)
        w = torch.tensor([0.3, 1.7], dtype=F64)
        out = (r.value * w).sum() + r.reg_value.sum() + (r.plan**2).sum()
        want = (ref["value"] * w).sum() + ref["reg_value"].sum() + (ref["plan"] ** 2).sum()
        g1 = torch.autograd.grad(out, (c1, a1))
        g2 = torch.autograd.grad(want, (c2, a2))
        torch.testing.assert_close(g1[0], g2[0], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g1[1], g2[1], rtol=1e-8, atol=1e-10)


def test_unroll_gradcheck_points():
    a, b, x, y = _problem(1, 4, 3, 2)
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda xx: fastkd.sinkhorn(a, b, x=xx, y=y, eps=0.2, max_iter=8, tol=0, grad="unroll").value, (x,))


# --------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["cost_small", "points_small", "points_tiled", "cost_tiled"])
def test_triton_matches_torch(case):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not fastkd.core.registry.triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cpu" if fastkd.core.registry.triton_interpret() else "cuda"  # the host's CUDA does not decide
    n, m = (9, 13) if "small" in case else (70, 45)
    a, b, x, y = _problem(2, n, m, 3, dtype=torch.float32)
    a, b, x, y = a.to(dev), b.to(dev), x.to(dev), y.to(dev)
    kw = dict(eps=0.05, max_iter=40, tol=0)
    if case.startswith("cost"):
        kw["cost"] = R.pairwise_cost(x, y)
    else:
        kw.update(x=x, y=y)
    import fastkd.ot.triton_impl as TS
    old = TS.SMALL_MAX
    TS.SMALL_MAX = 16 if "small" in case else 0
    try:
        r = fastkd.sinkhorn(a, b, backend="triton", return_plan=True, **kw)
    finally:
        TS.SMALL_MAX = old
    ref = fastkd.sinkhorn(a.double(), b.double(), backend="torch", return_plan=True,
                          **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    torch.testing.assert_close(r.value.double(), ref.value, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(r.f.double(), ref.f, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(r.g.double(), ref.g, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(r.error.double(), ref.error, rtol=1e-2, atol=1e-5)


def test_triton_refuses_unroll():
    pytest.importorskip("triton")
    a, b, x, y = _problem(1, 4, 4)
    with pytest.raises(fastkd.BackendUnavailableError, match="unroll"):
        fastkd.sinkhorn(a, b, x=x, y=y, backend="triton", grad="unroll")


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(tol=-1.0), ValueError, "tol"),
    (dict(eps_scaling=1.5), ValueError, "eps_scaling"),
    (dict(grad="implicit"), ValueError, "grad"),
    (dict(metric="minkowski"), ValueError, "metric"),
    (dict(backend="jax"), ValueError, "backend"),
])
def test_bad_scalar_arguments(kwargs, exc, match):
    a, b, x, y = _problem(1, 4, 5)
    with pytest.raises(exc, match=match):
        fastkd.sinkhorn(a, b, x=x, y=y, **kwargs)


def test_bad_tensor_arguments():
    a, b, x, y = _problem(2, 4, 5)
    cost = R.pairwise_cost(x, y)
    with pytest.raises(ValueError, match="either cost"):
        fastkd.sinkhorn(a, b)
    with pytest.raises(ValueError, match="either cost"):
        fastkd.sinkhorn(a, b, cost=cost, x=x, y=y)
    with pytest.raises(ValueError, match="both x and y"):
        fastkd.sinkhorn(a, b, x=x)
    with pytest.raises(ValueError, match="^a must have shape"):
        fastkd.sinkhorn(a[:, :3], b, cost=cost)
    with pytest.raises(ValueError, match="^b must have shape"):
        fastkd.sinkhorn(a, b[:1, :4], cost=cost)
    with pytest.raises(ValueError, match="cost must have"):
        fastkd.sinkhorn(cost=cost[None])
    with pytest.raises(ValueError, match="x .* and y"):
        fastkd.sinkhorn(x=x, y=y[..., :1])
    with pytest.raises(ValueError, match="a must be non-negative"):
        fastkd.sinkhorn(a - 0.3, b, cost=cost)
    with pytest.raises(ValueError, match="b must sum to 1"):
        fastkd.sinkhorn(a, b * 2, cost=cost)
    bad = cost.clone()
    bad[0, 1, 1] = math.nan
    with pytest.raises(ValueError, match="cost contains NaN"):
        fastkd.sinkhorn(a, b, cost=bad)
    with pytest.raises(ValueError, match="debias"):
        fastkd.sinkhorn(a, b, cost=cost, debias=True)
    with pytest.raises(TypeError, match="cost must be"):
        fastkd.sinkhorn(cost=cost.long())
    Cm.set_input_checks(False)  # value checks skipped on request: no error, NaN propagates
    try:
        assert torch.isnan(fastkd.sinkhorn(a, b, cost=bad, max_iter=3).value[0])
    finally:
        Cm.set_input_checks(None)


def test_empty_measures_raise():
    with pytest.raises(ValueError, match="cost has no points"):
        fastkd.sinkhorn(cost=torch.randn(2, 0, 4))
    with pytest.raises(ValueError, match="x has no points"):
        fastkd.sinkhorn(x=torch.randn(2, 0, 3), y=torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="y has no points"):
        fastkd.sinkhorn(x=torch.randn(2, 3, 3), y=torch.randn(2, 0, 3))
