"""Plain reference formulas for sparse (top-k / tail / sampled) logit distillation: the test oracle.

Written with whole-vocabulary tensors and autograd for clarity; call it in float64. Notation:
s = student_logits / T, q = softmax(s) over the FULL vocabulary, ids (..., K) with −1 = padding slot.

Teacher side, from ``values`` (u_k = the stored value at slot k, padding slots excluded):
  - ``topk`` / ``sampled``: p̃_k = softmax_k(f · log u_k) over the valid slots, where log u = values for
    "logprobs", log(values) for "probs"/"counts", values for "logits"; f = 1/T for logits,
    T_gen/T when ``teacher_temperature=T_gen`` is given for log-probs/probs (re-tempering), else 1.
  - ``topk_tail``: p_k = u_k (probabilities, not renormalised) and a tail bucket p_tail = 1 − Σ p_k
    (taken as 0 when below 4·K·eps of the values' dtype: rounding noise of the stored values, not mass).
Student side:
  - ``topk`` fkl / ``sampled``: log q_k = s_{id_k} − logsumexp(s) (full normaliser);
    D = Σ_k p̃_k (log p̃_k − log q_k).
  - ``topk`` rkl / jsd: q̃ = softmax over the K ids of s; D = KL(q̃‖p̃) or β KL(p̃‖m) + (1−β) KL(q̃‖m),
    m = β p̃ + (1−β) q̃ (β = 0 → fkl, β = 1 → rkl as in TRL).
  - ``topk_tail``: K + 1 events on both sides, q_tail = Σ_{v ∉ ids} q_v; the divergence over those events.
The per-token loss is multiplied by T² when ``scale_by_t2``.
"""

from __future__ import annotations

import math

import torch


def _xlogy_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    pos = x > 0
    diff = torch.where(pos, log_x - log_y, torch.zeros_like(log_x))
    return (torch.where(pos, x, torch.zeros_like(x)) * diff).sum(-1)


def _div(name: str, log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """fkl / rkl / generalized jsd over the last dim, from log-probabilities."""
    if name == "jsd" and beta in (0.0, 1.0):
        name = "fkl" if beta == 0.0 else "rkl"
    if name == "fkl":
        return _xlogy_ratio(log_p.exp(), log_p, log_q)
    if name == "rkl":
        return _xlogy_ratio(log_q.exp(), log_q, log_p)
    some = (log_p > -math.inf) | (log_q > -math.inf)  # logaddexp(−inf, −inf) has a NaN gradient
    zero = torch.zeros_like(log_p)
    log_m = torch.logaddexp(
        torch.where(some, log_p, zero) + math.log(beta), torch.where(some, log_q, zero) + math.log(1 - beta)
    )
    log_m = torch.where(some, log_m, torch.full_like(log_m, -math.inf))
    return beta * _xlogy_ratio(log_p.exp(), log_p, log_m) + (1 - beta) * _xlogy_ratio(
        log_q.exp(), log_q, log_m
    )


def teacher_log_values(values: torch.Tensor, kind: str) -> torch.Tensor:
    """log u_k for the stored ``values`` of kind logprobs / probs / counts / logits (padding not applied)."""
    v = values.double() if values.dtype != torch.float64 else values
    return v if kind in ("logprobs", "logits") else torch.log(v)


def sparse_distill_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    values: str = "logprobs",
    mode: str = "topk",
    divergence: str = "fkl",
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    scale_by_t2: bool = False,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token loss (...,) (no masking or reduction) with autograd to ``student_logits``; use float64."""
    s = student_logits / temperature
    log_q_full = torch.log_softmax(s, dim=-1)
    valid = teacher_ids >= 0
    safe = torch.where(valid, teacher_ids, torch.zeros_like(teacher_ids)).long()
    neg_inf = torch.full_like(log_q_full[..., :1].expand(safe.shape), -math.inf)
    log_q_ids = torch.where(valid, log_q_full.gather(-1, safe), neg_inf)
    log_u = torch.where(valid, teacher_log_values(teacher_values, values), neg_inf.detach())
    if mode in ("topk", "sampled"):
        if values == "logits":
            f = 1.0 / temperature
        elif teacher_temperature is not None:
            f = teacher_temperature / temperature
        else:
            f = 1.0
        log_p = torch.log_softmax(log_u * f, dim=-1)
        if mode == "sampled" or divergence == "fkl" or (divergence == "jsd" and beta == 0.0):
            out = _xlogy_ratio(log_p.exp(), log_p, log_q_ids)
        else:
            log_qt = torch.log_softmax(torch.where(valid, s.gather(-1, safe), neg_inf), dim=-1)
            out = _div(divergence, log_p, log_qt, beta)
    elif mode == "topk_tail":
        p_k = log_u.exp()
        p_tail = (1 - p_k.sum(-1, keepdim=True)).clamp_min(0)
        # a tail below the rounding noise of K stored values is taken as no mass
        noise = 4 * teacher_ids.shape[-1] * torch.finfo(teacher_values.dtype).eps
        p_tail = torch.where(p_tail <= noise, torch.zeros_like(p_tail), p_tail)
        in_k = torch.zeros_like(log_q_full).scatter_add(-1, safe, valid.to(log_q_full.dtype)) > 0
        q_full = log_q_full.exp()
        q_tail = torch.where(in_k, torch.zeros_like(q_full), q_full).sum(-1, keepdim=True)
        log_p = torch.cat([log_u, torch.log(p_tail)], dim=-1)
        log_q = torch.cat([log_q_ids, torch.log(q_tail)], dim=-1)
        out = _div(divergence, log_p, log_q, beta)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out * (temperature**2 if scale_by_t2 else 1.0)


def sparse_stats(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    values: str = "logprobs",
    mode: str = "topk",
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    teacher_tail: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reference for ``return_stats=True`` of the sparse losses: ``{name: (N,)}`` in the input dtype (call it in
    float64), N = tokens flattened, 0 where excluded (``labels == ignore_index`` / ``mask`` False).

    The events are those of the loss: topk/sampled the K slots with p̃ (as :func:`sparse_distill_loss`) and
    the student's full-vocabulary q at the ids; topk_tail the K slots + one tail event (p_tail = 1 − Σ p_k or
    exp(teacher_tail); q_tail = Σ_{v ∉ ids} q_v). teacher_entropy = −Σ_e p_e log p_e, student_entropy =
    −Σ_v q_v log q_v over the whole vocabulary, kl = Σ_e p_e (log p_e − log q_e) (the mode's fkl loss without
    T²), top1_agree = [argmax_v z_v == the valid slot id with the largest value] (first / smallest on ties; 0
    when no slot holds teacher mass). Written independently of the backends' K-level code.
    """
    z = student_logits.detach()
    v = z.shape[-1]
    k = teacher_ids.shape[-1]
    z = z.reshape(-1, v)
    ids = teacher_ids.reshape(-1, k).long()
    log_q = torch.log_softmax(z / temperature, dim=-1)
    q = log_q.exp()
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    h_s = -torch.where(q > 0, q * log_q, zero).sum(-1)
    valid = ids >= 0
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    neg_inf = torch.full_like(q[:, :1].expand(ids.shape), -math.inf)
    log_u = torch.where(valid, teacher_log_values(teacher_values.reshape(-1, k), values).to(q.dtype), neg_inf)
    log_q_ev = torch.where(valid, log_q.gather(-1, safe), neg_inf)
    if mode in ("topk", "sampled"):
        f = 1.0 / temperature if values == "logits" else (teacher_temperature or temperature) / temperature
        x = log_u * f
        empty = (x == -math.inf).all(-1, keepdim=True)
        log_p = torch.where(empty, neg_inf, torch.log_softmax(torch.where(empty, torch.zeros_like(x), x), dim=-1))
    elif mode == "topk_tail":
        if teacher_tail is None:
            p_tail = (1 - log_u.exp().sum(-1)).clamp_min(0)
            p_tail = torch.where(p_tail <= 4 * k * torch.finfo(teacher_values.dtype).eps, zero, p_tail)
        else:
            p_tail = teacher_tail.reshape(-1).to(q.dtype).clamp_max(0).exp()
        in_k = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, safe, valid)
        q_tail = torch.where(in_k, zero, q).sum(-1)
        log_p = torch.cat([log_u, p_tail.log().unsqueeze(-1)], dim=-1)
        log_q_ev = torch.cat([log_q_ev, q_tail.log().unsqueeze(-1)], dim=-1)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    p = log_p.exp()
    has = valid & (log_u > -math.inf)
    top = torch.where(has, log_u, neg_inf).amax(-1, keepdim=True)
    none = torch.iinfo(torch.int64).max
    top_id = torch.where(has & (log_u == top), ids, none).amin(-1)
    out = {
        "teacher_entropy": -torch.where(p > 0, p * log_p, zero).sum(-1),
        "student_entropy": h_s,
        "top1_agree": (z.argmax(-1) == top_id).to(q.dtype),
        "kl": torch.where(p > 0, p * (log_p - log_q_ev), zero).sum(-1),
    }
    keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if labels is not None:
        keep = keep & (labels.reshape(-1) != ignore_index)
    if mask is not None:
        keep = keep & mask.reshape(-1).bool()
    return {name: torch.where(keep, x, zero) for name, x in out.items()}
