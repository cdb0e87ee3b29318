"""``torch.nn`` modules over fastkd's loss functions (docs/DESIGN.md, public API 5).

Each module stores the keyword options of one function at construction and takes only tensors in
``forward``; per-call keyword arguments (``labels``, ``mask``, ``num_items_in_batch``, ...) may be passed
to ``forward`` and override the stored ones. The functional modules are imported inside ``forward``, so
``import fastkd.nn`` works even when an optional op family (e.g. the OT losses) failed to import.

Statistics (:mod:`fastkd.core.stats`): :class:`DistillLoss`, :class:`FusedLinearDistillLoss` and
:class:`SparseDistillLoss` keep the last call's per-token stats dict (detached, fp32 (N,), 0 on excluded
tokens) in ``module.last_stats``. With ``return_stats=True`` forward returns ``(loss, stats)`` as the function
does; with ``track_stats=True`` (module option or per call) forward returns the loss alone and only fills
``last_stats``. A call with neither sets ``last_stats`` to None.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

__all__ = [
    "DistillLoss",
    "FusedLinearDistillLoss",
    "SparseDistillLoss",
    "SinkhornLoss",
    "SinKDLoss",
    "ULDLoss",
]


def _fn(module: str, name: str) -> Any:
    """``fastkd.<module>.<name>`` (e.g. ``distill.op``), imported on first use."""
    return getattr(importlib.import_module(f"fastkd.{module}"), name)


def _validate(options: dict[str, Any], family: str) -> None:
    """Fail at construction, not on the first forward: the divergence must be one ``family`` supports
    (``fastkd.DIVERGENCES``, the table in ``fastkd.core.divergences``) and the hyperparameters given
    (beta, alpha, mu, t) must be in range for it. ValueError / TypeError naming the argument."""
    from fastkd.core import divergences as D

    if "divergence" not in options:
        return
    D.check_divergence(options["divergence"], family)
    hyper = {k: options[k] for k in D.HYPERS if k in options}
    if hyper:
        D.resolve_hyper(options["divergence"], hyper)


class _KwargsLoss(nn.Module):
    """Stores keyword options; ``extra_repr`` shows them (tensors as their shape)."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options
        self.last_stats: dict[str, torch.Tensor] | None = None

    def _kw(self, call_kw: dict[str, Any]) -> dict[str, Any]:
        return {**self.options, **call_kw} if call_kw else self.options

    def _call_tracking_stats(self, fn: Any, *args: Any, **call_kw: Any) -> Any:
        """``fn(*args, **options)`` handling ``return_stats`` / ``track_stats`` and ``last_stats`` (module doc)."""
        kw = dict(self._kw(call_kw))
        track = bool(kw.pop("track_stats", False))
        want = bool(kw.get("return_stats", False))
        if not (want or track):
            self.last_stats = None
            return fn(*args, **kw)
        kw["return_stats"] = True
        loss, stats = fn(*args, **kw)
        self.last_stats = {k: v.detach() for k, v in stats.items()}
        return (loss, stats) if want else loss

    def extra_repr(self) -> str:
        def show(v: Any) -> str:
            return f"Tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)

        return ", ".join(f"{k}={show(v)}" for k, v in self.options.items())


class DistillLoss(_KwargsLoss):
    """:func:`fastkd.distill_loss` as a module.

    ``DistillLoss("jsd", beta=0.5, temperature=2.0)(student_logits (..., V), teacher_logits (..., V),
    labels=labels)`` → fp32 scalar (or (...,) for ``reduction="none"``).
    """

    def __init__(self, divergence: str = "fkl", **options: Any) -> None:
        _validate({"divergence": divergence, **options}, "logits")
        super().__init__(divergence=divergence, **options)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self._call_tracking_stats(_fn("distill.op", "distill_loss"), student_logits, teacher_logits, **kw)


class FusedLinearDistillLoss(_KwargsLoss):
    """:func:`fastkd.fused_linear_distill_loss` as a module (LM heads fused in, never full logits).

    ``forward(student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht) | None = None,
    teacher_weight (V, Ht) | None = None, **kw)``; pass ``teacher_logits=`` instead of the teacher pair
    when they are precomputed.
    """

    def __init__(self, divergence: str = "fkl", **options: Any) -> None:
        _validate({"divergence": divergence, **options}, "fused")
        super().__init__(divergence=divergence, **options)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                **kw: Any) -> torch.Tensor:
        fn = _fn("distill.fused", "fused_linear_distill_loss")
        return self._call_tracking_stats(fn, student_hidden, student_weight, teacher_hidden, teacher_weight, **kw)

    def through(self, unit: nn.Module, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
                teacher_weight: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """The loss computed as ``unit``'s forward (the module form for sharded heads): ``unit`` is the FSDP2 /
        FSDP1 unit or ZeRO-3 module that owns the student's LM head — the head itself, or the model
        (``get_output_embeddings()``). The engine's hooks gather the head's weight (and bias) for the call
        and reshard after, in forward and backward (:func:`fastkd.core.sharding.call_as_forward`)."""
        from fastkd.core.sharding import call_as_forward, head_in

        def loss(h: torch.Tensor, th: torch.Tensor | None, tw: torch.Tensor | None, **k: Any) -> torch.Tensor:
            head = head_in(unit)
            return self(h, head.weight, th, tw, **{"student_bias": getattr(head, "bias", None), **k})

        return call_as_forward(unit, loss, student_hidden, teacher_hidden, teacher_weight, **kw)


class SparseDistillLoss(_KwargsLoss):
    """:func:`fastkd.sparse_distill_loss` (or its fused-linear form) as a module.

    ``SparseDistillLoss(mode="topk", values="logprobs")(student_logits (..., V), teacher_ids (..., K),
    teacher_values (..., K))``. With ``fused=True`` the module calls
    :func:`fastkd.fused_linear_sparse_distill_loss` and forward takes
    ``(student_hidden (N, H), student_weight (V, H), teacher_ids, teacher_values)``.
    """

    def __init__(self, *, fused: bool = False, **options: Any) -> None:
        _validate(options, "sparse")
        super().__init__(**options)
        self.fused = bool(fused)

    def forward(self, *tensors: torch.Tensor, **kw: Any) -> torch.Tensor:
        want = 4 if self.fused else 3
        if len(tensors) != want:
            sig = ("student_hidden, student_weight, teacher_ids, teacher_values" if self.fused
                   else "student_logits, teacher_ids, teacher_values")
            raise TypeError(f"SparseDistillLoss(fused={self.fused}).forward takes ({sig}), "
                            f"got {len(tensors)} positional tensors")
        name = "fused_linear_sparse_distill_loss" if self.fused else "sparse_distill_loss"
        return self._call_tracking_stats(_fn("sparse.op", name), *tensors, **kw)

    def extra_repr(self) -> str:
        rest = super().extra_repr()
        return f"fused={self.fused}" + (f", {rest}" if rest else "")


class SinkhornLoss(_KwargsLoss):
    """Entropic OT cost ⟨P, C⟩ from :func:`fastkd.sinkhorn` as a module.

    ``forward(x (B, n, d), y (B, m, d), a (B, n) | None = None, b (B, m) | None = None)`` with points, or
    ``forward(cost=C (B, n, m), a=..., b=...)``; returns ``result.value`` (the transport cost), reduced
    over the batch by ``reduction`` ("mean", "sum" or "none" → (B,)). Options such as ``eps``,
    ``metric``, ``max_iter``, ``debias``, ``grad`` go to the constructor.
    """

    def __init__(self, *, reduction: str = "mean", **options: Any) -> None:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
        super().__init__(**options)
        self.reduction = reduction

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
                cost: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        res = _fn("ot.sinkhorn", "sinkhorn")(a, b, cost=cost, x=x, y=y, **self._kw(kw))
        value = res.value
        if self.reduction == "none" or value.dim() == 0:
            return value
        return value.mean() if self.reduction == "mean" else value.sum()

    def extra_repr(self) -> str:
        rest = super().extra_repr()
        return f"reduction={self.reduction!r}" + (f", {rest}" if rest else "")


class SinKDLoss(_KwargsLoss):
    """:func:`fastkd.sinkd_loss` as a module: ``SinKDLoss(temperature=2.0, eps=0.1, n_iter=20)
    (student_logits (B, V), teacher_logits (B, V))`` → scalar."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kw: Any) -> torch.Tensor:
        return _fn("ot.losses", "sinkd_loss")(student_logits, teacher_logits, **self._kw(kw))


class ULDLoss(_KwargsLoss):
    """:func:`fastkd.uld_loss` as a module (cross-tokenizer: vocabularies may differ):
    ``ULDLoss(temperature=1.0)(student_logits (..., Vs), teacher_logits (..., Vt))`` → scalar."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kw: Any) -> torch.Tensor:
        return _fn("ot.losses", "uld_loss")(student_logits, teacher_logits, **self._kw(kw))
