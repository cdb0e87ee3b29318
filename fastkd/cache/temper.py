"""Re-temperable sparse caches: exact log-probs / tail at any stored temperature, and :func:`cache_stats`.

A cache written with ``temperatures=(1.0, τ_1, ...)`` stores per token, next to the top-k ids and their
log-probs at τ = 1 (``values``, value dtype), the log-normaliser ``lse`` (T, J) fp32 = logsumexp(z / τ_j)
and the log tail mass ``tails`` (T, J) (value dtype) at every listed τ_j. The raw logits of the stored ids
come back as z_i = logp_i + lse_1, so at τ_j

    logp_i(τ_j) = z_i / τ_j − lse_j          tail(τ_j) = tails[:, j]

exactly, up to the rounding of the stored values (err(logp_i) / τ_j) — what
``sparse_distill_loss(mode="topk_tail", teacher_tail=...)`` needs. A temperature that was not stored is an
error, unless ``approximate=True``: then the stored top-k is renormalised at τ (logp_i/τ, log-softmax over
the k ids, tail = −inf); that drops the teacher's mass outside the k ids, so it is approximate.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
_MIN_ULP = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-149}


def temperature_slot(index: dict[str, Any], temperature: float) -> int | None:
    """Column of ``temperature`` in the stored ``lse`` / ``tails``, or None."""
    for j, tau in enumerate(index.get("temperatures", [])):
        if math.isclose(tau, temperature, rel_tol=1e-9, abs_tol=0.0):
            return j
    return None


def at_temperature(ex: dict[str, torch.Tensor], lse: torch.Tensor | None, tails: torch.Tensor | None,
                   index: dict[str, Any], temperature: float, approximate: bool = False) -> dict[str, torch.Tensor]:
    """Example ``ex`` (a ``cache[i]`` dict, values = log-probs at τ = 1) with values / tail at ``temperature``."""
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if index["values"] != "logprobs":
        raise ValueError(f"temperature= needs a log-prob cache, this one stores {index['values']!r}")
    valid = ex["teacher_ids"] >= 0
    j = temperature_slot(index, temperature)
    out = dict(ex)
    if j is not None:
        z = ex["teacher_values"] + lse[:, :1]
        out["teacher_values"] = torch.where(valid, z / temperature - lse[:, j:j + 1], 0.0)
        out["teacher_tail"] = tails[:, j].float()
        return out
    if not approximate:
        stored = index.get("temperatures") or []
        raise ValueError(f"temperature={temperature} was not stored in this cache (stored: {stored}); rebuild it with "
                         f"temperatures=(..., {temperature}) or pass approximate=True to renormalise the top-k "
                         f"at that temperature (drops the tail mass: approximate)")
    scaled = torch.where(valid, ex["teacher_values"] / temperature, -math.inf)
    out["teacher_values"] = torch.where(valid, torch.log_softmax(scaled, -1), 0.0).nan_to_num(0.0)
    out["teacher_tail"] = torch.full_like(scaled[:, 0], -math.inf)
    return out


def half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Largest rounding error of each value of ``x`` as stored in its dtype (float64): half its ulp."""
    p = _MANTISSA[x.dtype]
    _, e = torch.frexp(x.double().abs())
    return torch.maximum(torch.ldexp(torch.ones_like(e, dtype=torch.float64), e - 1 - p),
                         torch.tensor(_MIN_ULP[x.dtype], dtype=torch.float64)) / 2


def _quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> dict[float, float]:
    """Linear-interpolation quantiles (numpy's default) without torch.quantile's size limit."""
    s = x.double().sort().values
    n = s.numel()
    out = {}
    for q in qs:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        out[q] = float(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


def cache_stats(cache: Any, quantiles: tuple[float, ...] = (0.5, 0.9, 0.99, 1.0)) -> dict[str, Any]:
    """Per stored temperature τ: quantiles over tokens of the tail mass (the exact total-variation distance
    between the teacher and its top-k renormalisation: TV = Σ_{i∉K} p_i = tail mass), and the worst-case
    error of the stored log-probs at τ (max over stored values of half an ulp, / τ, plus the fp32 lse's)
    and of the stored log tail. A cache without temperatures reports τ = 1 from its ``tail``. Reads every
    shard and holds 4 bytes per token and temperature for the exact quantiles."""
    ix = cache.index
    if ix["values"] != "logprobs" or not ix["store_tail"]:
        raise ValueError("stats() needs a log-prob cache with a stored tail")
    temps = ix.get("temperatures") or [1.0]
    tail_cols: list[list[torch.Tensor]] = [[] for _ in temps]
    val_err = torch.zeros((), dtype=torch.float64)
    lse_err = torch.zeros((), dtype=torch.float64)
    tail_err = torch.zeros(len(temps), dtype=torch.float64)
    for s in range(len(ix["shards"])):
        t = cache._shard(s)
        if t["values"].numel():
            val_err = torch.maximum(val_err, half_ulp(t["values"]).max())
        tails = t["tails"] if "tails" in t else t["tail"].unsqueeze(-1)
        for j in range(len(temps)):
            tail_cols[j].append(tails[:, j].float().exp())  # fp32: 4 B/token/temperature held for the quantiles
            if tails.shape[0]:
                fin = tails[:, j][tails[:, j].isfinite()]
                if fin.numel():
                    tail_err[j] = torch.maximum(tail_err[j], half_ulp(fin).max())
        if "lse" in t and t["lse"].numel():
            lse_err = torch.maximum(lse_err, half_ulp(t["lse"]).max())
    out: dict[str, Any] = {"n_tokens": ix["n_tokens"], "k": ix["k"], "value_dtype": ix["value_dtype"],
                           "temperatures": {}}
    for j, tau in enumerate(temps):
        mass = torch.cat(tail_cols[j]) if tail_cols[j] else torch.zeros(0)
        # z = v + lse_1 carries both errors; / τ then − lse_τ adds lse_τ's (no lse without temperatures)
        verr = float((val_err + lse_err) / tau + lse_err)
        out["temperatures"][float(tau)] = {
            "tail_mass_quantiles": _quantiles(mass, quantiles) if mass.numel() else {},
            "value_max_abs_error": verr,
            "tail_max_abs_error": float(tail_err[j]),
        }
    return out
