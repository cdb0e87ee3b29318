"""Argument checks and token weighting shared by every loss op.

Conventions (docs/DESIGN.md): ``labels == ignore_index`` or ``mask == False`` excludes a token; ``reduction``
"mean" = sum over kept tokens / number kept (0 when none is kept), "sum", or "none" (one value per token,
0 for excluded); ``num_items_in_batch`` (HF gradient accumulation) = sum / that number.

Ops turn these into one fp32 per-token ``weight`` vector so that backends never see reductions:
``weight[i] == 0`` means token i is excluded (its loss and gradient must be exactly 0 whatever its
logits are), and the backend writes ``weight[i] * d loss_i / d logits_i`` as the gradient. The op then
returns ``sum(weight * loss)`` for "mean"/"sum" and ``loss`` (masked) for "none".

Value checks that would need a device→host sync (label ranges, negative probabilities) run on CPU tensors
always, and on GPU tensors only when the user asks (``FASTKD_CHECK_INPUTS=1`` or :func:`set_input_checks`).
"""

from __future__ import annotations

import math
import os
from numbers import Number

import torch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_CHECKS: bool | None = None


def set_input_checks(enabled: bool | None) -> None:
    """Force value checks on (True), off (False), or back to the default (None: env / CPU-only)."""
    global _CHECKS
    _CHECKS = enabled


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether data-dependent checks (which sync a GPU) should run for tensors like ``t``."""
    if torch.compiler.is_compiling():  # a data-dependent branch would break the graph
        return False
    if _CHECKS is not None:
        return _CHECKS
    if os.environ.get("FASTKD_CHECK_INPUTS", "0") not in ("", "0"):
        return True
    return t.device.type == "cpu"


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_number(name: str, value: object) -> None:
    """A real Python number, not a tensor and not a bool (``True`` is an int to Python, never a count here)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not a bool (got {value!r})")
    if isinstance(value, torch.Tensor) or not isinstance(value, Number) or isinstance(value, complex):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")


def check_positive(name: str, value: float) -> None:
    _check_number(name, value)
    if not (value > 0) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    _check_number(name, value)
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def check_float_tensor(name: str, t: object, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_constant(name: str, t: torch.Tensor | None) -> None:
    """Teacher inputs are constants: refuse tensors that require grad instead of dropping it silently."""
    if t is not None and t.requires_grad:
        raise ValueError(
            f"{name} requires grad, but teacher inputs are treated as constants and get no gradient; "
            f"pass {name}.detach() (or compute it under torch.no_grad())"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; "
                             "move them to one device")


def token_weights(
    lead_shape: torch.Size | tuple[int, ...],
    device: torch.device,
    *,
    labels: torch.Tensor | None,
    ignore_index: int,
    mask: torch.Tensor | None,
    reduction: str,
    num_items_in_batch: int | float | torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (weight (N,) fp32, labels (N,) int64 or None) for tokens of shape ``lead_shape``.

    ``dtype`` is float32, or float64 for float64 logits. Excluded tokens get weight 0; kept tokens
    get 1 ("sum", "none"), 1/num_kept ("mean"), or
    1/num_items_in_batch when that is given. Never syncs with the device.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    lead_shape = tuple(lead_shape)
    n = math.prod(lead_shape)
    keep = None
    flat_labels = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if tuple(labels.shape) != lead_shape:
            raise ValueError(f"labels must have shape {lead_shape} (the logits without the vocabulary "
                             f"dimension), got {tuple(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but the logits are on {device}")
        flat_labels = labels.reshape(n).long()
        keep = flat_labels != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = keep), got {mask.dtype}")
        if tuple(mask.shape) != lead_shape:
            raise ValueError(f"mask must have shape {lead_shape}, got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the logits are on {device}")
        m = mask.reshape(n)
        keep = m if keep is None else keep & m
    weight = torch.ones(n, dtype=dtype, device=device) if keep is None else keep.to(dtype)
    if num_items_in_batch is not None:
        if reduction == "none":
            raise ValueError("num_items_in_batch needs reduction 'mean' or 'sum', not 'none'")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a number or a one-element tensor")
            if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
                raise TypeError(f"num_items_in_batch must be a real number tensor, got {num_items_in_batch.dtype}")
            count = num_items_in_batch.detach().to(device=device, dtype=dtype).reshape(())
            if value_checks_enabled(num_items_in_batch):
                value = float(count)
                if not (value > 0) or math.isinf(value):
                    raise ValueError(f"num_items_in_batch must be a finite number > 0, got tensor({value!r})")
            else:
                # no host sync here: a count of 0, a negative or a non-finite count poisons the loss with NaN
                # (never a silent inf or a negative loss)
                count = torch.where((count > 0) & count.isfinite(), count, torch.full_like(count, math.nan))
            weight = weight / count
        else:
            check_positive("num_items_in_batch", num_items_in_batch)
            weight = weight / float(num_items_in_batch)
    elif reduction == "mean":
        weight = weight / weight.sum().clamp_min(1.0)
    return weight, flat_labels


def check_label_range(labels: torch.Tensor | None, weight: torch.Tensor, vocab: int) -> None:
    """Kept labels must lie in [0, vocab); checked where value checks are enabled."""
    if labels is None or not value_checks_enabled(labels):
        return
    kept = labels[weight != 0]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index; got values in "
                         f"[{int(kept.min())}, {int(kept.max())}]")


def reduce_tokens(loss: torch.Tensor, weight: torch.Tensor, reduction: str,
                  lead_shape: tuple[int, ...]) -> torch.Tensor:
    """Per-token fp32 ``loss`` (0 where excluded) → the requested reduction."""
    if reduction == "none":
        return loss.view(lead_shape)
    return (loss * weight).sum()


def resolve_vocab(vs: int, vt: int, vocab_size: int | None) -> int:
    """The number of leading vocabulary columns both sides use."""
    for name, size in (("student", vs), ("teacher", vt)):
        if size == 0:
            raise ValueError(f"the {name} vocabulary (last dimension) is empty: a distribution needs V >= 1")
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"student and teacher vocabularies differ ({vs} vs {vt}); if they differ only by padding "
                f"columns, pass vocab_size=<real vocabulary size> to use the first vocab_size columns"
            )
        return vs
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 0 < vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size must be in [1, {min(vs, vt)}] (the smaller vocabulary), "
                         f"got {vocab_size}")
    return vocab_size
