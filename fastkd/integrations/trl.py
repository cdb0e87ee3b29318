"""TRL drop-in: ``generalized_jsd_loss`` with the signature, defaults and values of TRL's
``GKDTrainer.generalized_jsd_loss`` (trl ≥ 0.9), computed by :func:`fastkd.distill_loss`.

TRL's function (GKD paper, Eq. 1), with s = student_logits / T, t = teacher_logits / T,
q = softmax(s), p = softmax(t), m = β p + (1−β) q, computes the per-vocabulary-element tensor

    jsd[..., v] = β p_v log(p_v / m_v) + (1−β) q_v log(q_v / m_v)      (0 < β < 1)
    jsd[..., v] = p_v log(p_v / q_v)   (β = 0, forward KL)       q_v log(q_v / p_v)   (β = 1, reverse KL)

keeps the tokens with ``labels != -100`` (``jsd[mask]`` → (M, V)), and reduces:

    num_items_in_batch given → jsd.sum() / num_items_in_batch   (whatever ``reduction`` is)
    "batchmean" → jsd.sum() / max(#kept tokens, 1) with labels, else jsd.sum() / max(jsd.size(0), 1)
                  (without labels that is the *batch size* B of a (B, T, V) input, as in TRL, and V
                  for a single 1-D (V,) distribution — TRL's convention, kept for equal values)
    "sum"       → jsd.sum()
    "mean"      → jsd.sum() / jsd.numel()  — TRL's mean is over tokens *and* vocabulary entries
    "none"      → jsd itself: (M, V) with labels, (..., V) without — one value per vocabulary entry

Every reduction but "none" only needs the per-token sum Σ_v jsd, which fastkd computes fused (loss and
gradient in one pass, no (N, V) fp32 temporaries). "none" is per element, so it falls back to the
plain formula above (:func:`_per_element`). The same fallback runs when the teacher logits require
grad (TRL would back-propagate into them; fastkd treats the teacher as a constant) or when the two
dtypes differ. Differences from TRL that remain: the result is fp32 (TRL returns the input dtype), and
``-inf`` logits give finite values where TRL's ``F.kl_div`` gives NaN.

Patch a trainer in one line (class-wide, or pass a subclass / instance)::

    import fastkd.integrations.trl as fkd_trl; fkd_trl.patch_gkd_trainer()
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fastkd.distill.op import distill_loss

__all__ = ["generalized_jsd_loss", "patch_gkd_trainer"]

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _per_element(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                 temperature: float) -> torch.Tensor:
    """The per-vocabulary-element generalized JSD (..., V) in the promoted dtype (plain formula)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)

    def kl_elem(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:  # x_v log(x_v / y_v)
        return torch.exp(log_x) * (log_x - log_y)

    if beta == 0:
        return kl_elem(log_p, log_q)
    if beta == 1:
        return kl_elem(log_q, log_p)
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    return beta * kl_elem(log_p, log_m) + (1 - beta) * kl_elem(log_q, log_m)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized JSD loss for distillation, same contract as TRL's ``GKDTrainer.generalized_jsd_loss``.

    Args:
        student_logits: (B, T, V) (or any (..., V)) float logits; receives the gradient.
        teacher_logits: same shape; a constant (a teacher that requires grad uses the unfused formula).
        labels: (B, T) int, -100 marks tokens to drop; None keeps every token.
        beta: mixture weight in [0, 1]; 0 is forward KL(p‖q), 1 is reverse KL(q‖p).
        temperature: both logits are divided by it.
        reduction: "batchmean" (default), "sum", "mean" (over tokens × vocabulary) or "none" (per element).
        num_items_in_batch: when given, returns jsd.sum() / num_items_in_batch (gradient accumulation).

    Returns:
        fp32 scalar; for "none", the per-element (M, V) tensor (kept tokens only) or (..., V).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    unfused = (reduction == "none" and num_items_in_batch is None) or teacher_logits.requires_grad \
        or student_logits.dtype != teacher_logits.dtype
    if unfused:
        jsd = _per_element(student_logits, teacher_logits, beta, temperature)
        if labels is not None:
            jsd = jsd[labels != -100]
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(jsd.device)
            return jsd.sum() / num_items_in_batch
        if reduction == "batchmean":
            denom = (labels != -100).sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
            return jsd.sum() / denom
        if reduction == "sum":
            return jsd.sum()
        if reduction == "mean":
            return jsd.mean()
        return jsd

    kw: dict[str, Any] = dict(beta=beta, temperature=temperature, labels=labels)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(student_logits.device)
        kw["num_items_in_batch"] = num_items_in_batch
        return distill_loss(student_logits, teacher_logits, "jsd", **kw)
    if reduction == "batchmean" and labels is not None:
        return distill_loss(student_logits, teacher_logits, "jsd", reduction="mean", **kw)
    total = distill_loss(student_logits, teacher_logits, "jsd", reduction="sum", **kw)
    if reduction == "sum":
        return total
    if reduction == "batchmean":  # no labels: TRL divides by jsd.size(0), the leading dimension — the batch
        return total / max(student_logits.size(0), 1)  # of (B, T, V), the vocabulary V of a 1-D (V,) input
    # "mean": TRL averages over every kept element, tokens × vocabulary
    vocab = student_logits.shape[-1]
    count = student_logits.numel() if labels is None else (labels != -100).sum() * vocab
    return total / count  # nothing kept → 0/0 = NaN, like torch.mean of an empty tensor


def patch_gkd_trainer(trainer: Any = None) -> Any:
    """Make TRL's GKDTrainer (or the given subclass / instance) use :func:`generalized_jsd_loss`.

    ``patch_gkd_trainer()`` patches ``trl.experimental.gkd.GKDTrainer`` (or ``trl.GKDTrainer`` in older
    TRL) class-wide and returns it. Equivalent one-liner:
    ``GKDTrainer.generalized_jsd_loss = staticmethod(fastkd.integrations.trl.generalized_jsd_loss)``.
    """
    if trainer is None:
        try:
            from trl.experimental.gkd import GKDTrainer as trainer
        except ImportError:
            from trl import GKDTrainer as trainer
    if isinstance(trainer, type):
        trainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    else:
        trainer.generalized_jsd_loss = generalized_jsd_loss  # instance attribute: no self is bound
    return trainer
