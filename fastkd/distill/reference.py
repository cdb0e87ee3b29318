"""Plain reference formulas for the divergences on logits (the test oracle, never a backend).

Everything is written with whole-vocabulary tensors and autograd, for clarity; call it in float64.
Notation (after temperature): s = student_logits / T, t = teacher_logits / T, q = softmax(s) (student),
p = softmax(t) (teacher). Terms of the form x·(log x − log y) are 0 where x = 0, so ``-inf`` logits are
legal; a divergence that is infinite (p > 0 where q = 0 for fkl) stays infinite.

Which divergences exist and their hyperparameter defaults come from the divergence table
(:mod:`fastkd.core.divergences`); :data:`FORMULAS` maps every table row to its formula here (tested).
The reference applies no endpoint rule: jsd at β ∈ {0, 1} etc. are computed from their own formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastkd.core.divergences import DIVERGENCES, check_divergence, resolve_hyper  # noqa: F401 (re-exported)


def _xlogy_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Σ x·(log x − log y) over the last dim, with 0 where x == 0 (NaN-safe gradients)."""
    pos = x > 0
    diff = torch.where(pos, log_x - log_y, torch.zeros_like(log_x))
    return (torch.where(pos, x, torch.zeros_like(x)) * diff).sum(-1)


def _log_mix(log_a: torch.Tensor, wa: float, log_b: torch.Tensor, wb: float) -> torch.Tensor:
    """log(wa·a + wb·b) from log a, log b (weights in [0, 1])."""
    terms = []
    if wa > 0:
        terms.append(log_a + math.log(wa))
    if wb > 0:
        terms.append(log_b + math.log(wb))
    if len(terms) == 1:
        return terms[0]
    a, b = terms
    both = torch.isneginf(a) & torch.isneginf(b)  # logaddexp's gradient is NaN there; the value is -inf
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    out = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, a, out)


def fkl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return _xlogy_ratio(log_p.exp(), log_p, log_q)


def rkl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return _xlogy_ratio(log_q.exp(), log_q, log_p)


def jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD: β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q; β=0 → fkl, β=1 → rkl."""
    if beta == 0:
        return fkl(log_p, log_q)
    if beta == 1:
        return rkl(log_p, log_q)
    log_m = _log_mix(log_p, beta, log_q, 1 - beta)
    return beta * _xlogy_ratio(log_p.exp(), log_p, log_m) + (1 - beta) * _xlogy_ratio(log_q.exp(), log_q, log_m)


def symkl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * fkl(log_p, log_q) + (1 - beta) * rkl(log_p, log_q)


def skl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(p ‖ αp + (1−α)q)."""
    return _xlogy_ratio(log_p.exp(), log_p, _log_mix(log_p, alpha, log_q, 1 - alpha))


def srkl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew reverse KL: KL(q ‖ (1−α)p + αq)."""
    return _xlogy_ratio(log_q.exp(), log_q, _log_mix(log_p, 1 - alpha, log_q, alpha))


def tvd(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def akl_weights(log_p: torch.Tensor, log_q: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL head/tail weights from a detached student (Wu et al. 2024).

    Sort p descending; head = tokens whose cumulative mass is ≤ mu (the top token always), tail = rest.
    g_H = Σ_head |p − q|, g_T = Σ_tail |p − q|; returns (g_H, g_T) / (g_H + g_T), (0, 0) when p == q.
    """
    p = log_p.exp().detach()
    q = log_q.exp().detach()
    p_sorted, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    err = (p_sorted - q.gather(-1, idx)).abs()
    head = torch.cumsum(p_sorted, dim=-1) <= mu
    if mu >= 1:  # every token: a rounded running sum of p may pass 1 on the last tokens
        head = torch.ones_like(head)
    head[..., 0] = True
    g_h = torch.where(head, err, torch.zeros_like(err)).sum(-1)
    g_t = torch.where(head, torch.zeros_like(err), err).sum(-1)
    den = g_h + g_t
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, g_h / safe, 0.0), torch.where(den > 0, g_t / safe, 0.0)


def akl(log_p: torch.Tensor, log_q: torch.Tensor, mu: float) -> torch.Tensor:
    w_h, w_t = akl_weights(log_p, log_q, mu)
    return w_h * fkl(log_p, log_q) + w_t * rkl(log_p, log_q)


def taid_target_logits(s: torch.Tensor, t: torch.Tensor, t_interp: float) -> torch.Tensor:
    """(1−t)·stopgrad(s) + t·t_logits, with 0·(−inf) read as 0 at the endpoints."""
    s = s.detach()
    if t_interp == 0:
        return s
    if t_interp == 1:
        return t
    return (1 - t_interp) * s + t_interp * t


def taid(s: torch.Tensor, t: torch.Tensor, t_interp: float) -> torch.Tensor:
    """TAID: KL(r ‖ q) with r = softmax((1−t)·stopgrad(s) + t·t_logits)."""
    log_r = F.log_softmax(taid_target_logits(s, t, t_interp), dim=-1)
    return _xlogy_ratio(log_r.exp(), log_r, F.log_softmax(s, dim=-1))


def ab(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """ABKD's α-β divergence: −1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)), in the log domain."""
    ab_ = alpha + beta
    terms = ((alpha * log_p + beta * log_q).exp() - alpha / ab_ * (ab_ * log_p).exp()
             - beta / ab_ * (ab_ * log_q).exp())
    return -terms.sum(-1) / (alpha * beta)


def zero(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """The table's internal ``zero`` divergence (skl / srkl at α = 1): 0, NaN where an input is NaN."""
    nan = torch.isnan(log_p).any(-1) | torch.isnan(log_q).any(-1)
    grad_path = torch.nan_to_num(log_q, 0.0, 0.0, 0.0).sum(-1) * 0.0  # zero gradient, keeps autograd happy
    return torch.where(nan, math.nan, grad_path)


# name -> per-token formula of (s, t, log_p, log_q, hyperparameters); one entry per table row.
FORMULAS: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": lambda s, t, lp, lq, h: fkl(lp, lq),
    "rkl": lambda s, t, lp, lq, h: rkl(lp, lq),
    "jsd": lambda s, t, lp, lq, h: jsd(lp, lq, h["beta"]),
    "symkl": lambda s, t, lp, lq, h: symkl(lp, lq, h["beta"]),
    "skl": lambda s, t, lp, lq, h: skl(lp, lq, h["alpha"]),
    "srkl": lambda s, t, lp, lq, h: srkl(lp, lq, h["alpha"]),
    "tvd": lambda s, t, lp, lq, h: tvd(lp, lq),
    "akl": lambda s, t, lp, lq, h: akl(lp, lq, h["mu"]),
    "taid": lambda s, t, lp, lq, h: taid(s, t, h["t"]),
    "ab": lambda s, t, lp, lq, h: ab(lp, lq, h["alpha"], h["beta"]),
    "zero": lambda s, t, lp, lq, h: zero(lp, lq),
}


def per_token(s: torch.Tensor, t: torch.Tensor, name: str, *, beta: float | None = None,
              alpha: float | None = None, mu: float | None = None, t_interp: float | None = None) -> torch.Tensor:
    """Per-token divergence between temperature-scaled logits s (student) and t (teacher), shape (...,).

    Hyperparameters left None take the divergence's default from the table.
    """
    if name != "zero":
        check_divergence(name, "logits")
    h = resolve_hyper(name, {"beta": beta, "alpha": alpha, "mu": mu, "t": t_interp})
    return FORMULAS[name](s, t, F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1), h)


def apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style logit capping: cap·tanh(logits / cap)."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: float | torch.Tensor | None = None,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    beta: float | None = None,
    alpha: float | None = None,
    mu: float | None = None,
    t: float | None = None,
) -> torch.Tensor:
    """Reference for :func:`fastkd.distill_loss` (same arguments, no backend)."""
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    s = student_logits / temperature
    tt = teacher_logits / temperature
    loss = per_token(s, tt, divergence, beta=beta, alpha=alpha, mu=mu, t_interp=t)
    if scale_by_t2:
        loss = loss * temperature**2
    keep = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    if labels is not None:
        keep = keep & (labels != ignore_index)
    if mask is not None:
        keep = keep & mask
    if ce_weight:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
        ce = -F.log_softmax(student_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        loss = loss + ce_weight * ce
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    total = loss.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / keep.sum().clamp_min(1)


def distill_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Reference for ``return_stats=True`` (:mod:`fastkd.core.stats`): ``{name: (N,)}`` in the input dtype
    (call it in float64), N = tokens flattened, 0 where excluded (``labels == ignore_index`` / ``mask`` False).

    With p = softmax(t), q = softmax(s), s, t = (capped) logits / T: teacher_entropy = −Σ p log p,
    student_entropy = −Σ q log q, top1_agree = [argmax s == argmax t] (first index on ties), kl = Σ p (log p −
    log q) (0·log 0 = 0; +inf where p > 0 = q).
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    zs = apply_softcap(student_logits, softcap).detach()
    zt = apply_softcap(teacher_logits, softcap).detach()
    v = zs.shape[-1]
    zs, zt = zs.reshape(-1, v), zt.reshape(-1, v)
    log_q = F.log_softmax(zs / temperature, dim=-1)
    log_p = F.log_softmax(zt / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    out = {
        "teacher_entropy": -torch.where(p > 0, p * log_p, zero).sum(-1),
        "student_entropy": -torch.where(q > 0, q * log_q, zero).sum(-1),
        "top1_agree": (zs.argmax(-1) == zt.argmax(-1)).to(p.dtype),
        "kl": fkl(log_p, log_q),
    }
    keep = torch.ones(zs.shape[0], dtype=torch.bool, device=zs.device)
    if labels is not None:
        keep = keep & (labels.reshape(-1) != ignore_index)
    if mask is not None:
        keep = keep & mask.reshape(-1)
    return {k: torch.where(keep, x, zero) for k, x in out.items()}


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    **kw,
) -> torch.Tensor:
    """Reference for :func:`fastkd.fused_linear_distill_loss`: materialise both logits, then distill."""
    zs = F.linear(student_hidden, student_weight, student_bias)
    if teacher_logits is None:
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return distill_loss(apply_softcap(zs, softcap), apply_softcap(teacher_logits, softcap), **kw)
