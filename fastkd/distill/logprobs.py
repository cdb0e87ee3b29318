"""``distill_loss(..., inputs="logprobs")``: Liger's log-probability calling convention on fastkd's logits losses.

Liger's ``LigerJSD`` / ``LigerKLDIVLoss(log_target=True)`` (and ``torch.nn.functional.kl_div(log_target=True)``)
take normalised log-probabilities x = log q (student) and y = log p (teacher) and differentiate their formula
with respect to x *as independent entries*:

    fkl  Σ_v p_v (y_v − x_v)                          ∂/∂x_v = −p_v
    rkl  Σ_v q_v (x_v − y_v)                          ∂/∂x_v = q_v (x_v − y_v) + q_v
    jsd  β Σ p (y − log m) + (1−β) Σ q (x − log m)    ∂/∂x_v = (1−β) q_v (x_v − log m_v),  m = β p + (1−β) q

On normalised inputs the values equal fastkd's logits losses (log_softmax(x) = x). The gradients differ from the
logits convention's g (which is orthogonal to the all-ones vector) by q_v · s per token, s = Σ_v ∂/∂x_v of the
formula: fkl s = −Σ p, rkl s = rkl + Σ q, jsd s = (1−β) KL(q‖m), and KL(q‖m) is fastkd's ``srkl`` with
α = 1 − β. So the loss is fastkd's own (fused, any backend) plus :class:`_ShiftGrad`, a term of value 0 whose
gradient adds w_t · s_t · q_v (one (N, V) elementwise pass in backward, one no-grad fastkd pass for s when
the divergence is rkl / jsd).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastkd.core import checks as C

LOGPROB_DIVERGENCES = ("fkl", "rkl", "jsd")


class _ShiftGrad(torch.autograd.Function):
    """Value 0 (scalar, or (N,) rows for reduction="none"); gradient ``exp(x) · coef`` per token."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coef: torch.Tensor, rows: bool):
        ctx.save_for_backward(x, coef)
        ctx.rows = rows
        n = coef.numel()
        return coef.new_zeros(n) if rows else coef.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        x, coef = ctx.saved_tensors
        c = coef * (grad_out.reshape(-1) if ctx.rows else grad_out)
        g = torch.exp(x.reshape(coef.numel(), -1).to(coef.dtype)) * c.unsqueeze(-1)
        return g.to(x.dtype).view(x.shape), None, None


def logprob_distill_loss(loss_fn: Callable[..., Any], student: torch.Tensor, teacher: torch.Tensor, divergence: str,
                         kw: dict[str, Any]) -> Any:
    """``loss_fn`` (:func:`fastkd.distill_loss` on logits) with Liger's log-probability gradient convention.

    ``kw``: the keywords of that call. Supported: divergence fkl / rkl / jsd (any beta), temperature 1 (log-probs
    are already a distribution), labels / mask / reductions / num_items_in_batch / vocab_size / backend /
    return_stats; ValueError naming the argument otherwise.
    """
    if divergence not in LOGPROB_DIVERGENCES:
        raise ValueError(f"inputs='logprobs' supports divergence in {LOGPROB_DIVERGENCES} (Liger's log-prob "
                         f"losses), got {divergence!r}")
    if kw.get("temperature", 1.0) != 1.0:
        raise ValueError("inputs='logprobs' needs temperature=1.0: the inputs are already log-probabilities")
    for name in ("ce_weight", "teacher_weights", "inplace_grad"):
        if kw.get(name):
            raise ValueError(f"inputs='logprobs' does not support {name}")
    beta = kw.get("beta")
    beta = 0.5 if beta is None else float(beta)
    eff = divergence if divergence != "jsd" else ("fkl" if beta == 0.0 else "rkl" if beta == 1.0 else "jsd")
    out = loss_fn(student, teacher, divergence, **kw)
    if not student.requires_grad:
        return out
    vocab = C.resolve_vocab(student.shape[-1], teacher.shape[-1], kw.get("vocab_size"))
    x, y = student[..., :vocab], teacher[..., :vocab]
    lead = tuple(student.shape[:-1])
    cdt = torch.float64 if student.dtype == torch.float64 else torch.float32
    weight, _ = C.token_weights(lead, student.device, labels=kw.get("labels"),
                                ignore_index=kw.get("ignore_index", -100), mask=kw.get("mask"),
                                reduction=kw.get("reduction", "mean"),
                                num_items_in_batch=kw.get("num_items_in_batch"), dtype=cdt)
    rows_kw = {k: kw[k] for k in ("labels", "ignore_index", "mask", "backend") if k in kw}
    with torch.no_grad():
        xd = x.detach()
        if eff == "fkl":
            s = -torch.exp(y.to(cdt)).sum(-1)
        elif eff == "rkl":
            s = loss_fn(xd, y, "rkl", reduction="none", **rows_kw).to(cdt) + torch.exp(xd.to(cdt)).sum(-1)
        else:
            s = (1 - beta) * loss_fn(xd, y, "srkl", alpha=1 - beta, reduction="none", **rows_kw).to(cdt)
    coef = s.reshape(-1) * weight
    coef_x = x  # padding columns beyond vocab_size get no extra gradient
    rows = kw.get("reduction", "mean") == "none"
    if kw.get("return_stats"):
        loss, stats = out
        return loss + _ShiftGrad.apply(coef_x, coef, rows).view(loss.shape).to(loss.dtype), stats
    return out + _ShiftGrad.apply(coef_x, coef, rows).view(out.shape).to(out.dtype)
