"""Vocabulary-parallel distillation losses for tensor-parallel LM heads.

Each rank of ``group`` holds one contiguous vocabulary shard: logits ``(..., V_r)`` (or an LM-head weight
shard ``(V_r, H)`` with replicated hidden states ``(N, H)``), columns ``[vocab_start, vocab_start + V_r)``
of the full vocabulary. The softmax statistics are combined with ``torch.distributed.all_reduce``:

    m = all_reduce_max(max_v z)            Z = all_reduce_sum(Σ_v exp(z − m))       lse = m + log Z

then each rank forms its shard of log q = s/T − lse_s and log p = t/T − lse_t and the per-token loss is
``all_reduce_sum`` of the shard's partial sums. Gradients are local (each rank's slice of the full
gradient), computed in forward like :func:`fastkd.distill_loss`:

    fkl:  loss = Σ p (log p − log q)                    ∂/∂(s/T) = q − p
    rkl:  loss = Σ q (log q − log p)  = Σ q a            ∂/∂(s/T) = q (a − Σ q a),  a = log q − log p
    jsd:  loss = β KL(p‖m) + (1−β) KL(q‖m), m = βp+(1−β)q ∂/∂(s/T) = q (a − Σ q a),  a = (1−β) log(q/m)
    ce:   CE = lse(s) − s[label]                         ∂/∂s = softmax(s) − onehot(label)

(β = 0 / 1 are fkl / rkl exactly, as in :func:`fastkd.distill_loss`). Every rank returns the same
loss value. Collectives per row chunk: 2 (max, sum-exp) + 1 (loss sums; also Σ q a and the label logit),
all on (3, rows)-sized fp32 tensors; every rank must call with the same number of rows.

In the fused variant the hidden states are replicated, so the hidden-state gradient is the *sum* of
every rank's partial ``g_r @ W_r``; ``reduce_hidden_grad=True`` (default) all-reduces it, as the
backward of Megatron's "copy to tensor-parallel region" does. Weight / bias gradients stay local.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastkd.core import checks as C
from fastkd.core.autograd import scale_grad
from fastkd.core.params import DistillParams
from fastkd.distill.op import make_params

__all__ = ["vocab_parallel_distill_loss", "vocab_parallel_fused_linear_distill_loss", "VP_DIVERGENCES"]

VP_DIVERGENCES = ("fkl", "rkl", "jsd")
_DEFAULT_ROWS = 1024


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _lse(z: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global log-sum-exp over the sharded last dim of z (k, n, V_r) → (k, n)."""
    m = _all_reduce(z.amax(-1), dist.ReduceOp.MAX, group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: lse = -inf below
    se = _all_reduce(torch.exp(z - m.unsqueeze(-1)).sum(-1), dist.ReduceOp.SUM, group)
    return m + torch.log(se)


def _chunk(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, w: torch.Tensor,
           p: DistillParams, vocab_start: int, group: dist.ProcessGroup | None,
           need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss (n,) and the local gradient slice w·∂loss/∂s (n, V_r) (compute dtype) for a chunk."""
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    T = p.temperature
    ss, ts = s.to(cdt) / T, t.to(cdt) / T
    use_ce = p.ce_weight != 0 and labels is not None
    raw_needed = use_ce and T != 1.0
    zs = torch.stack([ss, ts, s.to(cdt)]) if raw_needed else torch.stack([ss, ts])
    lse = _lse(zs, group)
    log_q = ss - lse[0].unsqueeze(-1)
    log_p = ts - lse[1].unsqueeze(-1)
    q, pt = torch.exp(log_q), torch.exp(log_p)
    zero = torch.zeros((), dtype=cdt, device=s.device)
    div = p.effective
    if div == "fkl":
        elem = torch.where(pt > 0, pt * (log_p - log_q), zero)
        a = None
    elif div == "rkl":
        a = torch.where(q > 0, log_q - log_p, zero)
        elem = q * a
    else:
        b = p.beta
        log_m = torch.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
        elem = (torch.where(pt > 0, b * pt * (log_p - log_m), zero)
                + torch.where(q > 0, (1 - b) * q * (log_q - log_m), zero))
        a = torch.where(q > 0, (1 - b) * (log_q - log_m), zero)
    parts = [elem.sum(-1), (q * a).sum(-1) if a is not None else torch.zeros_like(lse[0])]
    if use_ce:
        local = labels - vocab_start
        inside = (local >= 0) & (local < s.shape[-1])
        z_lab = s.to(cdt).gather(-1, torch.where(inside, local, 0).unsqueeze(-1)).squeeze(-1)
        parts.append(torch.where(inside, z_lab, zero))
    sums = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
    keep = w != 0
    loss = p.kd_scale * sums[0]
    if use_ce:
        lse_raw = lse[2] if raw_needed else lse[0]
        loss = loss + p.ce_weight * (lse_raw - sums[2])
    loss = torch.where(keep, loss, zero)
    if not need_grad:
        return loss, None
    g = q - pt if a is None else q * (a - sums[1].unsqueeze(-1))
    g = g * (p.kd_scale / T)
    if use_ce:
        sm = torch.exp(s.to(cdt) - (lse[2] if raw_needed else lse[0]).unsqueeze(-1))
        g = g + p.ce_weight * sm
        rows = torch.nonzero(inside & keep).squeeze(-1)
        g[rows, local[rows]] -= p.ce_weight
    g = torch.where(keep.unsqueeze(-1), g * w.unsqueeze(-1), zero)
    return loss, g


def _rows(chunk_size: int | None) -> int:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size or _DEFAULT_ROWS


def _setup(divergence: str, group: dist.ProcessGroup | None, vocab_local: int, vocab_start: int | None,
           **kw) -> tuple[DistillParams, int]:
    C.check_choice("divergence", divergence, VP_DIVERGENCES)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel losses need torch.distributed initialised (init_process_group)")
    params = make_params(divergence, alpha=0.1, mu=0.5, t=0.5, chunk_size=None, **kw)
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * vocab_local
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    return params, vocab_start


class _VPDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, w, params, vocab_start, group, rows, reduction):
        need = ctx.needs_input_grad[0]
        n = s.shape[0]
        cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
        loss = torch.empty(n, dtype=cdt, device=s.device)
        grad = torch.empty_like(s) if need else None
        for i in range(0, n, rows):
            sl = slice(i, min(i + rows, n))
            li, gi = _chunk(s[sl], t[sl], None if labels is None else labels[sl], w[sl], params, vocab_start,
                            group, need)
            loss[sl] = li
            if need:
                grad[sl] = gi
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
        return grad, *([None] * 8)


def vocab_parallel_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    ce_weight: float = 0.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`fastkd.distill_loss` for vocabulary-sharded logits (one shard per rank of ``group``).

    Args:
        student_logits, teacher_logits: (..., V_r) this rank's columns of the full (..., V) logits.
        divergence: "fkl", "rkl" or "jsd" (with ``beta``).
        group: the tensor-parallel process group (None = the default group).
        vocab_start: global index of this rank's first column (default rank · V_r: equal shards).
        labels: (...,) *global* vocabulary ids (or ignore_index); the CE term finds each label's shard.
        Others: as :func:`fastkd.distill_loss`. chunk_size: rows per chunk (every rank must agree).

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
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels (the cross-entropy targets)")
    params, vocab_start = _setup(divergence, group, student_logits.shape[-1], vocab_start,
                                 temperature=temperature, scale_by_t2=scale_by_t2, beta=beta,
                                 ce_weight=ce_weight)
    lead = tuple(student_logits.shape[:-1])
    wdt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    w, flat_labels = C.token_weights(lead, student_logits.device, labels=labels, ignore_index=ignore_index,
                                     mask=mask, reduction=reduction, num_items_in_batch=num_items_in_batch,
                                     dtype=wdt)
    n = w.numel()
    s2 = student_logits.reshape(n, -1)
    t2 = teacher_logits.reshape(n, -1)
    out = _VPDistillFunction.apply(s2, t2, flat_labels if ce_weight else None, w, params, vocab_start, group,
                                   _rows(chunk_size), reduction)
    return out.view(lead) if reduction == "none" else out


class _VPFusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, wt, b, th, twt, tb, tlog, labels, w, params, vocab_start, group, rows, reduction,
                reduce_hidden_grad):
        n = h.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need = need_h or need_w or need_b
        cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
        loss = torch.empty(n, dtype=cdt, device=h.device)
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.zeros(wt.shape, dtype=cdt, device=wt.device) if need_w else None
        gb = torch.zeros(wt.shape[0], dtype=cdt, device=wt.device) if need_b else None
        for i in range(0, n, rows):
            sl = slice(i, min(i + rows, n))
            zs = torch.nn.functional.linear(h[sl], wt, b)
            zt = tlog[sl] if tlog is not None else torch.nn.functional.linear(th[sl], twt, tb)
            li, g = _chunk(zs, zt, None if labels is None else labels[sl], w[sl], params, vocab_start, group,
                           need)
            loss[sl] = li
            if need:
                g = g.to(h.dtype)
                if need_h:
                    gh[sl] = g @ wt
                if need_w:
                    gw += (g.t() @ h[sl]).to(cdt)
                if need_b:
                    gb += g.sum(0).to(cdt)
        if need_h and reduce_hidden_grad:
            gh = _all_reduce(gh, dist.ReduceOp.SUM, group)
        ctx.per_row = reduction == "none"
        ctx.save_for_backward(gh, None if gw is None else gw.to(wt.dtype),
                              None if gb is None else gb.to(wt.dtype))
        return C.reduce_tokens(loss, w, reduction, (n,))

    @staticmethod
    def backward(ctx, grad_output):
        gh, gw, gb = ctx.saved_tensors
        if ctx.per_row:  # per-token grad_output: recomputation would be needed for W; refuse clearly
            raise RuntimeError("vocab_parallel_fused_linear_distill_loss: backward of reduction='none' is "
                               "not supported; use 'mean' or 'sum'")
        out = [None if x is None else x * grad_output.to(x.dtype) for x in (gh, gw, gb)]
        return (*out, *([None] * 12))


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
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    ce_weight: float = 0.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`fastkd.fused_linear_distill_loss` for column-parallel (vocabulary-sharded) LM heads.

    Args:
        student_hidden: (..., H) replicated on every rank. student_weight: (V_r, H) this rank's shard
            (student_bias (V_r,)). teacher_hidden (..., Ht) replicated + teacher_weight (V_r, Ht) shard,
            or teacher_logits (..., V_r). reduce_hidden_grad: all-reduce the hidden-state gradient.
        Others: as :func:`vocab_parallel_distill_loss`; reduction "mean" or "sum" (no "none").

    Peak extra memory O(chunk_size · V_r); never forms full logits on any rank.
    """
    from fastkd.core.lmhead import check_linear

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
    if reduction == "none":
        raise ValueError("reduction must be 'mean' or 'sum' for the vocab-parallel fused loss, got 'none'")
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels (the cross-entropy targets)")
    params, vocab_start = _setup(divergence, group, student_weight.shape[0], vocab_start,
                                 temperature=temperature, scale_by_t2=scale_by_t2, beta=beta,
                                 ce_weight=ce_weight)
    wdt = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    w, flat_labels = C.token_weights(lead, student_hidden.device, labels=labels, ignore_index=ignore_index,
                                     mask=mask, reduction=reduction, num_items_in_batch=num_items_in_batch,
                                     dtype=wdt)
    return _VPFusedFunction.apply(student_hidden.reshape(n, -1), student_weight, student_bias, th,
                                  teacher_weight, teacher_bias, tl, flat_labels if ce_weight else None, w,
                                  params, vocab_start, group, _rows(chunk_size), reduction,
                                  reduce_hidden_grad)
