"""Vocabulary-parallel :func:`~fastkd.onpolicy.op.logprobs_from_hidden` for a tensor-parallel (TP-sharded) LM head.

Each rank of ``group`` holds the columns ``[vocab_start, vocab_start + V_r)`` of the head (weight (V_r, H), bias
(V_r,)) and the same replicated hidden states (N, H) and global ids. The chunk loop and the row formula are those of
:mod:`fastkd.onpolicy.op`; only the row reductions change (:class:`VocabParallelRows`), with per chunk:

* log-sum-exp: all_reduce(MAX) of the local lse, then all_reduce(SUM) of exp(local − max) — two (c,) collectives;
* log-prob at a global id: the owning rank contributes u[id], the others 0 — one all_reduce(SUM) of (c, K);
* entropy: all_reduce(SUM) of the local Σ p·u — one (c,) collective;
* top-k: each rank's k best (ids made global, −inf padding when V_r < k), all_gather, then top-k of the
  world · k candidates.

Backward needs no collective per chunk (the saved global lse and entropy give each rank its own columns' logit
gradient); the hidden-state gradient is all-reduced once at the end, so every rank gets the full gradient of its
replicated hidden states and the gradient of its own weight / bias shard. All ranks must call with the same N and
options (every rank runs the same number of chunks: the chunk size is the group's minimum).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastkd.onpolicy import op as O

__all__ = ["vocab_parallel_logprobs_from_hidden"]


class VocabParallelRows(O.RowOps):
    def __init__(self, group: dist.ProcessGroup | None, vocab_start: int, vocab_local: int):
        self.group, self.vocab_start, self.vocab_local = group, vocab_start, vocab_local

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def lse(self, u):
        local = torch.logsumexp(u, dim=-1)
        m = local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        m = torch.where(m.isfinite(), m, 0.0)  # all −inf: lse −inf (not NaN); a NaN row stays NaN through the sum
        return m + self._sum(torch.exp(local - m)).log()

    def _local(self, ids):
        loc = ids - self.vocab_start
        own = (loc >= 0) & (loc < self.vocab_local)
        return loc.clamp(0, max(self.vocab_local - 1, 0)), own

    def gather(self, u, ids):
        loc, own = self._local(ids)
        return self._sum(torch.where(own, u.gather(1, loc), 0.0))

    def vsum(self, x):
        return self._sum(x)

    def topk(self, u, k):
        kk = min(k, u.shape[1])
        top = u.topk(kk, dim=-1)
        vals = torch.full((u.shape[0], k), -math.inf, dtype=u.dtype, device=u.device)
        ids = torch.full((u.shape[0], k), -1, dtype=torch.int64, device=u.device)
        vals[:, :kk], ids[:, :kk] = top.values, top.indices + self.vocab_start
        world = dist.get_world_size(self.group)
        all_v = [torch.empty_like(vals) for _ in range(world)]
        all_i = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_v, vals, group=self.group)
        dist.all_gather(all_i, ids, group=self.group)
        best = torch.cat(all_v, -1).topk(k, dim=-1)
        return best.values, torch.cat(all_i, -1).gather(1, best.indices)

    def scatter_(self, g, ids, src):
        loc, own = self._local(ids)
        g.scatter_add_(1, loc, torch.where(own, src, 0.0))

    def finish(self, student):
        if student.grad_hidden is not None:
            dist.all_reduce(student.grad_hidden, op=dist.ReduceOp.SUM, group=self.group)


def vocab_parallel_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    return_topk: int = 0,
    chunk_size: int | None = None,
) -> torch.Tensor | O.LogProbs:
    """:func:`fastkd.logprobs_from_hidden` over a head sharded by vocabulary across ``group``.

    Args:
        hidden: (..., H) replicated on every rank; weight: this rank's (V_r, H) shard; bias: its (V_r,) or None.
        ids: (...,) or (..., K) *global* ids in [0, V), V = Σ V_r over the group (the same on every rank).
        group: the tensor-parallel process group (default: the world).
        vocab_start: global index of this rank's first column (default rank · V_r: equal shards).
        Other arguments: as :func:`fastkd.logprobs_from_hidden` (``return_topk`` ≤ V); the row math is torch's
            (its row reductions are collectives).

    Returns: the same outputs on every rank (global top-k ids). Gradients: the full hidden-state gradient on every
    rank (all-reduced), this rank's weight / bias shard gradient.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_logprobs_from_hidden needs an initialized torch.distributed process group")
    amp = O.check_head(hidden, weight, bias)
    O.check_common(temperature, softcap, chunk_size)
    vr = weight.shape[0]
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * vr
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    n = max(1, hidden.numel() // max(1, hidden.shape[-1]))
    sizes = torch.tensor([vr, O.chunk_rows(chunk_size, n, vr, hidden.device)], dtype=torch.int64,
                         device=hidden.device)
    total = sizes[:1].clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    rows = sizes[1:].clone()
    dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=group)
    ops = VocabParallelRows(group, vocab_start, vr)
    return O.logprobs_impl(hidden, weight, ids, bias=bias, temperature=temperature, softcap=softcap,
                           return_entropy=return_entropy, return_topk=return_topk, chunk_size=chunk_size, ops=ops,
                           vocab=int(total.item()), rows=int(rows.item()), amp=amp, backend="torch")
