"""``fastkd.sinkhorn``: batched entropic optimal transport (log-domain Sinkhorn).

Problem, for each batch element (P ≥ 0, P 1 = a, Pᵀ 1 = b)::

    min_P ⟨P, C⟩ + ε KL(P ‖ a⊗b),   P_ij = a_i b_j exp((f_i + g_j − C_ij) / ε)

Iterations (f first, from g = 0): f_i = −ε log Σ_j b_j exp((g_j − C_ij)/ε), then
g_j = −ε log Σ_i a_i exp((f_i − C_ij)/ε). After each iteration the column marginals are exact;
``error`` is the row-marginal violation ‖P 1 − a‖₁ (per problem).

Outputs (:class:`SinkhornResult`):

* ``value``      ⟨P, C⟩, the transport cost of the entropic plan (POT ``ot.sinkhorn2``).
* ``reg_value``  ⟨P, C⟩ + ε KL(P ‖ a⊗b): POT ``ot.solve(M, a, b, reg=ε)`` (its default ``reg_type="KL"``)
  and GeomLoss' ``SamplesLoss("sinkhorn", debias=False)`` objective; = ⟨a, f⟩ + ⟨b, g⟩ at convergence.
  (POT's ``ot.batch.solve_batch`` default ``reg_type="entropy"`` adds ε Σ P log P instead; the two differ
  by the constant ε Σ P log(a_i b_j) when the marginals are met.)
* ``f`` (B, n), ``g`` (B, m) the dual potentials above; ``plan`` (B, n, m) only with ``return_plan``.
* ``n_iter`` iterations run (batch-wide), ``error`` (B,) the last measured marginal error.

Gradients: ``grad="envelope"`` (default) solves without autograd and attaches, at the final potentials,
∂reg_value/∂C = P, ∂reg_value/∂a = f, ∂reg_value/∂b = g and ∂value/∂C = P (P held fixed, as POT's
``grad="envelope"`` does); point clouds get theirs through the cost, ∂/∂x = Σ_j P_ij ∂C_ij/∂x_i (recomputed
in tiles). The plan carries no gradient. ``grad="unroll"`` runs autograd through every iteration
(torch backend only); everything, the plan included, is then differentiable.

Marginals: a, b must be non-negative and sum to 1 per problem (within 1e-4); otherwise a ValueError
naming the argument (no silent renormalisation). Data checks that need a GPU sync run on CPU tensors
only, or where ``FASTKD_CHECK_INPUTS=1`` / :func:`fastkd.core.checks.set_input_checks` ask for them.

Backend contract (op ``"sinkhorn"``)::

    fn(a (B, n), b (B, m), cost (B, n, m) | None, x (B, n, d) | None, y (B, m, d) | None,
       params: SinkhornParams) -> (f (B, n), g (B, m), n_iter: int, error (B,))

all in one float dtype (fp32 or fp64); the backend runs under ``torch.no_grad`` unless ``params.unroll``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastkd.core import checks as C
from fastkd.core.registry import declare, requested_backend, select

declare("sinkhorn",
        ["fastkd.ot.torch_impl", "fastkd.ot.triton_impl", "fastkd.ot.cuda_impl"],
        auto_order=("triton", "torch"))

METRICS = ("sqeuclidean", "euclidean", "l1", "cosine")
GRADS = ("envelope", "unroll")
# Tiles over (B, rows, m) hold at most this many elements (also bounds the points path's cost tiles).
TILE_ELEMS = 1 << 22


class SinkhornNonConvergenceError(RuntimeError):
    """``raise_on_nonconvergence=True`` and the marginal error stayed above ``tol`` after ``max_iter``."""


class SinkhornResult(NamedTuple):
    value: torch.Tensor  # (B,) or () ⟨P, C⟩
    reg_value: torch.Tensor  # (B,) or () ⟨P, C⟩ + ε KL(P ‖ a⊗b)
    f: torch.Tensor  # (B, n) or (n,)
    g: torch.Tensor  # (B, m) or (m,)
    plan: torch.Tensor | None  # (B, n, m) or (n, m), only with return_plan=True
    n_iter: int
    error: torch.Tensor  # (B,) or () ‖P 1 − a‖₁


@dataclass(frozen=True)
class SinkhornParams:
    """Non-tensor arguments of one solve. ``eps_start`` > eps enables geometric annealing."""

    eps: float = 0.05
    max_iter: int = 100
    tol: float = 1e-6
    eps_scaling: float | None = None
    eps_start: float | None = None
    metric: str = "sqeuclidean"
    unroll: bool = False
    check_every: int = 10

    def eps_at(self, it: int) -> float:
        """ε used in iteration ``it`` (0-based): max(eps, eps_start · eps_scaling^it)."""
        if self.eps_scaling is None or self.eps_start is None:
            return self.eps
        return max(self.eps, self.eps_start * self.eps_scaling**it)


# ---------------------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------------------


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Cost (B, n, m) between x (B, n, d) and y (B, m, d); see :data:`METRICS` (sqeuclidean = ‖x−y‖²)."""
    if metric in ("sqeuclidean", "euclidean"):
        sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * torch.bmm(x, y.transpose(1, 2))
        sq = sq.clamp_min(0)
        return sq if metric == "sqeuclidean" else sq.sqrt()
    if metric == "l1":
        return torch.cdist(x, y, p=1)
    # a zero vector has no direction: ``sinkhorn`` rejects it where value checks run; elsewhere (no host
    # sync) its similarity to every point is defined as 0, i.e. cost 1, instead of 0/0 = NaN
    tiny = torch.finfo(x.dtype).tiny
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(tiny)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(tiny)
    return 1 - torch.bmm(xn, yn.transpose(1, 2))


def cost_upper_bound(x: torch.Tensor, y: torch.Tensor, metric: str) -> float:
    """A cheap bound on max C from the bounding box of both clouds (for ε annealing)."""
    if metric == "cosine":
        return 2.0
    pts = torch.cat([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])])
    span = (pts.amax(0) - pts.amin(0)).double()
    if metric == "l1":
        return float(span.sum())
    diam2 = float((span * span).sum())
    return diam2 if metric == "sqeuclidean" else math.sqrt(diam2)


def row_tile(b: int, rows: int, cols: int, d: int = 1) -> int:
    """Rows per tile so that (B, tile, cols[, d]) stays within TILE_ELEMS."""
    return max(1, min(rows, TILE_ELEMS // max(1, b * cols * d)))


def plan_stats(a, b, cost, x, y, f, g, eps: float, metric: str):
    """(⟨P, C⟩ (B,), row sums P1 (B, n), column sums Pᵀ1 (B, m)) without storing P when from points."""
    log_a, log_b = a.log(), b.log()

    def block(c, r0, r1):
        lp = log_a[:, r0:r1, None] + log_b[:, None, :] + (f[:, r0:r1, None] + g[:, None, :] - c) / eps
        p = lp.exp()
        return (p * c).sum((1, 2)), p.sum(2), p.sum(1)

    if cost is not None:
        return block(cost, 0, cost.shape[1])
    bsz, n, m = x.shape[0], x.shape[1], y.shape[1]
    t = row_tile(bsz, n, m, 4)
    val, rows, cols = 0, [], 0
    for r0 in range(0, n, t):
        v, r, c = block(pairwise_cost(x[:, r0:r0 + t], y, metric), r0, min(n, r0 + t))
        val, cols = val + v, cols + c
        rows.append(r)
    return val, torch.cat(rows, 1), cols


def make_plan(a, b, cost, x, y, f, g, eps: float, metric: str) -> torch.Tensor:
    c = cost if cost is not None else pairwise_cost(x, y, metric)
    return (a.log()[:, :, None] + b.log()[:, None, :] + (f[:, :, None] + g[:, None, :] - c) / eps).exp()


class _Envelope(torch.autograd.Function):
    """(value, reg_value) at fixed potentials, with the envelope-theorem gradients (module docstring)."""

    @staticmethod
    def forward(ctx, a, b, cost, x, y, f, g, eps, metric):
        val, rows, cols = plan_stats(a, b, cost, x, y, f, g, eps, metric)
        reg = _reg_value(rows, cols, f, g, eps, a, b)
        ctx.save_for_backward(a, b, cost, x, y, f, g)
        ctx.eps, ctx.metric = eps, metric
        return val, reg

    @staticmethod
    def backward(ctx, gv, gr):
        a, b, cost, x, y, f, g = ctx.saved_tensors
        eps, metric = ctx.eps, ctx.metric
        w = (gv + gr)[:, None, None]
        ga = gr[:, None] * f if ctx.needs_input_grad[0] else None
        gb = gr[:, None] * g if ctx.needs_input_grad[1] else None
        gc = gx = gy = None
        if cost is not None and ctx.needs_input_grad[2]:
            gc = w * make_plan(a, b, cost, None, None, f, g, eps, metric)
        if x is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            gx, gy = torch.zeros_like(x), torch.zeros_like(y)
            n, m = x.shape[1], y.shape[1]
            t = row_tile(x.shape[0], n, m, 4)
            log_a, log_b = a.log(), b.log()
            for r0 in range(0, n, t):
                with torch.enable_grad():
                    xt = x[:, r0:r0 + t].detach().requires_grad_()
                    yt = y.detach().requires_grad_()
                    c = pairwise_cost(xt, yt, metric)
                    lp = (log_a[:, r0:r0 + t, None] + log_b[:, None, :]
                          + (f[:, r0:r0 + t, None] + g[:, None, :] - c.detach()) / eps)
                    dx, dy = torch.autograd.grad((lp.exp() * w * c).sum(), (xt, yt))
                gx[:, r0:r0 + t] += dx
                gy += dy
        return ga, gb, gc, gx, gy, None, None, None, None


def _reg_value(rows, cols, f, g, eps, a, b):
    # ⟨P, C⟩ + ε KL(P ‖ ab) = ⟨P, C⟩ + Σ P (f + g − C) − ε (ΣP − Σab)
    #                       = Σ_i f_i (P1)_i + Σ_j g_j (Pᵀ1)_j − ε (ΣP − Σa Σb)
    return (f * rows).sum(1) + (g * cols).sum(1) - eps * (rows.sum(1) - a.sum(1) * b.sum(1))


def _values(a, b, cost, x, y, f, g, eps, metric, unroll):
    """(value, reg_value) (B,): differentiable through f, g in unroll mode, envelope gradients otherwise."""
    if unroll:
        val, rows, cols = plan_stats(a, b, cost, x, y, f, g, eps, metric)
        return val, _reg_value(rows, cols, f, g, eps, a, b)
    return _Envelope.apply(a, b, cost, x, y, f.detach(), g.detach(), eps, metric)


# ---------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _as_batched(name: str, t: torch.Tensor | None, dims: int) -> torch.Tensor | None:
    """Accept (…) with ``dims`` dims (batched) or one fewer (unbatched); return the batched view."""
    if t is None:
        return None
    C.check_float_tensor(name, t)
    if t.dim() == dims - 1:
        return t.unsqueeze(0)
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims - 1} or {dims} dimensions, got shape {tuple(t.shape)}")
    return t


def _marginal(name: str, w: torch.Tensor | None, bsz: int, size: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    if w is None:
        return torch.full((bsz, size), 1.0 / size, dtype=dtype, device=device)
    C.check_float_tensor(name, w)
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but the cost/points are on {device}")
    if w.dim() not in (1, 2) or w.shape[-1] != size or (w.dim() == 2 and w.shape[0] not in (1, bsz)):
        raise ValueError(f"{name} must have shape ({size},) or ({bsz}, {size}), got {tuple(w.shape)}")
    if C.value_checks_enabled(w):
        if bool((w < 0).any()) or bool(w.isnan().any()):
            raise ValueError(f"{name} must be non-negative (a probability vector); it has negative or NaN "
                             f"entries")
        sums = w.double().sum(-1)
        if bool(((sums - 1).abs() > 1e-4).any()):
            raise ValueError(f"{name} must sum to 1 along its last dimension (got sums in "
                             f"[{float(sums.min()):.6g}, {float(sums.max()):.6g}]); normalise it first")
    return w.to(dtype).expand(bsz, size)


def _check_finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and C.value_checks_enabled(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf entries")


def _check_nonzero(name: str, t: torch.Tensor | None) -> None:
    """metric="cosine" needs a direction for every point (checked where value checks run)."""
    if t is None or not C.value_checks_enabled(t):
        return
    zero = (t == 0).all(-1)
    if bool(zero.any()):
        prob, idx = (int(i) for i in zero.nonzero()[0])
        raise ValueError(f"{name} has a zero vector (problem {prob}, point {idx}); metric='cosine' needs "
                         f"non-zero points (1 − <x,y>/(|x||y|) is undefined for it)")


# ---------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------


def _solve(impl, a, b, cost, x, y, params: SinkhornParams, return_plan: bool):
    unroll = params.unroll
    with torch.enable_grad() if unroll else torch.no_grad():
        dt = (lambda t: t) if unroll else (lambda t: None if t is None else t.detach())
        f, g, n_iter, err = impl.fn(dt(a), dt(b), dt(cost), dt(x), dt(y), params)
    value, reg = _values(a, b, cost, x, y, f, g, params.eps, params.metric, unroll)
    plan = None
    if return_plan:
        with torch.enable_grad() if unroll else torch.no_grad():
            plan = make_plan(a, b, cost, x, y, f, g, params.eps, params.metric)
    if not unroll:
        f, g = f.detach(), g.detach()
    return value, reg, f, g, plan, n_iter, err.detach()


def sinkhorn(
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    cost: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    metric: str = "sqeuclidean",
    eps: float = 0.05,
    max_iter: int = 100,
    tol: float = 1e-6,
    eps_scaling: float | None = None,
    grad: str = "envelope",
    debias: bool = False,
    return_plan: bool = False,
    backend: str = "auto",
    raise_on_nonconvergence: bool = False,
) -> SinkhornResult:
    """Batched entropic OT between a (B, n) and b (B, m) (see the module docstring for every formula).

    Args:
        a, b: marginals (B, n) / (B, m), or (n,) / (m,) shared by the batch; default uniform. Non-negative,
            summing to 1 (ValueError otherwise).
        cost: (B, n, m) or (n, m) cost matrix; or give points instead:
        x, y: (B, n, d) and (B, m, d) (or unbatched (n, d), (m, d)) with ``metric`` one of
            "sqeuclidean" (‖x−y‖², POT's default), "euclidean", "l1", "cosine"; the cost is built on the
            fly (in tiles, never as a whole (B, n, m) tensor when that would exceed ~16M elements).
            "cosine" with a zero vector is a ValueError where value checks run (CPU tensors or
            FASTKD_CHECK_INPUTS=1); elsewhere a zero vector gets cost 1 to every point (similarity 0).
        eps: entropic regularisation ε > 0 (in cost units). Stable down to ~1e-3 on costs of scale 1.
        max_iter: iterations (one f and one g update each).
        tol: stop once every problem's ‖P1 − a‖₁ < tol (checked every 10 iterations, batch-wide);
            tol=0 runs exactly max_iter iterations.
        eps_scaling: ratio in (0, 1): ε anneals geometrically from the largest cost down to ``eps``, one
            iteration per step (GeomLoss style); the annealing iterations count toward max_iter.
        grad: "envelope" (default) or "unroll" (see module docstring).
        debias: return the Sinkhorn divergence S(a,b) − ½S(a,a) − ½S(b,b) (value, reg_value and f, g
            debiased GeomLoss-style: f_ab − f_aa, g_ab − g_bb); needs points x, y.
        return_plan: also form the (B, n, m) plan.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".
        raise_on_nonconvergence: raise :class:`SinkhornNonConvergenceError` when the error stays ≥ tol.

    Returns:
        :class:`SinkhornResult`; value/reg_value fp32 (fp64 for fp64 inputs), shape (B,) or () unbatched.
    """
    C.check_positive("eps", eps)
    _check_int("max_iter", max_iter, 1)
    C.check_range("tol", tol, 0.0, math.inf)
    if eps_scaling is not None:
        C.check_range("eps_scaling", eps_scaling, 0.0, 1.0)
        if not 0 < eps_scaling < 1:
            raise ValueError(f"eps_scaling must be in (0, 1) or None, got {eps_scaling!r}")
    C.check_choice("grad", grad, GRADS)
    C.check_choice("metric", metric, METRICS)
    if (cost is None) == (x is None and y is None):
        raise ValueError("give either cost=(B, n, m) or points x=(B, n, d), y=(B, m, d), not both or neither")
    if cost is None and (x is None or y is None):
        raise ValueError(f"points need both x and y (got {'y' if x is None else 'x'} only)")
    unbatched = (cost if cost is not None else x).dim() == 2
    cost_b = _as_batched("cost", cost, 3)
    x_b, y_b = _as_batched("x", x, 3), _as_batched("y", y, 3)
    if x_b is not None:
        if x_b.dim() != y_b.dim() or x_b.shape[0] != y_b.shape[0] or x_b.shape[2] != y_b.shape[2]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must share the batch size and point "
                             f"dimension d")
        C.check_same_device(x=x, y=y)
        bsz, n, m = x_b.shape[0], x_b.shape[1], y_b.shape[1]
    else:
        bsz, n, m = cost_b.shape
    if n == 0 or m == 0:
        side = ("x" if n == 0 else "y") if x_b is not None else "cost"
        raise ValueError(f"{side} has no points (n={n}, m={m}): each measure needs at least one point")
    if debias and cost is not None:
        raise ValueError("debias=True needs points x, y (S(a,a) and S(b,b) need the costs C(x,x), C(y,y))")
    ref = cost_b if cost_b is not None else x_b
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (a, b, cost, x, y)) \
        else torch.float32
    device = ref.device
    a_b = _marginal("a", a, bsz, n, dtype, device)
    b_b = _marginal("b", b, bsz, m, dtype, device)
    _check_finite("cost", cost_b)
    _check_finite("x", x_b)
    _check_finite("y", y_b)
    if metric == "cosine":
        _check_nonzero("x", x_b)
        _check_nonzero("y", y_b)
    cost_b = None if cost_b is None else cost_b.to(dtype)
    x_b = None if x_b is None else x_b.to(dtype)
    y_b = None if y_b is None else y_b.to(dtype)

    eps_start = None
    if eps_scaling is not None:
        eps_start = float(cost_b.amax()) if cost_b is not None else cost_upper_bound(x_b, y_b, metric)
    params = SinkhornParams(eps=float(eps), max_iter=max_iter, tol=float(tol), eps_scaling=eps_scaling,
                            eps_start=eps_start, metric=metric, unroll=grad == "unroll")
    name = requested_backend(backend)
    if name == "auto" and device.type != "cuda":
        name = "torch"  # the interpreter is for tests; CPU tensors run the torch backend unless asked
    impl = select("sinkhorn", name, a=a_b, b=b_b, cost=cost_b, x=x_b, y=y_b, params=params)
    value, reg, f, g, plan, n_iter, err = _solve(impl, a_b, b_b, cost_b, x_b, y_b, params, return_plan)
    if debias:
        va, ra, fa, _, _, na, ea = _solve(impl, a_b, a_b, None, x_b, x_b, params, False)
        vb, rb, _, gb, _, nb, eb = _solve(impl, b_b, b_b, None, y_b, y_b, params, False)
        value, reg = value - 0.5 * (va + vb), reg - 0.5 * (ra + rb)
        f, g = f - fa, g - gb
        n_iter, err = max(n_iter, na, nb), torch.maximum(err, torch.maximum(ea, eb))
    if raise_on_nonconvergence and tol > 0 and bool((err >= tol).any()):
        raise SinkhornNonConvergenceError(
            f"sinkhorn did not converge: marginal error {float(err.max()):.3g} >= tol={tol} after {n_iter} "
            f"iterations (raise max_iter, increase eps, or use eps_scaling)")
    if unbatched:
        value, reg, f, g, err = value[0], reg[0], f[0], g[0], err[0]
        plan = None if plan is None else plan[0]
    return SinkhornResult(value, reg, f, g, plan, n_iter, err)
