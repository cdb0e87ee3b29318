"""Teacher → cache targets, chunk by chunk on the shared LM-head engine (:func:`fastkd.core.lmhead.iter_logits`).

:func:`extract` makes ONE pass of the engine: each chunk's logits z = softcap(h W^T + b) / T_gen (fp32, (c, V),
one reused workspace) are computed once and every requested quantity is taken from that workspace before
the next chunk, so peak memory is O(chunk · V) like the fused loss, never (N, V):

- RS-KD samples (``num_samples``): ``multinomial(softmax(z))`` then per-id counts (drawn first: the torch
  top-k below overwrites the workspace);
- top-k (``k``): ids and values (the order is the same at every temperature, so one top-k serves all), and
  for every listed temperature τ_j the log-normaliser ``lse_j = logsumexp(z / τ_j)`` and the exact log tail
  mass ``tail_j = log Σ_{i ∉ top-k} softmax(z / τ_j)_i``, computed as a log-sum of the tail's own (positive)
  terms, never as log(1 − Σ head), which cancels when the tail is small.

Top-k backends (``topk_backend``):

- ``"triton"``: :func:`fastkd.kernels.topk.topk_lse_rows`, the streaming top-k kernel that also accumulates
  every lse_j / tail_j in the same single read of the chunk (k ≤ 128, at most 8 temperatures; CUDA tensors,
  or CPU under ``TRITON_INTERPRET=1``);
- ``"torch"``: ``z.topk(k)``, then the top-k slots are set to −inf in place (the workspace then holds the
  tail only), one max m of the tail and per τ_j one sum of exp((z − m)/τ_j) (the last τ in place, so one
  temperature needs no (c, V) temporary): tail_lse_j = m/τ_j + log s_j, head_lse_j = logsumexp(z_top/τ_j),
  lse_j = logaddexp(head_lse_j, tail_lse_j), tail_j = tail_lse_j − lse_j;
- ``"auto"`` (default): triton for CUDA tensors when triton imports and k / the temperature count are within
  the kernel's bounds, torch otherwise (CPU); the choice is logged at DEBUG on the ``"fastkd"`` logger.

Both give torch.topk's values exactly; on exactly tied logits the ids may differ (either tied id is a correct
top-k). −inf logits are ordinary entries: with fewer than k finite logits the last values are −inf and the
tail is −inf (log 0). The two paths sum in different orders (and the kernel multiplies by 1/τ throughout):
lse / tail agree to fp32 rounding, not bitwise. Not yet timed on a GPU.
"""

from __future__ import annotations

import logging
import math

import torch

from fastkd.core.lmhead import iter_logits
from fastkd.core.registry import BackendUnavailableError, triton_import_error, triton_interpret

logger = logging.getLogger("fastkd")
TOPK_BACKENDS = ("auto", "torch", "triton")
_TRITON_MAX_K = 128  # fastkd.kernels.topk.MAX_K / MAX_TEMPERATURES (not imported: triton may be absent)
_TRITON_MAX_TEMPERATURES = 8


def topk_backend_reasons(device: torch.device, k: int, n_temperatures: int) -> list[str]:
    """Why the Triton top-k cannot run (empty: it can): toolchain, device, k and temperature bounds."""
    reasons = []
    err = triton_import_error()
    if err:
        reasons.append(err)
    if device.type != "cuda" and not triton_interpret():
        reasons.append(f"tensor on {device.type} (Triton needs CUDA tensors, or TRITON_INTERPRET=1)")
    if k > _TRITON_MAX_K:
        reasons.append(f"k={k} > {_TRITON_MAX_K} (the kernel unrolls its selection k times)")
    if n_temperatures > _TRITON_MAX_TEMPERATURES:
        reasons.append(f"{n_temperatures} temperatures > {_TRITON_MAX_TEMPERATURES}")
    return reasons


def choose_topk_backend(topk_backend: str, device: torch.device, k: int, n_temperatures: int) -> str:
    """"torch" or "triton" for ``topk_backend`` in ("auto", "torch", "triton"); see the module docstring.

    ``auto`` takes triton only on CUDA tensors (on CPU the interpreter would be far slower than torch);
    an explicit "triton" that cannot run raises :class:`BackendUnavailableError` listing every reason."""
    if topk_backend not in TOPK_BACKENDS:
        raise ValueError(f"topk_backend must be one of {TOPK_BACKENDS}, got {topk_backend!r}")
    if topk_backend == "torch":
        return "torch"
    reasons = topk_backend_reasons(device, k, n_temperatures)
    if topk_backend == "triton":
        if reasons:
            raise BackendUnavailableError("topk_backend='triton' cannot run: " + "; ".join(reasons))
        return "triton"
    if device.type != "cuda":
        reasons = [f"tensor on {device.type} (auto uses Triton on CUDA tensors only)", *reasons]
    choice = "torch" if reasons else "triton"
    if logger.isEnabledFor(logging.DEBUG):
        for reason in reasons:
            logger.debug("fastkd auto dispatch of 'extract_topk': skipped triton: %s", reason)
        logger.debug("fastkd auto dispatch of 'extract_topk': using %s", choice)
    return choice


def _torch_topk_lse(z: torch.Tensor, k: int, temps: tuple[float, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path on one chunk z (c, V) fp32, which it overwrites: (values, ids, lse (c, J), tails (c, J))."""
    top = z.topk(k, -1)
    z.scatter_(1, top.indices, -math.inf)  # the workspace now holds the tail only (reused, no new (c, V))
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, 0.0, m)  # an all −inf tail: avoid −inf − (−inf); its sum is then 0
    z.sub_(m)
    lse = torch.empty(z.shape[0], len(temps), dtype=torch.float32, device=z.device)
    tails = torch.empty_like(lse)
    buf = torch.empty_like(z) if len(temps) > 1 else None  # one temporary for all but the last temperature
    for j, tau in enumerate(temps):
        if j == len(temps) - 1:  # the last one overwrites the workspace itself
            e = z if tau == 1.0 else z.mul_(1.0 / tau)
        else:
            e = torch.mul(z, 1.0 / tau, out=buf)
        tail_lse = m[:, 0] / tau + torch.log(e.exp_().sum(-1))
        head_lse = torch.logsumexp(top.values if tau == 1.0 else top.values / tau, -1)
        lse[:, j] = torch.logaddexp(head_lse, tail_lse)
        tails[:, j] = tail_lse - lse[:, j]
    return top.values, top.indices, lse, tails


@torch.no_grad()
def extract(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int | None = None,
    temperatures: tuple[float, ...] = (1.0,),
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    chunk_size: int = 256,
    softcap: float | None = None,
    topk_backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Every requested teacher target in one LM-head pass (see the module docstring).

    hidden (N, H), weight (V, H), bias (V,) | None; logits z = softcap(h W^T + b) / ``temperature``.
    With ``k``: ``ids`` (N, k) int64, ``logp`` (N, k) fp32 = z_top / τ_0 − lse_0, ``lse`` (N, J) fp32 =
    logsumexp(z / τ_j), ``tails`` (N, J) fp32 = log Σ_{i ∉ top-k} softmax(z / τ_j)_i for ``temperatures``
    (τ_0, τ_1, ...) (k is clipped to V). With ``num_samples`` S: ``sample_ids`` (N, S) int64 (distinct ids
    first, −1 padding) and ``counts`` (N, S) int32 of S draws with replacement from softmax(z) (``generator``).
    """
    if k is None and num_samples is None:
        raise ValueError("extract needs k (top-k) and/or num_samples (RS-KD samples)")
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    out: dict[str, torch.Tensor] = {}
    backend = None
    if k is not None:
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = min(k, v)
        temps = tuple(float(t) for t in temperatures)
        if not temps or any(not 0.0 < t < math.inf for t in temps):
            raise ValueError(f"temperatures must be a non-empty tuple of positive finite numbers, got {temperatures}")
        backend = choose_topk_backend(topk_backend, dev, k, len(temps))
        if backend == "triton":
            from fastkd.kernels.topk import topk_lse_rows

            inv_tau = torch.tensor([1.0 / t for t in temps], dtype=torch.float32, device=dev)  # once, not per chunk
        out["ids"] = torch.empty(n, k, dtype=torch.int64, device=dev)
        out["logp"] = torch.empty(n, k, dtype=torch.float32, device=dev)
        out["lse"] = torch.empty(n, len(temps), dtype=torch.float32, device=dev)
        out["tails"] = torch.empty(n, len(temps), dtype=torch.float32, device=dev)
    if num_samples is not None:
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        s = num_samples
        out["sample_ids"] = torch.full((n, s), -1, dtype=torch.int64, device=dev)
        out["counts"] = torch.zeros(n, s, dtype=torch.int32, device=dev)
    for sl, z in iter_logits(hidden, weight, bias, chunk_size, softcap=softcap, temperature=temperature,
                             dtype=torch.float32):
        if num_samples is not None:  # before the top-k: the torch top-k overwrites z
            probs = torch.softmax(z, -1)
            draws = torch.multinomial(probs, s, replacement=True, generator=generator)
            c = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
            top = c.topk(min(s, v), -1)
            out["sample_ids"][sl, : top.indices.shape[1]] = torch.where(top.values > 0, top.indices, -1)
            out["counts"][sl, : top.indices.shape[1]] = top.values.to(torch.int32)
            del probs, c
        if k is not None:
            if backend == "triton":
                values, indices, lse, tails = topk_lse_rows(z, k, temps, inv_tau=inv_tau)
            else:
                values, indices, lse, tails = _torch_topk_lse(z, k, temps)
            out["ids"][sl] = indices
            out["logp"][sl] = values / temps[0] - lse[:, :1]
            out["lse"][sl] = lse
            out["tails"][sl] = tails
    return out


@torch.no_grad()
def extract_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int,
    temperature: float = 1.0,
    temperatures: tuple[float, ...] = (1.0,),
    chunk_size: int = 256,
    softcap: float | None = None,
    topk_backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Top-k ids, their log-probs and the log-normaliser / log tail mass at every temperature in one pass.

    hidden (N, H), weight (V, H), bias (V,) | None; logits z = softcap(h W^T + b) / ``temperature``.
    ``temperatures`` (τ_0, τ_1, ...) re-temper z further (z / τ_j). Returns a dict of
    ``ids`` (N, k) int64, ``logp`` (N, k) fp32 = z_top / τ_0 − lse_0, ``lse`` (N, J) fp32 = logsumexp(z / τ_j),
    ``tails`` (N, J) fp32 = log Σ_{i ∉ top-k} softmax(z / τ_j)_i. ``topk_backend``: "auto", "torch", "triton".
    """
    return extract(hidden, weight, bias, k=k, temperature=temperature, temperatures=temperatures,
                   chunk_size=chunk_size, softcap=softcap, topk_backend=topk_backend)


@torch.no_grad()
def topk_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of softmax((h W^T + b) / T) per token without (N, V) logits.

    hidden (N, H), weight (V, H), bias (V,). Returns ids (N, k) int64, log-probs (N, k) fp32 and the log of
    the mass outside the k ids (N,) fp32, computed exactly as logsumexp over the other entries − lse.
    """
    out = extract(hidden, weight, bias, k=k, temperature=temperature, chunk_size=chunk_size, softcap=softcap)
    return out["ids"], out["logp"], out["tails"][:, 0]


@torch.no_grad()
def sample_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_samples: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
    generator: torch.Generator | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-Sampling KD targets: ``num_samples`` draws per token from the teacher (with replacement).

    Returns ids (N, num_samples) int64 (distinct ids first, −1 padding) and counts (N, num_samples) int32.
    """
    out = extract(hidden, weight, bias, num_samples=num_samples, temperature=temperature, chunk_size=chunk_size,
                  generator=generator, softcap=softcap)
    return out["sample_ids"], out["counts"]
