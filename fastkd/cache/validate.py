"""Checks :class:`fastkd.cache.TeacherCacheWriter` runs on every example before buffering it.

Two kinds:

- structural (always): tensors, dtypes (integer ids / input_ids, floating log-probs, tails and lse) and
  shapes, and ids in [0, vocab_size) or −1 — what the reader would refuse as a corrupted shard;
- on the values (``validate=True``, the writer's default): what the sparse losses reject on read, so that a
  cache never serves targets a loss would refuse (or, with value checks off on a GPU, silently use):
  an id twice within one token; NaN or +inf log-probs, and log-probs above 0 (a probability above 1; −inf,
  a probability of 0, is allowed); a token whose top-k mass exceeds 1; NaN / +inf or positive log tail
  masses (``tail``, ``tails``); a non-finite log-normaliser ``lse``; non-finite hidden states. The
  tolerances are the losses' own (log-prob up to 1e-3 above 0, top-k mass up to 1 + 1e-2: rounding noise).

Errors are ``ValueError`` naming the argument. ``validate=False`` skips the value checks (a data pass over
each example on the CPU) for targets known to be valid; the structural ones always run.
"""

from __future__ import annotations

import math

import torch

LOGP_TOL = 1e-3  # log-prob above 0 tolerated as rounding noise (the sparse losses' bound)
MASS_TOL = 1e-2  # top-k mass above 1 tolerated as rounding noise (mode="topk_tail"'s bound)


def _is_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_integer(name: str, x: object) -> torch.Tensor:
    """``x`` as a tensor of an integer dtype (not bool)."""
    x = _is_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def check_floating(name: str, x: object) -> torch.Tensor:
    """``x`` as a floating-point tensor."""
    x = _is_tensor(name, x)
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_real(name: str, x: object) -> torch.Tensor:
    """``x`` as a real (integer or floating, not bool / complex) tensor."""
    x = _is_tensor(name, x)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got {x.dtype}")
    return x


def check_ids(ids: torch.Tensor, vocab_size: int, values: bool) -> None:
    """(T, K) int64 CPU ids: in [0, vocab_size) or −1 (always); with ``values``, no id twice in one token."""
    if not ids.numel():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= vocab_size:
        raise ValueError(f"ids must be in [0, {vocab_size}) or -1, got [{lo}, {hi}]")
    if values and ids.shape[1] > 1:
        srt = ids.sort(-1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(-1).nonzero()[0, 0])
            raise ValueError(f"ids has a duplicated id within one token (token {row}); each id may appear once "
                             f"per token (merge the values)")


def check_logprobs(values: torch.Tensor, valid: torch.Tensor) -> None:
    """Log-probs (T, K) at the ``valid`` slots: no NaN / +inf, none above 0, top-k mass at most 1."""
    v = values.double()
    bad = valid & (v.isnan() | (v == math.inf))
    if bool(bad.any()):
        raise ValueError(f"values holds {int(bad.sum())} NaN or +inf log-probs (token "
                         f"{int(bad.any(-1).nonzero()[0, 0])}); log-probs lie in [-inf, 0]")
    bad = valid & (v > LOGP_TOL)
    if bool(bad.any()):
        raise ValueError(f"values holds {int(bad.sum())} log-probs > 0 (probabilities above 1; token "
                         f"{int(bad.any(-1).nonzero()[0, 0])}); if they are raw logits, log_softmax them first")
    mass = torch.logsumexp(torch.where(valid, v, -math.inf), -1)
    bad = mass > math.log1p(MASS_TOL)
    if bool(bad.any()):
        raise ValueError(f"values sum to a probability mass above 1 in {int(bad.sum())} tokens (token "
                         f"{int(bad.nonzero()[0, 0])}: {math.exp(float(mass[bad][0])):.4g}); the top-k of one "
                         f"distribution sums to at most 1")


def check_log_mass(name: str, x: torch.Tensor) -> None:
    """Log masses (``tail``, ``tails``): no NaN / +inf, none above 0 (−inf, no mass, is allowed)."""
    v = x.double()
    bad = v.isnan() | (v == math.inf)
    if bool(bad.any()):
        raise ValueError(f"{name} holds {int(bad.sum())} NaN or +inf entries; a log tail mass lies in [-inf, 0]")
    bad = v > LOGP_TOL
    if bool(bad.any()):
        raise ValueError(f"{name} holds {int(bad.sum())} log masses > 0 (a tail mass above 1, e.g. "
                         f"{math.exp(float(v[bad][0])):.4g}); a log tail mass lies in [-inf, 0]")


def check_finite(name: str, x: torch.Tensor) -> None:
    bad = ~x.isfinite()
    if bool(bad.any()):
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite entries (NaN or inf)")
