"""Float64 reference formulas for the optimal-transport ops (test oracle, never a backend).

Conventions (shared with :mod:`fastkd.ot.sinkhorn`):

* plan        P_ij = a_i b_j exp((f_i + g_j − C_ij) / ε)
* updates     f_i = −ε log Σ_j b_j exp((g_j − C_ij)/ε),   g_j = −ε log Σ_i a_i exp((f_i − C_ij)/ε)
  (f first, starting from g = 0; one "iteration" is one f update followed by one g update)
* value       ⟨P, C⟩                                      (POT ``sinkhorn2``)
* reg_value   ⟨P, C⟩ + ε KL(P ‖ a⊗b)                      (POT ``ot.solve`` default ``reg_type="KL"``;
  equals ⟨a, f⟩ + ⟨b, g⟩ at convergence, GeomLoss' ``SamplesLoss("sinkhorn", debias=False)``)
"""

from __future__ import annotations

import torch


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, metric: str = "sqeuclidean") -> torch.Tensor:
    """Cost (..., n, m) between points x (..., n, d) and y (..., m, d).

    sqeuclidean ‖x−y‖², euclidean ‖x−y‖, l1 Σ|x−y|, cosine 1 − ⟨x,y⟩/(‖x‖‖y‖).
    """
    diff = x[..., :, None, :] - y[..., None, :, :]
    if metric == "sqeuclidean":
        return (diff * diff).sum(-1)
    if metric == "euclidean":
        return (diff * diff).sum(-1).sqrt()
    if metric == "l1":
        return diff.abs().sum(-1)
    if metric == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True)
        yn = y / y.norm(dim=-1, keepdim=True)
        return 1 - xn @ yn.transpose(-1, -2)
    raise ValueError(f"unknown metric {metric!r}")


def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, eps: float, n_iter: int) -> dict:
    """Plain log-domain Sinkhorn, a (..., n), b (..., m), cost (..., n, m); fixed ``n_iter`` iterations.

    Returns a dict with f, g, plan, value, reg_value (all differentiable: autograd through the loop).
    """
    log_a, log_b = a.log(), b.log()
    g = torch.zeros_like(b)
    f = torch.zeros_like(a)
    for _ in range(n_iter):
        f = -eps * torch.logsumexp(log_b[..., None, :] + (g[..., None, :] - cost) / eps, dim=-1)
        g = -eps * torch.logsumexp(log_a[..., :, None] + (f[..., :, None] - cost) / eps, dim=-2)
    log_p = log_a[..., :, None] + log_b[..., None, :] + (f[..., :, None] + g[..., None, :] - cost) / eps
    plan = log_p.exp()
    value = (plan * cost).sum((-1, -2))
    ab = a[..., :, None] * b[..., None, :]
    kl = torch.where(plan > 0, plan * (log_p - (ab).log()), torch.zeros_like(plan)).sum((-1, -2))
    kl = kl - plan.sum((-1, -2)) + ab.sum((-1, -2))
    return {"f": f, "g": g, "plan": plan, "value": value, "reg_value": value + eps * kl}


def sinkhorn_divergence(a, b, x, y, eps: float, n_iter: int, metric: str = "sqeuclidean") -> torch.Tensor:
    """S(a,b) − ½ S(a,a) − ½ S(b,b) with S = reg_value (GeomLoss' debiased Sinkhorn divergence)."""
    s_ab = sinkhorn(a, b, pairwise_cost(x, y, metric), eps, n_iter)["reg_value"]
    s_aa = sinkhorn(a, a, pairwise_cost(x, x, metric), eps, n_iter)["reg_value"]
    s_bb = sinkhorn(b, b, pairwise_cost(y, y, metric), eps, n_iter)["reg_value"]
    return s_ab - 0.5 * s_aa - 0.5 * s_bb


def sinkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
               eps: float = 0.1, n_iter: int = 20) -> torch.Tensor:
    """SinKD (arXiv 2402.17110): rows (B, V) → W_ij = ‖p_s,i − p_t,j‖₁; P = exp(−W/ε); n_iter times
    P ← P / row sums, then P ← P / column sums; loss ⟨P, W⟩ / B."""
    ps = torch.softmax(student_logits / temperature, dim=-1)
    pt = torch.softmax(teacher_logits / temperature, dim=-1)
    w = (ps[:, None, :] - pt[None, :, :]).abs().sum(-1)
    p = torch.exp(-w / eps)
    for _ in range(n_iter):
        p = p / p.sum(1, keepdim=True)
        p = p / p.sum(0, keepdim=True)
    return (p * w).sum() / ps.shape[0]


def uld_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """ULD (arXiv 2402.12030) per token: Σ_r |q_(r) − p_(r)| over the probabilities sorted descending,
    the shorter vocabulary zero-padded. student (..., Vs), teacher (..., Vt) → (...)."""
    q = torch.softmax(student_logits / temperature, -1).sort(-1, descending=True).values
    p = torch.softmax(teacher_logits / temperature, -1).sort(-1, descending=True).values
    v = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, v - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, v - p.shape[-1]))
    return (q - p).abs().sum(-1)
