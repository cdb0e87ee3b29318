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
* :func:`patch_distillation_trainer` / :func:`patch_async_distillation_trainer` replace those module functions
  (so every trainer of the module uses fastkd), optionally with fastkd's other statistics logged next to
  TRL's ``entropy``; :func:`unpatch` restores TRL's functions.
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

from fastkd.distill.fused import fused_linear_distill_loss
from fastkd.distill.op import distill_loss
from fastkd.sparse.op import fused_linear_sparse_distill_loss

__all__ = ["chunked_divergence_loss", "chunked_jsd_loss", "generalized_jsd_loss", "patch_async_distillation_trainer",
           "patch_distillation_trainer", "patch_gkd_trainer", "unpatch"]

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


# ---- patching -------------------------------------------------------------------------------------------------

_TARGETS = {
    "sync": ("trl.trainer.distillation_trainer", "_chunked_divergence_loss", "DistillationTrainer"),
    "async": ("trl.experimental.async_distillation.async_distillation_trainer", "_chunked_jsd_loss",
              "AsyncDistillationTrainer"),
}
_ORIGINALS: dict[str, Callable] = {}
_PENDING: list[dict[str, torch.Tensor]] = []  # stats sums of the loss calls since the trainer last logged them
_LOGGED = ("teacher_entropy", "top1_agree", "kl")  # TRL logs the student entropy itself, as "entropy"


def _original(kind: str) -> Callable:
    _module(kind)
    return _ORIGINALS[kind]


def _module(kind: str):
    name, attr, _ = _TARGETS[kind]
    module = importlib.import_module(name)
    if kind not in _ORIGINALS:
        fn = getattr(module, attr)
        _ORIGINALS[kind] = getattr(fn, "_fastkd_original", fn)
    return module


def _record(stats: dict[str, torch.Tensor], count: torch.Tensor | int) -> None:
    sums = {k: stats[k].sum().detach() for k in _LOGGED}
    sums["_count"] = torch.as_tensor(count, device=stats["kl"].device).detach().to(torch.float32)
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
            total = {k: sum(p[k] for p in pending) for k in (*_LOGGED, "_count")}
            count = self.accelerator.gather_for_metrics(total["_count"].reshape(1)).sum()
            for k in _LOGGED:
                value = self.accelerator.gather_for_metrics(total[k].reshape(1)).sum()
                self._metrics[mode][f"fastkd/{k}"].append((value / count).item() if count > 0 else 0.0)
        return out

    compute_loss._fastkd_stats = True
    compute_loss._fastkd_inner = inner
    cls.compute_loss = compute_loss


def _patch(kind: str, impl: Callable, trainer: Any, divergence, log_stats: bool, kw: dict) -> Any:
    module = _module(kind)
    name, attr, cls_name = _TARGETS[kind]
    original = _ORIGINALS[kind]

    def patched(*args, **kwargs):
        out = impl(*args, **kwargs, divergence=divergence, return_stats=log_stats, **kw)
        if log_stats:  # sync: n_valid; async: every row of hidden_valid is a valid token
            if out[-1] is not None:  # None: the call went to TRL's own function
                _record(out[-1], out[2] if kind == "sync" else args[0].shape[0])
            out = out[:-1]
        return out

    patched._fastkd_original = original
    patched.__name__ = patched.__qualname__ = attr
    patched.__doc__ = f"fastkd's {impl.__name__} (divergence={divergence!r}, options {kw}) in place of TRL's {attr}."
    setattr(module, attr, patched)
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


def unpatch() -> None:
    """Restore TRL's own loss functions (and ``compute_loss`` where statistics logging wrapped it)."""
    for kind, fn in list(_ORIGINALS.items()):
        name, attr, cls_name = _TARGETS[kind]
        module = importlib.import_module(name)
        setattr(module, attr, fn)
        for cls in [getattr(module, cls_name), *getattr(module, cls_name).__subclasses__()]:
            if getattr(cls.__dict__.get("compute_loss"), "_fastkd_stats", False):
                cls.compute_loss = cls.compute_loss._fastkd_inner
    _PENDING.clear()
