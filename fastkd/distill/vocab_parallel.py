"""Vocabulary-parallel distillation losses for tensor-parallel LM heads.

Each rank of ``group`` holds one contiguous vocabulary shard: logits ``(..., V_r)`` (or an LM-head weight
shard ``(V_r, H)`` with replicated hidden states ``(N, H)``), columns ``[vocab_start, vocab_start + V_r)``
of the full vocabulary.

**Engine and backends.** The fused variant runs on the LM-head engine (:mod:`fastkd.core.lmhead`: chunk
loop, reused logits workspaces, in-place gradient accumulation; the teacher head as in
:func:`fastkd.fused_linear_distill_loss`). The divergence itself is computed by the registry's ``distill``
backends (torch, Triton on CUDA tensors, CUDA) on an *augmented* shard: the shard's tempered logits plus
one column holding the log-mass of every other shard,

    λ_s = logsumexp over the other ranks of lse_r(s/T)      (all_gather of each rank's (rows,) lse)

(and λ_t likewise for the teacher). A softmax over ``[s_r/T, λ_s]`` gives exactly the *global* q on the
shard's columns and the rest mass Q̄ = exp(λ_s − lse_s) in the extra column, so the backend returns

    loss_aug = kd·(Σ_{v∈r} f(p_v, q_v) + f(P̄, Q̄)),  grad_v = w·kd/T·(qg_v − q_v·S_aug)   (v ∈ r)

with S_aug = Σ_{v∈r} qg_v + qg(P̄, Q̄) and qg = q·∂D/∂q (softmax chain rule). What must stay here is only
what needs a cross-shard reduction *between* passes, which a single-row backend cannot do:

* the statistics exchange (all_gather of the shards' lse, then the extra column);
* the rest-column terms f(P̄, Q̄) and qg(P̄, Q̄) (per-row scalars, :func:`_rest_terms`), so that
  ``D = all_reduce_sum(loss_aug/kd − f(P̄, Q̄))``;
* the gradient correction for divergences whose S = Σ_v qg_v over the *full* vocabulary is not a constant:
  grad_v += w·kd/T·q_v·(S_aug − S), S = all_reduce_sum(S_local). For fkl S = −1 on every shard (no
  correction); for rkl S_local = D_local; for jsd S_local = (1−β)·KL(q‖m) restricted to the shard, which a
  second, loss-only backend call gives (``srkl`` with α = 1−β has exactly that loss);
* the cross-entropy term, whose label lives on one shard: CE = lse(z) − z[label] with
  ∂/∂z = softmax(z) − onehot(label).

DTensor inputs (a ColwiseParallel head's ``Shard(0)`` weight, ``Shard(-1)`` logits) give ``group`` and
``vocab_start`` themselves (:mod:`fastkd.core.sharding`). Every rank returns the same loss value;
gradients are local (each rank's slice of the full gradient).
Collectives per row chunk: one all_gather of (2 or 3, rows) lse values and one all_reduce of the (≤ 3,
rows) partial sums; every rank must use the same chunk rows (the automatic choice is agreed with an
all_reduce(MIN)).

In the fused variant the hidden states are replicated, so the hidden-state gradient is the *sum* of
every rank's partial ``g_r @ W_r``; ``reduce_hidden_grad=True`` (default) all-reduces it, as the
backward of Megatron's "copy to tensor-parallel region" does. Weight / bias gradients stay local.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from fastkd.core import checks as C
from fastkd.core.autograd import scale_grad
from fastkd.core.docs import PARAM_KEYWORDS, TOKEN_KEYWORDS, VOCAB_PARALLEL_KEYWORDS, pick, shared_keywords
from fastkd.core.lmhead import (
    FusedHeadFunction,
    LMHeadChunker,
    auto_chunk_rows,
    backend_chunk_rows,
    check_linear,
)
from fastkd.core.params import DistillParams
from fastkd.core.registry import requested_backend
from fastkd.core.sharding import sharded_entry
from fastkd.distill.fused import DenseAux, DenseChunkLoss
from fastkd.distill.op import backend_fn, make_params

__all__ = ["vocab_parallel_distill_loss", "vocab_parallel_fused_linear_distill_loss", "VP_DIVERGENCES"]

VP_DIVERGENCES = ("fkl", "rkl", "jsd")


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _global_and_rest_lse(local: torch.Tensor, group: dist.ProcessGroup | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """local (k, n) per-shard lse → (global lse, lse over every *other* shard), both (k, n); −inf when empty."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    every = torch.stack(parts)
    others = torch.cat([every[:rank], every[rank + 1:]])
    rest = torch.logsumexp(others, 0) if world > 1 else torch.full_like(local, -math.inf)
    return torch.logsumexp(every, 0), rest


def _rest_terms(div: str, beta: float, lp: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor | None]:
    """Per-row terms of the lumped "other shards" column with masses P̄ = e^lp (teacher), Q̄ = e^lq (student):
    (f(P̄, Q̄), qg(P̄, Q̄), and for jsd Q̄·log(Q̄/M̄) — the srkl(α = 1−β) term). 0·log 0 terms are 0."""
    pb, qb = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    if div == "fkl":
        return torch.where(pb > 0, pb * (lp - lq), zero), -pb, None
    if div == "rkl":
        f = torch.where(qb > 0, qb * (lq - lp), zero)
        return f, f, None
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    kq = torch.where(qb > 0, qb * (lq - lm), zero)
    return torch.where(pb > 0, beta * pb * (lp - lm), zero) + (1 - beta) * kq, (1 - beta) * kq, kq


def _aug_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the augmented rows handed to the backend: fp32 (fp64 for fp64 logits) — the extra column's
    log-mass λ must not be rounded to bf16/fp16, and every backend accepts fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _VPChunk(DenseChunkLoss):
    """One row chunk of the vocabulary-parallel loss (see the module docstring), as an engine chunk loss.

    Called by the engine with the student's chunk logits (c, V_r) (``grad`` aliases them) and by
    :class:`_VPDistillFunction` with logits rows; ``aux``: a :class:`~fastkd.distill.fused.DenseAux`.
    The engine's chunk is processed in sub-chunks of ``sub`` rows (each with its own two small collectives),
    as the dense fused path hands quarter chunks to its backend: two (sub, V_r + 1) workspaces in the
    compute dtype (the augmented student / teacher rows) and the backend's temporaries for ``sub`` rows, so
    the per-rank working set is that of the dense path scaled by V_r / V.
    """

    def __init__(self, params: DistillParams, vocab_start: int, group: dist.ProcessGroup | None, fn, rows: int,
                 reduce_hidden_grad: bool = False, sub: int | None = None):
        super().__init__(params, 0, fn, rows)
        self.vocab_start, self.group, self.reduce_hidden_grad = vocab_start, group, reduce_hidden_grad
        self.sub = rows if sub is None else sub
        self.kd_params = replace(params, ce_weight=0.0, chunk_size=self.sub)
        self.div = params.effective
        self.b_params = (replace(params, divergence="srkl", alpha=1.0 - params.beta, scale_by_t2=False,
                                 ce_weight=0.0, chunk_size=self.sub) if self.div == "jsd" else None)
        self._aug: dict[str, torch.Tensor] = {}

    def _ws(self, name: str, c: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._aug.get(name)
        if buf is None or buf.shape[0] < c or buf.shape[1] != cols or buf.dtype != dtype:
            buf = self._aug[name] = torch.empty(max(c, self.sub), cols, dtype=dtype, device=device)
        return buf[:c]

    def __call__(self, sl, z, grad, w, aux):
        labels = DenseAux(*aux).labels
        t = self.teacher_logits(sl, aux)
        lab = None if labels is None else labels[sl]
        c = z.shape[0]
        if c <= self.sub:
            return self.rows_loss(z, t, lab, w, grad)
        parts = []
        for i in range(0, c, self.sub):
            ss = slice(i, min(c, i + self.sub))
            parts.append(self.rows_loss(z[ss], t[ss], None if lab is None else lab[ss], w[ss],
                                        None if grad is None else grad[ss]))
        return torch.cat(parts)

    def rows_loss(self, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, w: torch.Tensor,
                  grad: torch.Tensor | None) -> torch.Tensor:
        """Per-token loss (c,) of rows s, t (c, V_r); writes w·∂loss/∂s into ``grad`` (may alias ``s``)."""
        p, group = self.params, self.group
        c, vr = s.shape
        cdt = _aug_dtype(s.dtype)
        T, kd = p.temperature, p.kd_scale
        a_s = self._ws("s", c, vr + 1, cdt, s.device)
        a_t = self._ws("t", c, vr + 1, cdt, s.device)
        a_s[:, :vr].copy_(s)
        a_t[:, :vr].copy_(t)
        use_ce = p.ce_weight != 0 and labels is not None
        raw_needed = use_ce and T != 1.0
        stats = [torch.logsumexp(a_s[:, :vr] / T, -1), torch.logsumexp(a_t[:, :vr] / T, -1)]
        if raw_needed:
            stats.append(torch.logsumexp(a_s[:, :vr], -1))
        lse, rest = _global_and_rest_lse(torch.stack(stats), group)
        a_s[:, vr] = rest[0] * T  # the backend divides by T: the column's tempered value is λ
        a_t[:, vr] = rest[1] * T
        f_x, qg_x, kq_x = _rest_terms(self.div, p.beta, rest[1] - lse[1], rest[0] - lse[0])
        s_local = None
        if self.div == "jsd":  # Σ_shard qg = (1−β)·KL(q‖m) on the shard: a loss-only srkl(α=1−β) pass
            s_local = (1 - p.beta) * (self.fn(a_s, a_t, None, w, None, self.b_params) - kq_x)
        need_grad = grad is not None
        loss_aug = self.fn(a_s, a_t, None, w, a_s if need_grad else None, self.kd_params)
        d_local = loss_aug / kd - f_x
        if self.div == "rkl":
            s_local = d_local
        parts = [d_local] + ([s_local] if s_local is not None else [])
        if use_ce:
            local = labels - self.vocab_start
            inside = (local >= 0) & (local < vr)
            z_lab = s.gather(-1, torch.where(inside, local, 0).unsqueeze(-1)).squeeze(-1).to(cdt)
            parts.append(torch.where(inside, z_lab, 0.0))
        sums = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
        keep = w != 0
        loss = kd * sums[0]
        lse_raw = (lse[2] if raw_needed else lse[0]) if use_ce else None
        if use_ce:
            loss = loss + p.ce_weight * (lse_raw - sums[-1])
        loss = torch.where(keep, loss, 0.0)
        if not need_grad:
            return loss
        g = a_s[:, :vr]  # the backend's gradient on the shard's columns (extra column dropped)
        wk = torch.where(keep, w.to(cdt), 0.0)
        if s_local is not None:  # S_aug − S: the full-vocabulary Σ qg differs from the augmented row's
            delta = torch.where(keep, (s_local + qg_x - sums[1]) * wk * (kd / T), 0.0)
            g.addcmul_(torch.exp(s.to(cdt) / T - lse[0].unsqueeze(-1)), delta.unsqueeze(-1))
        if use_ce:
            g.addcmul_(torch.exp(s.to(cdt) - lse_raw.unsqueeze(-1)), (p.ce_weight * wk).unsqueeze(-1))
            rows = torch.nonzero(inside & keep).squeeze(-1)
            g[rows, local[rows]] -= p.ce_weight * wk[rows]
        grad.copy_(g)  # every read of s is above: grad may alias it
        return loss

    def finish(self, student: LMHeadChunker) -> None:
        if self.reduce_hidden_grad and student.grad_hidden is not None:
            _all_reduce(student.grad_hidden, dist.ReduceOp.SUM, self.group)

    def release(self) -> None:
        super().release()
        self._aug = {}


def _rows(chunk_size: int | None, n: int, vocab_local: int, device: torch.device,
          group: dist.ProcessGroup | None, fused: bool) -> int:
    """Rows per chunk, identical on every rank (collectives run per chunk).

    The default is the dense path's choice for the *full* vocabulary (world · V_r columns per head), so the
    per-rank working set is the dense one scaled by V_r / V: the fused path's engine rows
    (:func:`auto_chunk_rows` over student + teacher heads), the logits path's torch-backend rows
    (:func:`backend_chunk_rows`)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size is not None:
        return chunk_size
    full = dist.get_world_size(group) * vocab_local
    n = max(n, 1)
    rows = auto_chunk_rows(n, 2 * full, device) if fused else backend_chunk_rows(n, full)
    agreed = torch.tensor([rows], device=device)
    return int(_all_reduce(agreed, dist.ReduceOp.MIN, group).item())


def _setup(divergence: str, group: dist.ProcessGroup | None, vocab_local: int, vocab_start: int | None,
           kw: dict[str, Any]) -> tuple[DistillParams, int]:
    """The validated params record of a vocabulary-parallel call (``kw``: its shared keywords) and its
    ``vocab_start``."""
    C.check_choice("divergence", divergence, VP_DIVERGENCES)
    if kw["ce_weight"] and kw["labels"] is None:
        raise ValueError("ce_weight > 0 needs labels (the cross-entropy targets)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel losses need torch.distributed initialised (init_process_group)")
    params = make_params(divergence, chunk_size=None, family="vocab_parallel", **pick(kw, PARAM_KEYWORDS))
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * vocab_local
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    return params, vocab_start


def _token_weights(lead: tuple[int, ...], like: torch.Tensor, kw: dict[str, Any]
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    return C.token_weights(lead, like.device, **pick(kw, TOKEN_KEYWORDS),
                           dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


class _VPDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, w, chunk, rows, reduction):
        need = ctx.needs_input_grad[0]
        n = s.shape[0]
        cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
        loss = torch.empty(n, dtype=cdt, device=s.device)
        grad = torch.empty_like(s, memory_format=torch.contiguous_format) if need else None
        try:
            for i in range(0, n, rows):
                sl = slice(i, min(i + rows, n))
                loss[sl] = chunk.rows_loss(s[sl], t[sl], None if labels is None else labels[sl], w[sl],
                                           None if grad is None else grad[sl])
        finally:
            chunk.release()
        ctx.per_row = reduction == "none"
        ctx.used = False
        if need:
            ctx.save_for_backward(grad)
        return C.reduce_tokens(loss, w, reduction, (n,))

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("vocab_parallel_distill_loss: backward ran twice through the same graph after the "
                               "stored CUDA gradient was scaled in place; recompute the loss instead")
        (grad,) = ctx.saved_tensors
        grad, ctx.used = scale_grad(grad, grad_output, ctx.per_row)
        return grad, *([None] * 6)


@sharded_entry("logits", shard_only=True)
@shared_keywords(*VOCAB_PARALLEL_KEYWORDS)
def vocab_parallel_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    **kw: Any,
) -> torch.Tensor:
    """:func:`fastkd.distill_loss` for vocabulary-sharded logits (one shard per rank of ``group``).

    Args:
        student_logits, teacher_logits: (..., V_r) this rank's columns of the full (..., V) logits.
        divergence: "fkl", "rkl" or "jsd" (with ``beta``).
        group: the tensor-parallel process group (None = the default group).
        vocab_start: global index of this rank's first column (default rank · V_r: equal shards).
        {shared}
        ``labels`` are *global* vocabulary ids (or ignore_index); the CE term finds each label's shard.
        chunk_size: rows per chunk (every rank must agree; default from the LM-head engine's budget, agreed
            across ranks). The backend computes the divergence on the augmented shard ("auto": Triton for
            CUDA tensors).

    Returns: the full loss (fp32 scalar, (...,) for "none"), identical on every rank; the gradient
    reaching ``student_logits`` is this rank's (..., V_r) slice of the full gradient.
    """
    C.check_float_tensor("student_logits", student_logits)
    C.check_float_tensor("teacher_logits", teacher_logits)
    C.check_constant("teacher_logits", teacher_logits)
    C.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same (sharded) shape")
    ce_weight, reduction = kw["ce_weight"], kw["reduction"]
    params, vocab_start = _setup(divergence, group, student_logits.shape[-1], vocab_start, kw)
    lead = tuple(student_logits.shape[:-1])
    w, flat_labels = _token_weights(lead, student_logits, kw)
    n = w.numel()
    s2 = student_logits.reshape(n, -1)
    t2 = teacher_logits.reshape(n, -1)
    rows = _rows(kw["chunk_size"], n, s2.shape[1], s2.device, group, fused=False)
    chunk = _VPChunk(params, vocab_start, group, backend_fn(requested_backend(kw["backend"])), rows)
    out = _VPDistillFunction.apply(s2, t2, flat_labels if ce_weight else None, w, chunk, rows, reduction)
    return out.view(lead) if reduction == "none" else out


@sharded_entry("fused", shard_only=True)
@shared_keywords(*VOCAB_PARALLEL_KEYWORDS)
def vocab_parallel_fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "fkl",
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
    **kw: Any,
) -> torch.Tensor:
    """:func:`fastkd.fused_linear_distill_loss` for column-parallel (vocabulary-sharded) LM heads.

    Args:
        student_hidden: (..., H) replicated on every rank. student_weight: (V_r, H) this rank's shard
            (student_bias (V_r,)). teacher_hidden (..., Ht) replicated + teacher_weight (V_r, Ht) shard,
            or teacher_logits (..., V_r). reduce_hidden_grad: all-reduce the hidden-state gradient.
        {shared}
        chunk_size: as :func:`vocab_parallel_distill_loss` (and ``labels`` are global ids, as there). With
            reduction="none" every rank must run the backward (it re-runs the chunks, with their collectives).

    Runs on the LM-head engine: peak extra memory O(chunk_size · V_r); never forms full logits on any rank.
    """
    check_linear("student", student_hidden, student_weight, student_bias)
    lead = tuple(student_hidden.shape[:-1])
    n = math.prod(lead)
    if teacher_logits is not None:
        C.check_float_tensor("teacher_logits", teacher_logits)
        C.check_constant("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != (*lead, student_weight.shape[0]):
            raise ValueError(f"teacher_logits must have shape {(*lead, student_weight.shape[0])}, "
                             f"got {tuple(teacher_logits.shape)}")
        tl = teacher_logits.reshape(n, -1).to(student_hidden.dtype)
        th = None
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("pass teacher_hidden and teacher_weight (or teacher_logits)")
        check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
        for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                        ("teacher_bias", teacher_bias)):
            C.check_constant(name, x)
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"teacher_weight shard has {teacher_weight.shape[0]} rows but student_weight "
                             f"has {student_weight.shape[0]}; shards must cover the same vocabulary columns")
        th, tl = teacher_hidden.reshape(n, -1), None
    ce_weight, reduction = kw["ce_weight"], kw["reduction"]
    params, vocab_start = _setup(divergence, group, student_weight.shape[0], vocab_start, kw)
    w, flat_labels = _token_weights(lead, student_hidden, kw)
    rows = _rows(kw["chunk_size"], n, student_weight.shape[0], student_hidden.device, group, fused=True)
    # the engine's GEMM chunk stays ``rows``; the vocabulary-parallel math runs on quarter chunks, as the
    # dense fused path's backend calls do
    chunk = _VPChunk(params, vocab_start, group, backend_fn(requested_backend(kw["backend"])), rows,
                     reduce_hidden_grad=reduce_hidden_grad, sub=max(8, rows // 4))
    loss = FusedHeadFunction.apply(student_hidden.reshape(n, -1), student_weight, student_bias, w, chunk, rows,
                                   reduction, None, *DenseAux(th, teacher_weight, teacher_bias, tl,
                                                              flat_labels if ce_weight else None))
    return loss.view(lead) if reduction == "none" else loss
