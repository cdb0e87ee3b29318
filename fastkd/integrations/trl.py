"""TRL drop-ins: fastkd's fused losses behind TRL's own loss functions, swapped in with one line.

* :func:`chunked_divergence_loss` — the signature and ``(loss, entropy_sum, n_valid)`` contract of
  ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (TRL ≥ 1.x ``DistillationTrainer``), computed by
  :func:`fastkd.fused_linear_distill_loss`: hidden states and both LM heads in, per side ``logit =
  softcap(scale·(h W.T + b)) / T`` (scale, then softcap, then temperature), generalized JSD by ``beta`` with
  m = β p_teacher + (1−β) p_student (0: forward KL, 1: reverse KL), tokens where ``completion_mask != 0``,
  ``loss = Σ / max(n_valid, 1)`` or ``Σ / num_items_in_batch``; ``entropy_sum`` = Σ over valid tokens of the
  student's entropy at T (fastkd's ``student_entropy`` statistic); ``n_valid`` = the valid-token count (int64).
  ``divergence=`` picks any fastkd divergence instead (``beta`` then only goes to divergences that take one).
* :func:`chunked_jsd_loss` — the signature and 5-tuple contract of the async trainer's
  ``trl.experimental.async_distillation.async_distillation_trainer._chunked_jsd_loss`` (a teacher's top-k
  log-probs from a server), computed by :func:`fastkd.fused_linear_sparse_distill_loss` in ``mode="topk_tail"``
  (``add_tail_bucket=True``) or ``"topk"`` (False).
* :func:`server_loss` (with :func:`server_top1_loss` / :func:`server_topk_loss`) — the losses of
  ``trl.experimental.server_distillation.ServerDistillationTrainer`` (a vLLM server's top-k log-probs; top-1 plus
  the sampled token for β > 0, top-k forward KL for β = 0, with or without TRL's tail bucket) from hidden states and
  the LM head instead of the student's (B, T, V) log-probs: TRL's values, through
  :func:`fastkd.fused_linear_sparse_distill_loss` (``semantics="trl_tail"``, or ``mode="topk"``) and, for the
  renormalised β = 0 forward KL that no fastkd mode computes, :func:`fastkd.logprobs_from_hidden` at the ids.
  :func:`server_compute_loss` is the trainer's ``compute_loss`` on the student's final hidden states.
* :func:`patch_distillation_trainer` / :func:`patch_async_distillation_trainer` replace those module functions
  (so every trainer of the module uses fastkd), :func:`patch_server_distillation_trainer` the server trainer's
  ``compute_loss``, optionally with fastkd's other statistics logged next to TRL's ``entropy``;
  :func:`unpatch` restores TRL's.
* :func:`generalized_jsd_loss` / :func:`patch_gkd_trainer` — the experimental ``GKDTrainer`` (logits in), below.

``GKDTrainer.generalized_jsd_loss`` (trl ≥ 0.9), the GKD paper's Eq. 1, with s = student_logits / T,
t = teacher_logits / T, q = softmax(s), p = softmax(t), m = β p + (1−β) q, computes the per-vocabulary-element
tensor

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

Patch a trainer in one line::

    import fastkd.integrations.trl as fkd_trl; fkd_trl.patch_distillation_trainer()   # trl.DistillationTrainer
    fkd_trl.patch_async_distillation_trainer()                                           # async, top-k teacher
    fkd_trl.patch_server_distillation_trainer()                                          # vLLM-server teacher
    fkd_trl.patch_gkd_trainer()                                                          # experimental GKD

Sharded heads: an FSDP2 / DTensor ``lm_head.weight`` goes through :func:`_sharded_head`, the one place where a
DTensor head leaves this module: on to the fused entry points, which resolve it in :mod:`fastkd.core.sharding`.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastkd.core import checks as C
from fastkd.core.docs import Keyword, shared_keywords
from fastkd.distill.fused import fused_linear_distill_loss
from fastkd.distill.op import distill_loss
from fastkd.sparse.op import fused_linear_sparse_distill_loss

__all__ = ["chunked_divergence_loss", "chunked_jsd_loss", "generalized_jsd_loss", "patch_async_distillation_trainer",
           "patch_distillation_trainer", "patch_gkd_trainer", "patch_server_distillation_trainer",
           "server_compute_loss", "server_loss", "server_top1_loss", "server_topk_loss", "unpatch"]

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


# ---- TRL >= 1.x DistillationTrainer (hidden states + both LM heads) ---------------------------------------------


def _sharded_head(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The single hand-off of a DTensor (FSDP2 / tensor-parallel) LM head. With :mod:`fastkd.core.sharding`
    present the head goes on unchanged: the fused entry points resolve DTensor heads there
    (``resolve_heads``: FSDP2 gather with an averaging reduce-scatter, or the vocabulary-parallel engine for a
    tensor-parallel shard). Without it, gathered once per call with ``full_tensor()``, as TRL does."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return weight, bias
    if not isinstance(weight, DTensor):
        return weight, bias
    try:
        import fastkd.core.sharding  # noqa: F401
    except ImportError:
        return weight.full_tensor(), bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def _cast_for(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, teacher: bool):
    """Outside autocast fastkd's heads need one dtype; TRL casts the weight to the hidden states' dtype. The
    teacher (a constant) is cast the same way; a student head in another dtype than its low-precision hidden
    states runs under autocast in that dtype instead, so its fp32 weight gradient accumulates in fp32."""
    if weight.dtype == hidden.dtype or torch.is_autocast_enabled(hidden.device.type):
        return weight, bias, None
    if teacher or hidden.dtype not in (torch.bfloat16, torch.float16):
        return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype), None
    return weight, bias, hidden.dtype


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    divergence: str = "jsd",
    return_stats: bool = False,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """TRL's ``_chunked_divergence_loss`` (same positional signature, defaults and return) on fastkd's fused head.

    Args (TRL's): student / teacher hidden states (B, K, H_s) / (B, K, H_t); LM-head weights (V, H) (plain or
        DTensor) and biases (V,) | None; ``completion_mask`` (B, K), nonzero = in the loss; ``beta`` the generalized
        JSD weight (0 forward KL, 1 reverse KL); ``num_items_in_batch`` (global valid-token count) or None (mean over
        the local valid tokens); per-side ``logit_scale`` and ``final_logit_softcapping``; ``temperature``.
    fastkd's own (keywords): ``divergence`` (any fastkd divergence; TRL's ``beta`` is passed only to "jsd", other
        hyperparameters come in ``kw``), ``return_stats`` (also return the (B·K,) statistics dict of
        :func:`fastkd.fused_linear_distill_loss`), and any other keyword of that function (``backend``,
        ``chunk_size``, ``alpha``, ``scale_by_t2``, ``ce_weight`` needs ``labels``, ...).

    Returns:
        ``(loss fp32 scalar, entropy_sum fp32, n_valid int64)`` — ``entropy_sum`` has no gradient; with
        ``return_stats`` a 4th item, the statistics dict (0 on masked tokens).
    """
    s_w, s_b = _sharded_head(student_lm_head_weight, student_lm_head_bias)
    t_w, t_b = _sharded_head(teacher_lm_head_weight, teacher_lm_head_bias)
    # the teacher gets no gradient (as in TRL, whose function returns none for it)
    t_w, t_b = t_w.detach(), None if t_b is None else t_b.detach()
    if not isinstance(completion_mask, torch.Tensor):
        raise TypeError(f"completion_mask must be a torch.Tensor, got {type(completion_mask).__name__}")
    valid = completion_mask.to(student_hidden_states.device) != 0
    n_valid = valid.sum()
    t_w, t_b, _ = _cast_for(teacher_hidden_states, t_w, t_b, teacher=True)
    s_w, s_b, amp = _cast_for(student_hidden_states, s_w, s_b, teacher=False)
    t_h = teacher_hidden_states.detach()
    if t_h.dtype != student_hidden_states.dtype and not torch.is_autocast_enabled(t_h.device.type) and amp is None:
        t_h, t_w = t_h.to(student_hidden_states.dtype), t_w.to(student_hidden_states.dtype)
        t_b = None if t_b is None else t_b.to(student_hidden_states.dtype)
    opts = dict(kw)
    if divergence == "jsd":
        opts.setdefault("beta", float(beta))
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(student_hidden_states.device)
    ctx = torch.autocast(student_hidden_states.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        loss, stats = fused_linear_distill_loss(
            student_hidden_states, s_w, t_h, t_w, student_bias=s_b, teacher_bias=t_b, divergence=divergence,
            mask=valid, reduction="mean", num_items_in_batch=num_items_in_batch, temperature=temperature,
            softcap=(student_final_logit_softcapping, teacher_final_logit_softcapping),
            logit_scale=(student_logit_scale, teacher_logit_scale), return_stats=True, **opts)
    entropy_sum = stats["student_entropy"].sum()
    return (loss, entropy_sum, n_valid, stats) if return_stats else (loss, entropy_sum, n_valid)


# ---- the async (server top-k teacher) trainer ------------------------------------------------------------------


def chunked_jsd_loss(
    hidden_valid: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    logit_scale: float,
    final_logit_softcapping: float | None,
    target_ids: torch.Tensor,
    teacher_target_logps: torch.Tensor,
    valid_candidate_mask: torch.Tensor,
    beta: float,
    temperature: float,
    add_tail_bucket: bool,
    teacher_id_idx: torch.Tensor | None,
    num_teachers: int,
    chunk_size: int,
    *,
    divergence: str | None = None,
    mode: str | None = None,
    return_stats: bool = False,
    **kw: Any,
):
    """TRL's async ``_chunked_jsd_loss`` (same positional signature and 5-tuple) on
    :func:`fastkd.fused_linear_sparse_distill_loss`: the student's full-vocabulary log-probs at the teacher's
    candidate ids (``valid_candidate_mask`` False → a padding slot), teacher log-probs as given.

    ``add_tail_bucket=True`` → ``mode="topk_tail"`` (K + 1 events: the ids and the rest of the mass, on both
    sides); False → ``mode="topk"`` (both sides renormalised over the ids; there fastkd's forward KL keeps the
    student's full-vocabulary normaliser, so TRL's ``beta == 0`` without a tail bucket is not a fastkd mode and
    is handed back to TRL's own function unless ``divergence`` is given). ``chunk_size`` is TRL's; fastkd sizes
    its chunks itself (``kw["chunk_size"]`` overrides). TRL's tail clamps the mass on the ids below 1 − 1e-7;
    fastkd's tail is exact (an empty tail is 0), which changes values only where the ids hold all the mass.

    Returns ``(loss_sum, jsd_sum, entropy_sum, teacher_entropy_sum, per_teacher_stats (3·num_teachers,))``;
    with ``return_stats`` a 6th item, the statistics dict of the sparse loss.
    """
    mode = mode or ("topk_tail" if add_tail_bucket else "topk")
    if divergence is None:
        if mode == "topk" and float(beta) == 0.0:
            out = _original("async")(hidden_valid, lm_head_weight, lm_head_bias, logit_scale, final_logit_softcapping,
                                     target_ids, teacher_target_logps, valid_candidate_mask, beta, temperature,
                                     add_tail_bucket, teacher_id_idx, num_teachers, chunk_size)
            return (*out, None) if return_stats else out
        divergence = "jsd"
    w, b = _sharded_head(lm_head_weight, lm_head_bias)
    w, b, amp = _cast_for(hidden_valid, w, b, teacher=False)
    ids = torch.where(valid_candidate_mask, target_ids, torch.full_like(target_ids, -1))
    values = torch.where(valid_candidate_mask, teacher_target_logps, torch.zeros_like(teacher_target_logps))
    opts = dict(kw)
    if divergence == "jsd":
        opts.setdefault("beta", float(beta))
    per_token = teacher_id_idx is not None
    ctx = torch.autocast(hidden_valid.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        loss, stats = fused_linear_sparse_distill_loss(
            hidden_valid, w, ids, values.float(), student_bias=b, softcap=final_logit_softcapping,
            logit_scale=float(logit_scale), values="logprobs", mode=mode, divergence=divergence,
            temperature=temperature, reduction="none" if per_token else "sum", return_stats=True, **opts)
    rows = loss.detach() if per_token else None
    loss = loss.sum() if per_token else loss
    jsd_sum = loss.detach()
    entropy_sum, teacher_entropy_sum = stats["student_entropy"].sum(), stats["teacher_entropy"].sum()
    per_teacher = jsd_sum.new_zeros(3 * num_teachers)
    if per_token:
        parts = []
        for idx in range(num_teachers):
            sel = teacher_id_idx == idx
            parts += [sel.sum().float(), rows[sel].sum(), stats["teacher_entropy"][sel].sum()]
        per_teacher = torch.stack(parts)
    out = (loss, jsd_sum, entropy_sum, teacher_entropy_sum, per_teacher)
    return (*out, stats) if return_stats else out


# ---- the server-teacher trainer (the teacher's top-k log-probs from a vLLM server) ------------------------------


def _fold_scale(logit_scale: float, softcap: float | None, temperature: float) -> tuple[float | None, float]:
    """``softcap(s·z, c) / T == softcap(z, c/s) / (T/s)`` for s > 0: a logit scale folded into the softcap and the
    temperature, for the entry points that take no scale (the framework semantics, :func:`logprobs_from_hidden`)."""
    s = float(logit_scale)
    return (None if softcap is None else float(softcap) / s), float(temperature) / s


def _full_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plain tensors for :func:`logprobs_from_hidden` (which takes no DTensors) from a sharded head, through the
    same hand-off as the fused entry points (:func:`fastkd.core.sharding.resolve_heads`): an FSDP2 head gathered
    with an averaging gradient placement, a tensor-parallel shard gathered with each rank keeping its slice."""
    from fastkd.core.sharding import resolve_heads

    heads = resolve_heads(hidden, weight, bias, vocab_parallel=False)
    return heads.student_hidden, heads.student_weight, heads.student_bias


def _renormalised_fkl(hidden, weight, bias, ids, t_logp, tok_mask, softcap, temperature, num_items_in_batch):
    """Σ_k p̃_k (log p̃_k − log q̃_k) with both sides renormalised over each token's valid ids (id −1: padding) —
    not a fastkd sparse mode (fastkd's top-k forward KL keeps the student's full-vocabulary normaliser), so it is
    computed from the student's log-probs at the ids (:func:`fastkd.logprobs_from_hidden`, O(N·K) after the head);
    mean over ``tok_mask`` (or ÷ ``num_items_in_batch``)."""
    from fastkd.onpolicy.op import logprobs_from_hidden

    valid = ids >= 0
    hidden, weight, bias = _full_head(hidden, weight, bias)
    lq = logprobs_from_hidden(hidden, weight, ids.clamp_min(0), bias=bias, temperature=temperature, softcap=softcap)
    some = valid.any(-1, keepdim=True)  # a token without a valid slot contributes 0 (and no NaN gradient)
    lq = torch.log_softmax(torch.where(some, torch.where(valid, lq, -math.inf), 0.0), dim=-1)
    lp = torch.log_softmax(torch.where(some, torch.where(valid, t_logp.to(lq.dtype), -math.inf), 0.0), dim=-1)
    per_token = torch.where(valid, lp.exp() * (lp - lq), 0.0).sum(-1)
    total = torch.where(tok_mask, per_token, 0.0).sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / tok_mask.sum().clamp_min(1)


# The keywords the server-teacher losses share (TRL's names), declared once: server_loss, server_top1_loss and
# server_topk_loss take them through shared_keywords; other keywords go on to fastkd's sparse loss.
SERVER_KEYWORDS: dict[str, Keyword] = {k.name: k for k in (
    Keyword("temperature", 1.0, "float"),
    Keyword("add_tail_bucket", True, "bool"),
    Keyword("num_items_in_batch", None, "torch.Tensor | int | None"),
    Keyword("logit_scale", 1.0, "float"),
    Keyword("final_logit_softcapping", None, "float | None"),
    Keyword("divergence", None, "str | None"),
    Keyword("mode", None, "str | None"),
)}
_SERVER_DOC = """Keywords (TRL's names): ``temperature``; ``add_tail_bucket`` (one bucket for the mass outside the
    ids on both sides, else both renormalised over them); ``num_items_in_batch`` (÷ it instead of the kept count);
    ``logit_scale`` and ``final_logit_softcapping`` (the student's ``softcap(logit_scale·(h W.T + b))``);
    ``divergence`` / ``mode`` (and any other keyword): fastkd's own sparse loss instead of TRL's
    (:func:`_server_sparse_loss`)."""


def _server_keywords(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__doc__ = (fn.__doc__ or "").replace("{server}", _SERVER_DOC)
    return shared_keywords(*SERVER_KEYWORDS, keywords=SERVER_KEYWORDS, pass_through=True)(fn)


def _server_sparse_loss(hidden, weight, bias, ids, t_logp, tok_mask, beta, options):
    """The loss of one server-teacher call on ids (..., K) (−1 = padding) with the teacher's log-probs there;
    ``options``: the :data:`SERVER_KEYWORDS` and keywords for fastkd's sparse loss.

    ``divergence`` and ``mode`` None: TRL's own loss — with the tail bucket, fastkd's ``semantics="trl_tail"``
    (TRL's clamped tail on both sides, generalized JSD by β); without it, both sides renormalised over the ids:
    fastkd's ``mode="topk"`` JSD for β > 0, :func:`_renormalised_fkl` for β = 0. Either given: fastkd's
    sparse loss with that divergence / mode (default divergence "jsd" with TRL's β, default mode "topk_tail"
    with a tail bucket, else "topk") on the same ids."""
    kw = dict(options)
    temperature, add_tail_bucket, num_items_in_batch, logit_scale, softcap, divergence, mode = (
        kw.pop(k) for k in SERVER_KEYWORDS)
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    weight, bias = _sharded_head(weight, bias)
    weight, bias, amp = _cast_for(hidden, weight, bias, teacher=False)
    ids = torch.where(tok_mask[..., None], ids, -1)  # tokens out of the loss carry no teacher values at all
    values = torch.where(ids >= 0, t_logp, torch.zeros_like(t_logp))
    values = values if values.dtype == torch.float64 else values.float()
    common = dict(student_bias=bias, mask=tok_mask, reduction="mean", num_items_in_batch=num_items_in_batch)
    ctx = torch.autocast(hidden.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        if divergence is None and mode is None:
            beta = float(beta)
            cap, temp = _fold_scale(logit_scale, softcap, temperature)
            if add_tail_bucket:
                return fused_linear_sparse_distill_loss(hidden, weight, ids, values, softcap=cap, temperature=temp,
                                                        semantics="trl_tail", divergence="jsd", beta=beta,
                                                        **common, **kw)
            if beta == 0.0:
                return _renormalised_fkl(hidden, weight, bias, ids, values, tok_mask, cap, temp, num_items_in_batch)
            return fused_linear_sparse_distill_loss(hidden, weight, ids, values, softcap=softcap,
                                                    logit_scale=float(logit_scale), temperature=temperature,
                                                    mode="topk", divergence="jsd", beta=beta, **common, **kw)
        divergence = divergence or "jsd"
        opts = dict(kw, mode=mode or ("topk_tail" if add_tail_bucket else "topk"))
        if divergence == "jsd":
            opts.setdefault("beta", float(beta))
        return fused_linear_sparse_distill_loss(hidden, weight, ids, values, softcap=softcap,
                                                logit_scale=float(logit_scale), temperature=temperature,
                                                divergence=divergence, **common, **opts)


@_server_keywords
def server_top1_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_top1_token_ids: torch.Tensor,
    teacher_top1_logprobs: torch.Tensor,
    reverse_token_ids: torch.Tensor,
    reverse_teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    **options: Any,
) -> torch.Tensor:
    """``ServerDistillationTrainer._compute_sparse_top_1_divergence_loss`` (β > 0) from hidden states and the LM
    head instead of the student's (B, T, V) log-probs.

    Support per token: the teacher's top-1 id and the reverse-KL token (the sampled one, or the student's argmax),
    the second dropped where it equals the first; β = 1: the reverse-KL token alone. Student logits
    ``softcap(logit_scale·(h W.T + b)) / temperature``; loss over the support (+ a tail bucket with
    ``add_tail_bucket``) by TRL's generalized JSD, mean over ``labels != -100`` (or ÷ ``num_items_in_batch``).
    {server}
    Returns the fp32 (fp64 for fp64 heads) scalar loss."""
    if float(beta) == 1.0:
        ids, lp = reverse_token_ids.unsqueeze(-1), reverse_teacher_logprobs.unsqueeze(-1)
    else:
        second = torch.where(reverse_token_ids != teacher_top1_token_ids, reverse_token_ids, -1)
        ids = torch.stack([teacher_top1_token_ids, second], dim=-1)
        lp = torch.stack([teacher_top1_logprobs, reverse_teacher_logprobs], dim=-1)
    return _server_sparse_loss(hidden, lm_head_weight, lm_head_bias, ids.long(), lp, labels != -100, beta, options)


@_server_keywords
def server_topk_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_topk_token_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.0,
    **options: Any,
) -> torch.Tensor:
    """``ServerDistillationTrainer._compute_server_forward_kl_loss`` (β = 0) from hidden states and the LM head:
    forward KL over the teacher's top-k ids (slots whose teacher log-prob is −inf are padding), with a tail bucket
    or both sides renormalised over the ids; mean over ``labels != -100`` (or ÷ ``num_items_in_batch``, which
    TRL's server path does not take). ``beta``: for fastkd's "jsd" only.
    {server}"""
    valid = teacher_topk_logprobs > -math.inf
    ids = torch.where(valid, teacher_topk_token_ids, -1).long()
    return _server_sparse_loss(hidden, lm_head_weight, lm_head_bias, ids, teacher_topk_logprobs, labels != -100,
                               beta, options)


def _server_stats(hidden, weight, bias, logit_scale, softcap, temperature, ids, t_logp, tok_mask, add_tail):
    """Per-token statistics of a server-teacher call (no gradient, one extra pass over the head): the student's
    entropy at T and its argmax (:func:`logprobs_from_hidden`), its agreement with the teacher's first id, and the
    entropy of the teacher's top-k as the server sent it (its valid slots + the tail, or renormalised over them)."""
    from fastkd.onpolicy.op import logprobs_from_hidden

    cap, temp = _fold_scale(logit_scale, softcap, temperature)
    hidden, weight, bias = _full_head(hidden, weight, bias)
    with torch.no_grad():
        out = logprobs_from_hidden(hidden.detach(), weight.detach(), ids[..., 0].clamp_min(0),
                                   bias=None if bias is None else bias.detach(), temperature=temp, softcap=cap,
                                   return_entropy=True, return_topk=1)
        valid = ids >= 0
        lp = torch.where(valid, t_logp.float(), -math.inf)
        if add_tail:
            mass = torch.where(valid, lp.exp(), 0.0).sum(-1)
            tail = (1.0 - mass).clamp_min(0.0)
            t_ent = -torch.where(valid, lp.exp() * lp, 0.0).sum(-1) - torch.special.xlogy(tail, tail)
        else:
            some = valid.any(-1, keepdim=True)
            lpn = torch.log_softmax(torch.where(some, lp, 0.0), dim=-1)
            t_ent = -torch.where(valid, lpn.exp() * lpn, 0.0).sum(-1)
        keep = tok_mask.float()
        stats = {"student_entropy": out.entropy.float() * keep, "teacher_entropy": t_ent * keep,
                 "top1_agree": (out.topk_ids[..., 0] == ids[..., 0]).float() * keep, "_count": keep.sum()}
    return stats, out.topk_ids[..., 0]


@_server_keywords
def server_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_result: dict[str, torch.Tensor],
    completion_tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    reverse_kl_top_1_mode: str = "sampled",
    return_stats: bool = False,
    **options: Any,
):
    """The server trainer's loss (``_compute_server_sparse_top_1_divergence_loss`` for β > 0,
    ``_compute_server_forward_kl_loss`` for β = 0) on hidden states (B, T, H) at the teacher's T positions.

    ``teacher_result``: TRL's ``{"actual_logprobs" (B, T), "topk_logprobs" (B, T, K), "topk_token_ids" (B, T, K)}``
    (−inf where the server has no value). As in TRL, a kept token (``labels != -100``) without the teacher's
    log-prob of its reverse-KL token (β > 0) or of its top-1 (0 < β < 1) is a ValueError, and the reverse-KL token
    is the sampled one (``reverse_kl_top_1_mode="sampled"``) or the student's argmax ("argmax", taken from the
    fused head, never (B, T, V)). ``return_stats``: also the per-token statistics of :func:`_server_stats`
    (with ``"_count"``, the kept tokens).
    {server}"""
    temperature, add_tail, logit_scale, softcap = (options[k] for k in ("temperature", "add_tail_bucket",
                                                                        "logit_scale", "final_logit_softcapping"))
    C.check_choice("reverse_kl_top_1_mode", reverse_kl_top_1_mode, ("sampled", "argmax"))
    for key in ("actual_logprobs", "topk_logprobs", "topk_token_ids"):
        if key not in teacher_result:
            raise ValueError(f"teacher_result has no {key!r} (keys: {sorted(teacher_result)})")
    required = labels != -100
    actual, top_lp, top_ids = (teacher_result[k] for k in ("actual_logprobs", "topk_logprobs", "topk_token_ids"))
    beta = float(beta)
    stats = None
    if beta > 0:
        if top_lp.shape[-1] != 1:
            raise ValueError(f"beta > 0 trains on the teacher's top-1 (TRL's loss_top_k=1); teacher_result has "
                             f"top-{top_lp.shape[-1]} log-probs")
        checks = [("its reverse-KL (actual) token", actual)]
        if beta < 1:
            checks.append(("its top-1 token", top_lp[..., 0]))
        for what, lp in checks:
            missing = required & ~torch.isfinite(lp)
            if bool(missing.any()):
                raise ValueError(f"the teacher server returned no log-prob of {what} for {int(missing.sum())} of "
                                 f"{int(required.sum())} tokens in the loss")
        # the padding positions' −inf would make an inf in the backward pass: they are out of the loss, read 0
        top1_lp = torch.where(required, top_lp[..., 0], 0.0)
        actual = torch.where(required, actual, 0.0)
        top1_ids = top_ids[..., 0]
        reverse = completion_tokens
        if return_stats or reverse_kl_top_1_mode == "argmax":
            stats, argmax = _server_stats(hidden, lm_head_weight, lm_head_bias, logit_scale, softcap, temperature,
                                          top1_ids.unsqueeze(-1), top1_lp.unsqueeze(-1), required, add_tail)
            if reverse_kl_top_1_mode == "argmax":
                reverse = argmax
        loss = server_top1_loss(hidden, lm_head_weight, lm_head_bias, top1_ids, top1_lp, reverse, actual, labels,
                                beta, **options)
    else:
        loss = server_topk_loss(hidden, lm_head_weight, lm_head_bias, top_ids, top_lp, labels, **options)
        if return_stats:
            ids = torch.where(top_lp > -math.inf, top_ids, -1)
            stats, _ = _server_stats(hidden, lm_head_weight, lm_head_bias, logit_scale, softcap, temperature, ids,
                                     top_lp, required, add_tail)
    return (loss, stats) if return_stats else loss


def _server_forward(trainer, unwrapped, inputs, start, teacher_result, opts):
    """Inside the student wrapper's forward: hidden states at the positions TRL's server path reads from the
    logits (``[start - 1, L - 1)``, cut to the teacher's window), then :func:`server_loss`."""
    from fastkd.integrations.hf import logit_options

    input_ids = inputs["input_ids"]
    window = teacher_result["actual_logprobs"].shape[1]
    hidden = trainer._get_last_hidden_state(unwrapped, input_ids, inputs["attention_mask"],
                                            input_ids.shape[1] - start)[:, :window]
    head = unwrapped.get_output_embeddings()
    device = head.weight.device
    scale, softcap = logit_options(unwrapped)
    tokens, labels = (x[:, start:start + window].to(device) for x in (input_ids, inputs["labels"]))
    return server_loss(hidden.to(device), head.weight, getattr(head, "bias", None),
                       {k: v.to(device) for k, v in teacher_result.items()}, tokens, labels,
                       beta=trainer.beta, temperature=trainer.temperature, add_tail_bucket=trainer.loss_add_tail,
                       reverse_kl_top_1_mode=trainer.reverse_kl_top_1_mode, logit_scale=scale,
                       final_logit_softcapping=softcap, **opts)


def server_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, *,
                        divergence: str | None = None, mode: str | None = None, return_stats: bool = False,
                        **kw: Any):
    """``ServerDistillationTrainer.compute_loss`` with the student's final hidden states and LM head (through
    :func:`server_loss`) in place of its (B, L, V) logits; the same batch layout, teacher call
    (``self._get_teacher_token_logprobs_from_server``), local mean (TRL's server path ignores
    ``num_items_in_batch``) and division by the accumulation steps. Returns the loss (``(loss, None)`` with
    ``return_outputs``: there are no logits), and the statistics with ``return_stats``."""
    completion_mask = inputs["completion_mask"]
    prompt_ids, prompt_mask, completion_ids = inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"]
    # the layout TRL's server path builds from the generation keys: one sequence, −100 outside the completion
    inputs = {**inputs, "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
              "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
              "labels": torch.cat([torch.full_like(prompt_ids, -100),
                                   completion_ids.masked_fill(completion_mask == 0, -100)], dim=1),
              "prompt_attention_mask": prompt_mask}
    start = self._compute_prompt_length(inputs)
    teacher_result = self._get_teacher_token_logprobs_from_server(inputs, start)
    unwrapped = self.accelerator.unwrap_model(model)
    out = self._forward_redirection(model, unwrapped, _server_forward, self, unwrapped, inputs, start,
                                    teacher_result, dict(kw, divergence=divergence, mode=mode,
                                                         return_stats=return_stats))
    loss, stats = out if return_stats else (out, None)
    if self.model.training:
        loss = loss / self.current_gradient_accumulation_steps
    result = (loss, None) if return_outputs else loss
    return (result, stats) if return_stats else result


# ---- patching ----------------------------------------------------------------------------------------------------

# kind -> (module, the patched attribute: a module function or "Class.method", the trainer class)
_TARGETS = {
    "sync": ("trl.trainer.distillation_trainer", "_chunked_divergence_loss", "DistillationTrainer"),
    "async": ("trl.experimental.async_distillation.async_distillation_trainer", "_chunked_jsd_loss",
              "AsyncDistillationTrainer"),
    "server": ("trl.experimental.server_distillation.server_distillation_trainer",
               "ServerDistillationTrainer.compute_loss", "ServerDistillationTrainer"),
}
_ORIGINALS: dict[str, Callable] = {}
_PENDING: list[dict[str, torch.Tensor]] = []  # stats sums of the loss calls since the trainer last logged them
# the statistics logged per kind; the sync / async trainers log the student entropy themselves, as "entropy"
_LOGGED = {"sync": ("teacher_entropy", "top1_agree", "kl"), "async": ("teacher_entropy", "top1_agree", "kl"),
           "server": ("student_entropy", "teacher_entropy", "top1_agree")}


def _original(kind: str) -> Callable:
    _module(kind)
    return _ORIGINALS[kind]


def _owner(kind: str) -> tuple[Any, str]:
    """(the object holding the patched attribute, its name): the module, or the trainer class."""
    name, attr, _ = _TARGETS[kind]
    owner: Any = importlib.import_module(name)
    *path, leaf = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def _module(kind: str):
    owner, leaf = _owner(kind)
    if kind not in _ORIGINALS:
        fn = getattr(owner, leaf)
        fn = getattr(fn, "_fastkd_inner", fn)  # a statistics wrapper around a patched method
        _ORIGINALS[kind] = getattr(fn, "_fastkd_original", fn)
    return importlib.import_module(_TARGETS[kind][0])


def _record(kind: str, stats: dict[str, torch.Tensor], count: torch.Tensor | int) -> None:
    sums = {k: stats[k].sum().detach() for k in _LOGGED[kind]}
    sums["_count"] = torch.as_tensor(count, device=sums[_LOGGED[kind][0]].device).detach().to(torch.float32)
    _PENDING.append(sums)


def _log_stats_compute_loss(cls: type) -> None:
    """Wrap ``cls.compute_loss`` once: after each call, the recorded fastkd statistics become metrics
    ``fastkd/<name>`` in ``self._metrics[mode]`` (token means over all ranks, gathered like TRL's entropy)."""
    if getattr(cls.compute_loss, "_fastkd_stats", False):
        return
    inner = cls.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = inner(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        pending = _PENDING[:]
        _PENDING.clear()
        if pending:
            mode = "train" if self.model.training else "eval"
            total = {k: sum(p[k] for p in pending) for k in pending[0]}
            count = self.accelerator.gather_for_metrics(total.pop("_count").reshape(1)).sum()
            for k, v in total.items():
                value = self.accelerator.gather_for_metrics(v.reshape(1)).sum()
                self._metrics[mode][f"fastkd/{k}"].append((value / count).item() if count > 0 else 0.0)
        return out

    compute_loss._fastkd_stats = True
    compute_loss._fastkd_inner = inner
    cls.compute_loss = compute_loss


def _patch(kind: str, impl: Callable, trainer: Any, divergence, log_stats: bool, kw: dict) -> Any:
    module = _module(kind)
    owner, leaf = _owner(kind)
    _, attr, cls_name = _TARGETS[kind]
    original = _ORIGINALS[kind]

    def patched(*args, **kwargs):
        out = impl(*args, **kwargs, divergence=divergence, return_stats=log_stats, **kw)
        if not log_stats:
            return out
        out, stats = (out[0], out[1]) if kind == "server" else (out[:-1], out[-1])
        if stats is not None:  # None: the call went to TRL's own function
            # the tokens the stats average over: sync n_valid; async every row of hidden_valid; server its own
            count = out[2] if kind == "sync" else args[0].shape[0] if kind == "async" else stats.pop("_count")
            _record(kind, stats, count)
        return out

    patched._fastkd_original = original
    patched.__name__ = patched.__qualname__ = leaf
    patched.__doc__ = f"fastkd's {impl.__name__} (divergence={divergence!r}, options {kw}) in place of TRL's {attr}."
    setattr(owner, leaf, patched)
    cls = getattr(module, cls_name) if trainer is None else (trainer if isinstance(trainer, type) else type(trainer))
    if log_stats:
        _log_stats_compute_loss(cls)
    return cls


def patch_distillation_trainer(trainer: Any = None, divergence: str = "jsd", *, log_stats: bool = False,
                               **kw: Any) -> Any:
    """Make ``trl.DistillationTrainer`` compute its loss with :func:`chunked_divergence_loss` (one line).

    Replaces ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (the function every trainer of that
    module calls), so the patch holds for subclasses too; ``divergence`` and ``kw`` (any keyword of
    :func:`fastkd.fused_linear_distill_loss`, e.g. ``backend``, ``alpha``) are fixed for the run.
    ``log_stats=True`` also logs ``fastkd/teacher_entropy``, ``fastkd/top1_agree`` and ``fastkd/kl`` next to TRL's
    ``entropy`` (wraps ``compute_loss`` of ``trainer`` — the class, or an instance's class — default
    ``DistillationTrainer``). Returns that class. :func:`unpatch` restores TRL's function.
    """
    return _patch("sync", chunked_divergence_loss, trainer, divergence, log_stats, kw)


def patch_async_distillation_trainer(trainer: Any = None, divergence: str | None = None, *, mode: str | None = None,
                                     log_stats: bool = False, **kw: Any) -> Any:
    """Make the async (server top-k teacher) ``AsyncDistillationTrainer`` compute its loss with
    :func:`chunked_jsd_loss`: ``mode`` "topk_tail" / "topk" (default from TRL's ``add_tail_bucket``),
    ``divergence`` (default TRL's generalized JSD), ``log_stats`` and ``kw`` as in
    :func:`patch_distillation_trainer`."""
    if mode is not None:
        kw["mode"] = mode
    return _patch("async", chunked_jsd_loss, trainer, divergence, log_stats, kw)


def patch_server_distillation_trainer(trainer: Any = None, divergence: str | None = None, *,
                                      mode: str | None = None, log_stats: bool = False, **kw: Any) -> Any:
    """Make ``trl.experimental.server_distillation.ServerDistillationTrainer`` (a vLLM server's top-k teacher)
    compute its loss with :func:`server_compute_loss`: the student's log-probs at the teacher's ids come from the
    fused LM head, never a (B, L, V) tensor. Replaces ``ServerDistillationTrainer.compute_loss`` (subclasses that
    do not override it follow). ``divergence`` / ``mode`` None: TRL's own loss, equal to it (:func:`server_loss`);
    given: fastkd's sparse loss with them (``mode`` "topk_tail" / "topk", default from TRL's ``loss_add_tail``).
    ``log_stats=True`` logs ``fastkd/student_entropy``, ``fastkd/teacher_entropy`` and ``fastkd/top1_agree``
    (one extra no-grad pass over the head). ``kw``: further keywords of
    :func:`fastkd.fused_linear_sparse_distill_loss`. Returns the trainer class; :func:`unpatch` restores TRL's."""
    if mode is not None:
        kw["mode"] = mode
    return _patch("server", server_compute_loss, trainer, divergence, log_stats, kw)


def unpatch() -> None:
    """Restore TRL's own loss functions (and ``compute_loss`` where statistics logging wrapped it)."""
    for kind in list(_ORIGINALS):  # the statistics wrappers first: one may wrap a patched compute_loss
        cls = getattr(importlib.import_module(_TARGETS[kind][0]), _TARGETS[kind][2])
        for sub in [cls, *cls.__subclasses__()]:
            if getattr(sub.__dict__.get("compute_loss"), "_fastkd_stats", False):
                sub.compute_loss = sub.compute_loss._fastkd_inner
    for kind, fn in list(_ORIGINALS.items()):
        owner, leaf = _owner(kind)
        setattr(owner, leaf, fn)
    _PENDING.clear()
