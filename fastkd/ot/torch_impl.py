"""``torch`` backend of ``sinkhorn``: batched log-domain Sinkhorn, no Python loop over the batch.

Two paths, both computing the iterates of :mod:`fastkd.ot.sinkhorn` (f, then g, from g = 0):

* **Dense** (a cost matrix is given, or points whose (B, n, m) cost fits in ~16M elements): the
  log-domain updates are evaluated with an *absorbed* kernel (Schmitzer's stabilisation, in the log
  domain): K̃ = exp((f₀ + g₀ − C)/ε) is formed once at reference potentials (f₀, g₀); an f update is then

      f = f₀ − ε (M + log Σ_j K̃_ij b_j exp(δ_j − M)),   δ = (g − g₀)/ε,  M = max_j δ_j

  — one batched matrix–vector product instead of an exp over (B, n, m). Every factor is ≤ its exact value
  and only terms below the dtype's smallest normal are lost, so whenever every row sum s_i is above
  ``tiny**0.6`` (≈1e-23 in fp32) the update equals the log-sum-exp one to rounding. When a sum falls
  below that (early iterations, small ε, ε annealing), that half-step is done as a plain log-sum-exp over
  C and K̃ is re-absorbed at the new potentials. Re-absorbing right after an exact half-step keeps
  K̃ ≤ 1/b_j (resp. 1/a_i), so nothing overflows.
* **Tiled** (points, large problems): plain log-sum-exp half-steps over row (resp. column) tiles whose cost
  is recomputed from the points each time; peak extra memory O(TILE_ELEMS), never (B, n, m).

Autograd works through both (``grad="unroll"``); the op runs them under ``no_grad`` otherwise.
"""

from __future__ import annotations

import torch

from fastkd.core.registry import register
from fastkd.ot.sinkhorn import SinkhornParams, pairwise_cost, row_tile

_DENSE_MAX_ELEMS = 1 << 24


def _neg_inf_where_zero(w: torch.Tensor) -> torch.Tensor:
    return w.log()  # log 0 = -inf is what the log-sum-exp needs for zero-mass points


class _Dense:
    """Half-steps on a stored cost (B, n, m) with the absorbed kernel."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor):
        self.a, self.b, self.c = a, b, cost
        self.log_a, self.log_b = _neg_inf_where_zero(a), _neg_inf_where_zero(b)
        self.tiny = torch.finfo(cost.dtype).tiny ** 0.6
        self.k = self.kt = None  # absorbed kernel K̃ (B, n, m) and its transpose (B, m, n)
        self.k_eps = None

    def _absorb(self, f, g, eps):
        self.f0, self.g0, self.k_eps = f, g, eps
        self.k = torch.exp((f[:, :, None] + g[:, None, :] - self.c) / eps)
        # Both layouts, contiguous: CPU BLAS runs (B,1,n)@(B,n,m) several times faster than (B,n,m)@(B,m,1).
        self.kt = self.k.transpose(1, 2).contiguous()

    def f_step(self, g, f_prev, eps):
        if self.k is not None and self.k_eps == eps:
            d = (g - self.g0) / eps
            mx = d.amax(1, keepdim=True)
            s = torch.bmm((self.b * torch.exp(d - mx)).unsqueeze(1), self.kt).squeeze(1)
            if bool(s.amin() > self.tiny):
                return self.f0 - eps * (mx + s.log())
        f = -eps * torch.logsumexp(self.log_b[:, None, :] + (g[:, None, :] - self.c) / eps, dim=2)
        self._absorb(f, g, eps)
        return f

    def g_step(self, f, g_prev, eps):
        if self.k is not None and self.k_eps == eps:
            d = (f - self.f0) / eps
            mx = d.amax(1, keepdim=True)
            s = torch.bmm((self.a * torch.exp(d - mx)).unsqueeze(1), self.k).squeeze(1)
            if bool(s.amin() > self.tiny):
                return self.g0 - eps * (mx + s.log())
        g = -eps * torch.logsumexp(self.log_a[:, :, None] + (f[:, :, None] - self.c) / eps, dim=1)
        self._absorb(f, g, eps)
        return g


class _Tiled:
    """Plain log-sum-exp half-steps with the cost recomputed from points in tiles."""

    def __init__(self, a, b, x, y, metric):
        self.log_a, self.log_b = _neg_inf_where_zero(a), _neg_inf_where_zero(b)
        self.x, self.y, self.metric = x, y, metric

    def f_step(self, g, f_prev, eps):
        bsz, n, m = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        t = row_tile(bsz, n, m, 4 if self.metric == "l1" else 1)
        out = []
        for r0 in range(0, n, t):
            c = pairwise_cost(self.x[:, r0:r0 + t], self.y, self.metric)
            out.append(-eps * torch.logsumexp(self.log_b[:, None, :] + (g[:, None, :] - c) / eps, dim=2))
        return torch.cat(out, 1)

    def g_step(self, f, g_prev, eps):
        bsz, n, m = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        t = row_tile(bsz, m, n, 4 if self.metric == "l1" else 1)
        out = []
        for c0 in range(0, m, t):
            c = pairwise_cost(self.x, self.y[:, c0:c0 + t], self.metric)
            out.append(-eps * torch.logsumexp(self.log_a[:, :, None] + (f[:, :, None] - c) / eps, dim=1))
        return torch.cat(out, 1)


def row_error(a: torch.Tensor, f: torch.Tensor, f_next: torch.Tensor, eps: float) -> torch.Tensor:
    """‖P1 − a‖₁ per problem: after a g update the row sums are a_i exp((f_i − f_next_i)/ε)."""
    r = a * torch.expm1((f - f_next) / eps)
    return torch.where(a > 0, r, torch.zeros_like(r)).abs().sum(1)


def run_iterations(solver, a, b, params: SinkhornParams):
    """The shared loop: iterations, ε annealing, batch-wide tolerance check; returns (f, g, n_iter, err)."""
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    f_next = None
    err = None
    it = 0
    for it in range(1, params.max_iter + 1):
        eps = params.eps_at(it - 1)
        f = f_next if f_next is not None else solver.f_step(g, f, eps)
        g = solver.g_step(f, g, eps)
        f_next = None
        last = it == params.max_iter
        check = params.tol > 0 and it % params.check_every == 0
        if (check or last) and eps == params.eps:
            f_next = solver.f_step(g, f, eps)
            err = row_error(a, f, f_next, eps)
            if check and bool(err.amax() < params.tol):
                break
    if err is None:  # ended while still annealing (max_iter too small): measure anyway
        err = row_error(a, f, solver.f_step(g, f, params.eps_at(it - 1)), params.eps_at(it - 1))
    return f, g, it, err


def sinkhorn_torch(a, b, cost, x, y, params: SinkhornParams):
    """Batched log-domain Sinkhorn in PyTorch (see the module docstring)."""
    if cost is None and a.shape[0] * a.shape[1] * b.shape[1] <= _DENSE_MAX_ELEMS:
        cost = pairwise_cost(x, y, params.metric)
    solver = _Dense(a, b, cost) if cost is not None else _Tiled(a, b, x, y, params.metric)
    return run_iterations(solver, a, b, params)


register("sinkhorn", "torch", sinkhorn_torch)  # runs any input: no capabilities to declare
