"""Teacher → cache targets, chunk by chunk on the shared LM-head engine (:func:`fastkd.core.lmhead.iter_logits`).

Each chunk's logits z = softcap(h W^T + b) / T_gen (fp32, (c, V), one reused workspace) are computed once and
read once per quantity, so peak memory is O(chunk · V) like the fused loss, never (N, V):

- top-k: ``z.topk(k)`` (the order is the same at every temperature, so one top-k serves all of them);
- for every listed temperature τ (the re-temperable caches), with the top-k slots masked to −inf in place:
  ``tail_lse_τ = logsumexp(z_masked / τ)``, ``head_lse_τ = logsumexp(z_top / τ)``,
  ``lse_τ = logaddexp(head_lse_τ, tail_lse_τ)`` (the log-normaliser) and ``tail_τ = tail_lse_τ − lse_τ``
  (the exact log mass outside the k ids, never 1 − Σ, which cancels badly when the tail is small);
- RS-KD samples: ``multinomial(softmax(z))`` then per-id counts.

The top-k is torch's ``topk`` by default; ``topk_backend="triton"`` uses the streaming Triton top-k of
``kernels/topk.py`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``; k ≤ 128). It is opt-in: it matches
torch and the float64 reference under the interpreter and compiles for sm_90, but was not timed on a GPU.
"""

from __future__ import annotations

import math

import torch

from fastkd.core.lmhead import iter_logits


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
    topk_backend: str = "torch",
) -> dict[str, torch.Tensor]:
    """Top-k ids, their log-probs and the log-normaliser / log tail mass at every temperature in one pass.

    hidden (N, H), weight (V, H), bias (V,) | None; logits z = softcap(h W^T + b) / ``temperature``.
    ``temperatures`` (τ_0, τ_1, ...) re-temper z further (z / τ_j). Returns a dict of
    ``ids`` (N, k) int64, ``logp`` (N, k) fp32 = z_top − lse_{τ_0}, ``lse`` (N, J) fp32 = logsumexp(z / τ_j),
    ``tails`` (N, J) fp32 = log Σ_{i ∉ top-k} softmax(z / τ_j)_i. ``topk_backend``: "torch" or "triton".
    """
    if topk_backend not in ("torch", "triton"):
        raise ValueError(f"topk_backend must be 'torch' or 'triton', got {topk_backend!r}")
    if topk_backend == "triton":
        from fastkd.kernels.topk import topk_rows
    n = hidden.shape[0]
    k = min(k, weight.shape[0])
    temps = tuple(float(t) for t in temperatures)
    dev = hidden.device
    ids = torch.empty(n, k, dtype=torch.int64, device=dev)
    logp = torch.empty(n, k, dtype=torch.float32, device=dev)
    lse = torch.empty(n, len(temps), dtype=torch.float32, device=dev)
    tails = torch.empty(n, len(temps), dtype=torch.float32, device=dev)
    for sl, z in iter_logits(hidden, weight, bias, chunk_size, softcap=softcap, temperature=temperature,
                             dtype=torch.float32):
        if topk_backend == "triton":
            values, indices = topk_rows(z, k)
            top = torch.return_types.topk((values, indices))
        else:
            top = z.topk(k, -1)
        z.scatter_(1, top.indices, -math.inf)  # the workspace now holds the tail only (reused, no new (c, V))
        for j, tau in enumerate(temps):
            tail_lse = torch.logsumexp(z if tau == 1.0 else z / tau, -1)
            head_lse = torch.logsumexp(top.values if tau == 1.0 else top.values / tau, -1)
            lse[sl, j] = torch.logaddexp(head_lse, tail_lse)
            tails[sl, j] = tail_lse - lse[sl, j]
        ids[sl] = top.indices
        logp[sl] = top.values / temps[0] - lse[sl, :1]
    return {"ids": ids, "logp": logp, "lse": lse, "tails": tails}


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
    out = extract_topk(hidden, weight, bias, k=k, temperature=temperature, chunk_size=chunk_size, softcap=softcap)
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
    n, v = hidden.shape[0], weight.shape[0]
    s = num_samples
    ids = torch.full((n, s), -1, dtype=torch.int64, device=hidden.device)
    counts = torch.zeros(n, s, dtype=torch.int32, device=hidden.device)
    for sl, z in iter_logits(hidden, weight, bias, chunk_size, softcap=softcap, temperature=temperature,
                             dtype=torch.float32):
        probs = torch.softmax(z, -1)
        draws = torch.multinomial(probs, s, replacement=True, generator=generator)
        c = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
        top = c.topk(min(s, v), -1)
        ids[sl, : top.indices.shape[1]] = torch.where(top.values > 0, top.indices, -1)
        counts[sl, : top.indices.shape[1]] = top.values.to(torch.int32)
    return ids, counts
