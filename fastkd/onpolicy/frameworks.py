"""Framework top-k semantics for ``fused_linear_sparse_distill_loss(semantics=...)``, fused through the LM head.

Each framework's per-token loss is a function of the student's log-probs at the teacher's K ids
(``lq_k = log_softmax(softcap(h W.T + b) / T)[ids_k]``) and the teacher's log-probs there (``lp_k``); padding slots
(id −1) are absent. The loss runs on (chunk, K) tensors under autograd inside the engine's chunk loop
(:class:`fastkd.onpolicy.op.IdsLossChunk`), so the gradient of the (chunk, V) logits comes from the row formula of
:mod:`fastkd.onpolicy.op` and nothing (N, V) is ever made. P = Σ_k exp(lp_k), Q = Σ_k exp(lq_k) are the teacher's
and the student's top-k masses (returned with ``return_mass=True``).

``"verl_topk"`` — verl's ``compute_forward_kl_topk``: with ``log_prob_min_clamp`` c (verl's config default −10.0;
    here None unless given) both sides' log-probs are clamped below at c (the student's clamped slots get no
    gradient), then loss = max(0, Σ_k e^{lp_k}(lp_k − lq_k)) (verl clamps the truncated sum at 0, losing the
    gradient of tokens where Q > P). Forward KL only (``divergence="fkl"``).
``"verl_topk_tail"`` — the tail-aware variant (verl PR 7855, ``forward_kl_topk_tail``): the exact KL between the
    (K + 1)-category coarse-grainings, Σ_k e^{lp_k}(lp_k − lq_k) + p_t(log p_t − log q_t) with
    p_t = clip(1 − P, 0, 1) and q_t = clip(1 − Q, ``tail_mass_eps``, 1) (only the student tail is floored; a zero
    teacher tail adds 0). No per-entry clamp (verl refuses ``log_prob_min_clamp`` with it, as here).
``"trl_tail"`` — TRL's async / server distillation top-k + tail bucket: both sides get a (K + 1)-th bucket
    log(1 − exp(min(logsumexp(slots), −1e-7))), then TRL's generalized JSD over the K + 1 buckets with β from
    ``divergence``: "fkl" → β = 0 (Σ p(log p − log q)), "rkl" → β = 1 (Σ q(log q − log p)), "jsd" → ``beta``
    (β·KL(p‖m) + (1 − β)·KL(q‖m), m = (1 − β)q + βp, log m floored at the dtype's tiny); a bucket term that is NaN
    (0·(−inf)) counts 0, as TRL's nan_to_num does. (TRL narrows the ids to top-1 + the sampled token for β ≠ 0
    itself; pass those ids.) Unlike TRL, a NaN in the inputs gives a NaN loss rather than 0.

Tokens whose slots are all padding contribute 0 in every semantics.
"""

from __future__ import annotations

import math

import torch

from fastkd.core import checks as C
from fastkd.core.lmhead import FusedHeadFunction, HeadOptions
from fastkd.onpolicy import op as O

SEMANTICS = ("fastkd", "verl_topk", "verl_topk_tail", "trl_tail")
TRL_TAIL_CLAMP = -1e-7  # TRL clamps the log of the slots' total mass to at most this before log(1 − e^x)


def _masses(lq, lp, valid):
    q = torch.where(valid, lq.exp(), 0.0).sum(-1)
    p = torch.where(valid, lp.exp(), 0.0).sum(-1)
    return q, p


def _fkl_terms(lq, lp, valid):
    p = lp.exp()
    return torch.where(valid & (p != 0), p * (lp - lq), 0.0).sum(-1)


def verl_topk(lq, lp, valid, clamp: float | None):
    q_mass, p_mass = _masses(lq, lp, valid)
    if clamp is not None:
        lq, lp = lq.clamp_min(clamp), lp.clamp_min(clamp)
    loss = _fkl_terms(lq, lp, valid).clamp_min(0.0)
    return loss, {"student_mass": q_mass, "teacher_mass": p_mass}


def verl_topk_tail(lq, lp, valid, eps: float):
    q_mass, p_mass = _masses(lq, lp, valid)
    pt = (1.0 - p_mass).clamp(0.0, 1.0)
    qt = (1.0 - q_mass).clamp(eps, 1.0)
    tail = pt * (torch.log(pt.clamp_min(torch.finfo(pt.dtype).tiny)) - torch.log(qt))
    return _fkl_terms(lq, lp, valid) + tail, {"student_mass": q_mass, "teacher_mass": p_mass}


def _trl_tail_bucket(x):
    s = torch.logsumexp(x, dim=-1, keepdim=True).clamp_max(TRL_TAIL_CLAMP)
    return torch.cat([x, torch.log(-torch.expm1(s))], dim=-1)


def trl_tail(lq, lp, valid, beta: float):
    q_mass, p_mass = _masses(lq, lp, valid)
    ninf = torch.tensor(-math.inf, dtype=lq.dtype, device=lq.device)
    s = _trl_tail_bucket(torch.where(valid, lq, ninf))
    t = _trl_tail_bucket(torch.where(valid, lp, ninf))
    m = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)
    zero = torch.zeros((), dtype=lq.dtype, device=lq.device)
    ss, st = torch.where(m, s, zero), torch.where(m, t, zero)
    ps, pt = torch.where(m, s.exp(), zero), torch.where(m, t.exp(), zero)
    if beta == 0.0:
        d = torch.nan_to_num(pt * (st - ss), nan=0.0)
    elif beta == 1.0:
        d = torch.nan_to_num(ps * (ss - st), nan=0.0)
    else:
        mix = (1.0 - beta) * ps + beta * pt
        sm = torch.where(m, torch.log(mix.clamp_min(torch.finfo(mix.dtype).tiny)), zero)
        d = beta * torch.nan_to_num(pt * (st - sm), nan=0.0) + (1.0 - beta) * torch.nan_to_num(ps * (ss - sm), nan=0.0)
    bad = (valid & (lq.isnan() | lp.isnan())).any(-1)
    loss = torch.where(bad, math.nan, d.sum(-1))
    return loss, {"student_mass": q_mass, "teacher_mass": p_mass}


def check_semantics(semantics: str, divergence: str, values: str, mode: str, log_prob_min_clamp, tail_mass_eps,
                    **unsupported) -> None:
    C.check_choice("semantics", semantics, SEMANTICS)
    if semantics == "fastkd":
        if log_prob_min_clamp is not None:
            raise ValueError("log_prob_min_clamp belongs to semantics='verl_topk'")
        return
    if values != "logprobs":
        raise ValueError(f"semantics={semantics!r} takes the teacher's top-k log-probs: values must be 'logprobs', "
                         f"got {values!r}")
    if mode != "topk":
        raise ValueError(f"semantics={semantics!r} defines its own treatment of the tail; leave mode='topk', "
                         f"got mode={mode!r}")
    for name, value in unsupported.items():
        if value not in (None, False) and not (name == "logit_scale" and value == 1.0):
            raise ValueError(f"{name} is not used by semantics={semantics!r}")
    if semantics.startswith("verl") and divergence != "fkl":
        raise ValueError(f"semantics={semantics!r} is verl's forward KL; divergence must be 'fkl', got {divergence!r}")
    if semantics != "verl_topk" and log_prob_min_clamp is not None:
        raise ValueError(f"log_prob_min_clamp is verl_topk's per-entry clamp; semantics={semantics!r} requires "
                         "log_prob_min_clamp=None (it would break the (K + 1)-bucket distributions)")
    if log_prob_min_clamp is not None:
        C.check_range("log_prob_min_clamp", log_prob_min_clamp, -math.inf, 0.0)
    if not (isinstance(tail_mass_eps, (int, float)) and not isinstance(tail_mass_eps, bool)
            and 0.0 < tail_mass_eps < 1.0):
        raise ValueError(f"tail_mass_eps must be in (0, 1), got {tail_mass_eps!r}")


def fused_semantics_loss(student_hidden, student_weight, ids2, t_logp, tok_weight, lead, *, semantics, student_bias,
                         softcap, rows, divergence, beta, temperature, log_prob_min_clamp, tail_mass_eps, reduction,
                         return_mass, amp=None, backend="torch"):
    """The loss of one framework semantics (checked, token weights and per-slot teacher log-probs prepared by
    ``fused_linear_sparse_distill_loss``): ids2 (N, K) with −1 padding, t_logp (N, K) (−inf at padding)."""
    vocab = student_weight.shape[0]
    sid, valid = O.safe_ids(ids2, vocab)
    kept = tok_weight != 0
    valid = valid & kept[:, None]
    lp = torch.where(valid, t_logp, -math.inf)
    if semantics == "verl_topk":
        row_fn, arg = verl_topk, log_prob_min_clamp
    elif semantics == "verl_topk_tail":
        row_fn, arg = verl_topk_tail, float(tail_mass_eps)
    else:
        row_fn = trl_tail
        arg = {"fkl": 0.0, "rkl": 1.0}.get(divergence, float(beta))

    def fn(lq, lp_rows, valid_rows):
        return row_fn(lq, lp_rows, valid_rows, arg)

    n = ids2.shape[0]
    out = None
    if return_mass:
        out = {k: torch.zeros(n, dtype=t_logp.dtype, device=t_logp.device) for k in ("student_mass", "teacher_mass")}
    chunk = O.IdsLossChunk(fn, float(temperature), out=out, backend=backend)
    h = student_hidden.reshape(n, student_hidden.shape[-1])
    cap = None if softcap is None else float(softcap)
    head = cap if amp is None else HeadOptions(softcap=cap, dtype=amp)
    loss = FusedHeadFunction.apply(h, student_weight, student_bias, tok_weight, chunk, rows, reduction, head, sid,
                                   valid, lp, valid)
    chunk.out = None
    if reduction == "none":
        loss = torch.where(kept, loss.reshape(n), 0.0).view(lead)
    if not return_mass:
        return loss
    return loss, {k: v.view(lead) for k, v in out.items()}


def fused_linear_framework_loss(student_hidden, student_weight, teacher_ids, teacher_values, *, semantics,
                                log_prob_min_clamp, tail_mass_eps, return_mass, student_bias, softcap, chunk_size,
                                values, mode, divergence, temperature, beta, labels, ignore_index, mask, reduction,
                                num_items_in_batch, **unsupported):
    """``fused_linear_sparse_distill_loss(semantics=...)`` for the framework semantics (its arguments)."""
    from fastkd.sparse import op as S

    if semantics == "fastkd":
        raise ValueError("return_mass / log_prob_min_clamp need a framework semantics ('verl_topk', "
                         "'verl_topk_tail' or 'trl_tail')")
    backend = unsupported.pop("backend", "auto")  # the row math's: op "onpolicy_rows" (fastkd.onpolicy.op)
    check_semantics(semantics, divergence, values, mode, log_prob_min_clamp, tail_mass_eps, **unsupported)
    amp = O.check_head(student_hidden, student_weight, student_bias)
    params = S._make_params("topk_tail", divergence, values, temperature, None, False, beta, chunk_size, softcap)
    lead = tuple(student_hidden.shape[:-1])
    cdt = O.compute_dtype(student_hidden.dtype)
    # topk_tail keeps the teacher's raw log-probs per slot (no renormalisation) and checks Σ p ≤ 1
    tok_weight, ids2, t_logp, _ = S._prepare(lead, student_weight.shape[0], student_hidden.device, teacher_ids,
                                             teacher_values, values, params, None, labels, ignore_index, mask,
                                             reduction, num_items_in_batch, cdt)
    zdt = amp or student_weight.dtype
    rb = O.rows_backend(backend, student_hidden, zdt, O.LOCAL)
    rows = O.chunk_rows(chunk_size, tok_weight.numel(), student_weight.shape[0], student_hidden.device, rb, zdt,
                        softcap, student_hidden.is_cuda)
    return fused_semantics_loss(student_hidden, student_weight, ids2, t_logp, tok_weight, lead, semantics=semantics,
                                student_bias=student_bias, softcap=softcap, rows=rows, divergence=divergence,
                                beta=beta, temperature=temperature, log_prob_min_clamp=log_prob_min_clamp,
                                tail_mass_eps=tail_mass_eps, reduction=reduction, return_mass=return_mass,
                                amp=amp, backend=rb)
