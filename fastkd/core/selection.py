"""Token selection from the per-token statistics : SE-KD-style selective distillation.

:func:`with_token_selection` adds three keywords to a loss function (``distill_loss``,
``fused_linear_distill_loss``, the sparse losses):

* ``token_weight=callable(stats) -> (N,)``: per-token weights r ≥ 0 from the stats dict of *this call*
  (:mod:`fastkd.core.stats`: teacher_entropy, student_entropy, top1_agree, kl; (N,) fp32, 0 on excluded
  tokens); or
* ``select="teacher_entropy_top", fraction=f``: r = 1 on the ⌈f · n_kept⌉ kept tokens of highest teacher
  entropy (at the loss's temperature; ties: lower index first), 0 elsewhere.

Excluded tokens (mask / ignore_index) get r = 0 whatever the callable returns. The per-token loss ℓ_i
(divergence term and any ``ce_weight`` cross-entropy term alike) is weighted by r_i and reduced as

    "mean": Σ r_i ℓ_i / Σ r_i  (the mean over the selected tokens for 0/1 weights, as TRL / SE-KD; 0 if Σ r = 0)
    "sum": Σ r_i ℓ_i;  num_items_in_batch given: Σ r_i ℓ_i / num_items_in_batch;  "none": r_i ℓ_i

How it runs (costs stated per call):

* default: the loss runs once with ``reduction="none"`` and ``return_stats=True``; r is computed from those
  stats and applied through the per-token reduction, so autograd scales the gradient rows by r_i / Σ r in
  backward. Unfused losses: the kernel pass is the usual one (no extra pass over the logits); backward
  reads and writes the (N, V) gradient once to scale its rows (what any ``reduction="none"`` loss does).
  Fused losses: the engine's ``reduction="none"`` mode, i.e. forward computes losses and statistics only
  and backward re-runs the chunks with the weights: one extra pass of both LM-head GEMMs and of the loss
  kernel compared with a plain fused call (the weights of a chunk must be known before its gradient is
  accumulated into grad_weight).
* ``select="teacher_entropy_top"`` on a fused loss with a ``teacher_entropy`` pre-pass (dense fused): the
  teacher's entropy is computed first, chunk by chunk (one extra teacher GEMM over all tokens — or one extra
  read of given teacher logits — and O(chunk · V) memory), the selection is folded into the mask, and the
  loss runs once as usual. Its statistics (``return_stats``) are then 0 on the unselected tokens.

With ``return_stats=True`` the stats dict also holds ``"selected"``: r (N,) fp32, the weights applied (0/1
for ``select``), so that consumers can average the stats over the selected tokens (what
``DistillationTrainer`` logs when a selection is active).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from fastkd.core import checks as C

SELECTS = ("teacher_entropy_top",)


def check_selection(token_weight: object, select: object, fraction: object) -> None:
    if token_weight is not None and select is not None:
        raise ValueError("pass either token_weight (a callable) or select=..., not both")
    if token_weight is not None:
        if not callable(token_weight):
            raise TypeError(f"token_weight must be a callable (stats dict -> (N,) weights), got "
                            f"{type(token_weight).__name__}")
        if fraction is not None:
            raise ValueError("fraction goes with select='teacher_entropy_top', not with token_weight")
        return
    if select is None:
        raise ValueError("fraction needs select='teacher_entropy_top'")
    C.check_choice("select", select, SELECTS)
    if fraction is None:
        raise ValueError(f"select={select!r} needs fraction (the share of kept tokens to select, in (0, 1])")
    C.check_range("fraction", fraction, 0.0, 1.0)
    if fraction == 0:
        raise ValueError("fraction must be in (0, 1], got 0")


def top_fraction(score: torch.Tensor, keep: torch.Tensor, fraction: float) -> torch.Tensor:
    """0/1 weights (N,) fp32: the ⌈fraction · n_kept⌉ kept tokens of highest ``score`` (ties: lower index
    first). No host sync: the count stays on the device."""
    score = score.reshape(-1)
    keep = keep.reshape(-1)
    n_kept = keep.sum().to(torch.float64)
    # ⌈f·n⌉ without float fuzz (0.3 · 10 = 3.0000000000000004 must give 3)
    k = torch.ceil(n_kept * fraction - 1e-9 * n_kept)
    s = torch.where(keep, score.to(torch.float64), -math.inf)
    order = torch.argsort(s, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return ((rank < k) & keep).to(torch.float32)


def callable_weights(token_weight: Callable[[dict[str, torch.Tensor]], Any], stats: dict[str, torch.Tensor],
                     keep: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """r (N,) fp32 from a user callable: shape (N,) or ``lead``, real, ≥ 0 and finite (checked where value
    checks are enabled; elsewhere a bad value poisons the loss with NaN), 0 on excluded tokens."""
    r = token_weight(stats)
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"token_weight must return a tensor of per-token weights, got {type(r).__name__}")
    n = keep.numel()
    shapes = list(dict.fromkeys(((n,), tuple(lead))))  # (N,) and the batch shape, once each when they coincide
    if tuple(r.shape) not in shapes:
        raise ValueError(f"token_weight must return shape {' or '.join(map(str, shapes))}, got {tuple(r.shape)}")
    if r.is_complex():
        raise TypeError(f"token_weight must return real weights, got {r.dtype}")
    if r.device != keep.device:
        raise ValueError(f"token_weight returned a tensor on {r.device}, the loss is on {keep.device}")
    r = r.detach().reshape(n).to(torch.float64 if r.dtype == torch.float64 else torch.float32)
    bad = ~torch.isfinite(r) | (r < 0)
    if C.value_checks_enabled(r):
        if bool((bad & keep).any()):
            i = int((bad & keep).nonzero()[0, 0])
            raise ValueError(f"token_weight must return finite weights >= 0; token {i} has {r[i].item()}")
    else:
        r = torch.where(bad, math.nan, r)
    return torch.where(keep, r, 0.0)


def reduce_selected(loss_rows: torch.Tensor, r: torch.Tensor, base: torch.Tensor, reduction: str,
                    num_items: object, lead: tuple[int, ...]) -> torch.Tensor:
    """The selected loss from per-token losses ``loss_rows`` (N,) (differentiable), weights r (N,) and the
    op's own token weights ``base`` (N,) (keep / num_items_in_batch, keep / n_kept, or keep)."""
    loss_rows = loss_rows.reshape(-1)
    r, base = r.to(loss_rows.dtype), base.to(loss_rows.dtype)
    if reduction == "mean" and num_items is None:
        total = r.sum()
        factor = r / torch.where(total > 0, total, torch.ones_like(total))
    else:
        factor = r * base
    # an unselected token contributes 0 even when its loss is inf / NaN (as an excluded token does)
    contrib = torch.where(factor != 0, loss_rows * factor, torch.zeros((), dtype=loss_rows.dtype,
                                                                        device=loss_rows.device))
    return contrib.view(lead) if reduction == "none" else contrib.sum()


def with_token_selection(teacher_entropy: Callable[[dict[str, Any]], torch.Tensor] | None = None):
    """Decorator: adds ``token_weight`` / ``select`` / ``fraction`` (module docstring) to a loss function
    whose first argument is (..., V) or (..., H) (tokens in the leading dimensions) and which takes
    ``labels``, ``ignore_index``, ``mask``, ``reduction``, ``num_items_in_batch`` and ``return_stats``.

    ``teacher_entropy(arguments) -> (N,)``: an optional pre-pass that gives the teacher entropy at the loss's
    temperature before the loss runs (used for ``select="teacher_entropy_top"``). Without the new keywords
    the function is called unchanged.
    """

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, token_weight: Callable[..., Any] | None = None, select: str | None = None,
                    fraction: float | None = None, **kw: Any):
            if token_weight is None and select is None and fraction is None:
                return fn(*args, **kw)
            check_selection(token_weight, select, fraction)
            bound = sig.bind(*args, **kw)
            bound.apply_defaults()
            a = bound.arguments
            first = next(iter(a.values()))
            if not isinstance(first, torch.Tensor) or first.dim() < 1:
                raise TypeError(f"{fn.__name__}: the first argument must be a tensor (..., V) or (..., H)")
            lead = tuple(first.shape[:-1])
            base, _ = C.token_weights(lead, first.device, labels=a["labels"], ignore_index=a["ignore_index"],
                                      mask=a["mask"], reduction=a["reduction"],
                                      num_items_in_batch=a["num_items_in_batch"],
                                      dtype=torch.float64 if first.dtype == torch.float64 else torch.float32)
            keep = base != 0
            if select is not None and teacher_entropy is not None:
                sel = top_fraction(teacher_entropy(dict(a)), keep, fraction)
                a["mask"] = (sel != 0).view(lead)  # ⊆ the kept tokens: the loss's own reduction does the rest
                out = fn(*bound.args, **bound.kwargs)
                return (out[0], {**out[1], "selected": sel}) if a["return_stats"] else out
            want_stats, reduction, num_items = a["return_stats"], a["reduction"], a["num_items_in_batch"]
            a.update(reduction="none", num_items_in_batch=None, return_stats=True)
            loss_rows, stats = fn(*bound.args, **bound.kwargs)
            if select is not None:
                r = top_fraction(stats["teacher_entropy"], keep, fraction)
            else:
                r = callable_weights(token_weight, stats, keep, lead)
            out = reduce_selected(loss_rows, r, base, reduction, num_items, lead)
            return (out, {**stats, "selected": r.to(torch.float32)}) if want_stats else out

        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                 for name in ("token_weight", "select", "fraction")]
        params = list(sig.parameters.values())
        tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
        wrapper.__signature__ = sig.replace(parameters=[p for p in params if p not in tail] + extra + tail)
        doc = wrapper.__doc__ or ""
        wrapper.__doc__ = doc + (
            "\n    Token selection (:mod:`fastkd.core.selection`): ``token_weight=callable(stats) -> (N,)`` or\n"
            "    ``select=\"teacher_entropy_top\", fraction=f`` weight the per-token loss; \"mean\" is normalised\n"
            "    over the selected tokens (Σ r ℓ / Σ r).\n")
        return wrapper

    return deco
