"""Optimal-transport-flavoured distillation losses: SinKD and ULD.

* :func:`sinkd_loss` — SinKD (Cui et al., arXiv 2402.17110), a batch-wise Sinkhorn distance.
* :func:`uld_loss` — Universal Logit Distillation (Boizard et al., arXiv 2402.12030): the closed-form 1-D
  Wasserstein-1 between sorted probability vectors, usable across tokenizers (vocabularies may differ).

Both compute statistics in fp32 (fp64 for fp64 inputs), return an fp32 loss, and give the student's
gradient in its own dtype; teacher logits are constants (a teacher that requires grad is a ValueError).
"""

from __future__ import annotations

import torch

from fastkd.core import checks as C

# Elements per fp32 temporary in one chunk (rows × vocabulary, or rows × rows × vocabulary for SinKD).
_CHUNK_ELEMS = 1 << 22


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, same_vocab: bool) -> None:
    C.check_float_tensor("student_logits", student_logits)
    C.check_float_tensor("teacher_logits", teacher_logits)
    C.check_constant("teacher_logits", teacher_logits)
    C.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(f"student_logits and teacher_logits must have one dtype, got {student_logits.dtype} "
                        f"and {teacher_logits.dtype}")
    if tuple(student_logits.shape[:-1]) != tuple(teacher_logits.shape[:-1]):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must match in every dimension but the last")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if t.shape[-1] == 0:
            raise ValueError(f"{name} has an empty vocabulary (last dimension): a distribution needs V >= 1")
    if same_vocab and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student_logits and teacher_logits must have one vocabulary size, got "
                         f"{student_logits.shape[-1]} and {teacher_logits.shape[-1]}")


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# SinKD
# ---------------------------------------------------------------------------------------------------------


class _PairwiseL1(torch.autograd.Function):
    """W_ij = Σ_v |p_i,v − t_j,v| for p (B, V), t (B', V) constant; chunked over t's rows (O(chunk) memory).

    Backward: ∂/∂p_i = Σ_j G_ij sign(p_i − t_j), recomputed chunk by chunk.
    """

    @staticmethod
    def forward(ctx, p, t):
        rows = max(1, _CHUNK_ELEMS // max(1, p.shape[0] * p.shape[1]))
        w = torch.cat([(p[:, None, :] - t[None, j:j + rows, :]).abs().sum(-1)
                       for j in range(0, t.shape[0], rows)], dim=1)
        ctx.save_for_backward(p, t)
        ctx.rows = rows
        return w

    @staticmethod
    def backward(ctx, gw):
        p, t = ctx.saved_tensors
        gp = torch.zeros_like(p)
        for j in range(0, t.shape[0], ctx.rows):
            sign = torch.sign(p[:, None, :] - t[None, j:j + ctx.rows, :])
            gp += (gw[:, j:j + ctx.rows, None] * sign).sum(1)
        return gp, None


def sinkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    eps: float = 0.1,
    n_iter: int = 20,
) -> torch.Tensor:
    """SinKD's batch-wise Sinkhorn loss.

    With p_s = softmax(student/T), p_t = softmax(teacher/T), rows (B, V) (leading dimensions are flattened
    into B): W_ij = ‖p_s,i − p_t,j‖₁ (B, B); P = exp(−W/ε); ``n_iter`` times P ← P / (row sums), then
    P ← P / (column sums); loss = ⟨P, W⟩ / B. The gradient is autograd through W and every normalisation
    (P is not detached). The normalisations run in the log domain (log P ← log P − logsumexp), which is the
    same P and gradient but stays finite at small ε in fp32 (where exp(−W/ε) of a whole row underflows).
    W is built in chunks: peak extra memory O(B·V + chunk), not O(B²·V).

    Args:
        student_logits: (B, V) (or (..., V)) fp32/bf16/fp16/fp64; receives the gradient.
        teacher_logits: same shape and dtype; a constant.
        temperature: T > 0. eps: ε > 0. n_iter: int ≥ 0 normalisation rounds.

    Returns:
        fp32 scalar (fp64 for fp64 inputs).
    """
    _check_pair(student_logits, teacher_logits, same_vocab=True)
    C.check_positive("temperature", temperature)
    C.check_positive("eps", eps)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    dt = _stat_dtype(student_logits)
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).to(dt)
    t = teacher_logits.reshape(-1, v).to(dt)
    if s.shape[0] == 0:
        return s.sum() * 0
    ps = torch.softmax(s / temperature, dim=-1)
    pt = torch.softmax(t / temperature, dim=-1)
    w = _PairwiseL1.apply(ps, pt)
    # The normalisations run on log P: the same P and the same autograd gradient as dividing by the sums,
    # but exp(−W/ε) of a whole row can underflow at small ε (fp32: W/ε > ~87), and then 0/0 gave NaN.
    log_p = -w / eps
    for _ in range(n_iter):
        log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, 0, keepdim=True)
    return (log_p.exp() * w).sum() / s.shape[0]


# ---------------------------------------------------------------------------------------------------------
# ULD
# ---------------------------------------------------------------------------------------------------------


def _uld_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Per-row ULD loss for tempered-logit chunks s (r, Vs), t (r, Vt) in the stat dtype (differentiable)."""
    q = torch.softmax(s / temperature, dim=-1)
    p = torch.softmax(t / temperature, dim=-1)
    if top_k is None:
        qs = q.sort(dim=-1, descending=True).values
        ps = p.sort(dim=-1, descending=True).values
        k = min(qs.shape[-1], ps.shape[-1])
        # Zero padding of the shorter side: its missing ranks contribute the longer side's tail as is.
        return (qs[:, :k] - ps[:, :k]).abs().sum(-1) + qs[:, k:].sum(-1) + ps[:, k:].sum(-1)
    qs = q.topk(min(top_k, q.shape[-1]), dim=-1).values
    ps = p.topk(min(top_k, p.shape[-1]), dim=-1).values
    k = min(qs.shape[-1], ps.shape[-1])
    head = (qs[:, :k] - ps[:, :k]).abs().sum(-1) + qs[:, k:].sum(-1) + ps[:, k:].sum(-1)
    tail = (1 - qs.sum(-1)) - (1 - ps.sum(-1))
    return head + tail.abs()


class _ULDFunction(torch.autograd.Function):
    """Loss and weighted gradient in forward (chunk by chunk), gradient scaling in backward.

    ``reduce``: return Σ_i weight_i · loss_i (scalar); else the per-row losses (weight is then the 0/1 keep
    mask). Rows with weight 0 get loss 0 and gradient 0 whatever their logits are.
    """

    @staticmethod
    def forward(ctx, student, teacher, weight, temperature, top_k, reduce):
        n, vs = student.shape
        dt = _stat_dtype(student)
        rows = max(1, _CHUNK_ELEMS // max(vs, teacher.shape[1]))
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if need_grad else None
        losses = []
        for r0 in range(0, n, rows):
            w = weight[r0:r0 + rows]
            keep = w != 0
            with torch.enable_grad():
                s = student[r0:r0 + rows].detach().to(dt).requires_grad_(need_grad)
                loss = _uld_rows(s, teacher[r0:r0 + rows].to(dt), temperature, top_k)
                loss = torch.where(keep, loss, torch.zeros_like(loss))
                if need_grad:
                    (gs,) = torch.autograd.grad((loss * w).sum(), s)
                    grad[r0:r0 + rows] = torch.where(keep[:, None], gs, torch.zeros_like(gs)).to(grad.dtype)
            losses.append(loss.detach())
        loss = torch.cat(losses) if losses else torch.zeros(0, dtype=dt, device=student.device)
        ctx.reduce = reduce
        if grad is not None:
            ctx.save_for_backward(grad)
        return (loss * weight).sum() if reduce else loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scale = grad_out if ctx.reduce else grad_out[:, None]
        return grad * scale.to(grad.dtype), None, None, None, None, None


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    top_k: int | None = None,
) -> torch.Tensor:
    """Universal Logit Distillation loss (cross-tokenizer).

    Per token: q = softmax(student/T) sorted descending, p = softmax(teacher/T) sorted descending, the
    shorter one zero-padded to max(Vs, Vt); loss = Σ_r |q_(r) − p_(r)| (the 1-D Wasserstein-1 distance
    between the two sorted distributions on ranks). Tokens are excluded with ``labels == ignore_index``
    or ``mask == False``; ``reduction`` "mean" (over kept tokens), "sum", "none", or "sequence_mean":
    (B, T, V) inputs only, the mean over each sequence's kept tokens, then the mean over the sequences
    that keep any token (0 if none). "sequence_mean" is the reduction of the ULD paper's code and of
    TRL's GOLD trainer (per-sequence sum / answer length, then the batch mean); "mean" weights every
    token equally, so the two differ when sequences keep different numbers of tokens.

    ``top_k``: only the k largest probabilities of each side are sorted (torch.topk, O(V) memory and
    time per row instead of a full sort); the rest is one tail bucket per side, compared by its mass:
    L_k = Σ_{r<k} |q_(r) − p_(r)| + |tail_q − tail_p|. Since Σ_{r≥k} |q_(r) − p_(r)| lies between
    |tail_q − tail_p| and tail_q + tail_p, the exact loss satisfies
    0 ≤ L − L_k ≤ 2 · min(tail_q, tail_p)  (tail = 1 − top-k mass).

    Memory: rows are processed in chunks of ~4M elements; the only (N, V) buffer kept is the student's
    gradient (computed in the forward pass, scaled in backward).

    Args:
        student_logits: (..., Vs); teacher_logits: (..., Vt), the same leading shape and dtype.
    Returns:
        fp32 scalar (fp64 for fp64 inputs), or (...) per token for reduction="none".
    """
    _check_pair(student_logits, teacher_logits, same_vocab=False)
    C.check_positive("temperature", temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    lead = tuple(student_logits.shape[:-1])
    dt = _stat_dtype(student_logits)
    per_seq = reduction == "sequence_mean"
    if per_seq and student_logits.dim() != 3:
        raise ValueError("reduction='sequence_mean' averages per sequence and needs (B, T, V) logits, got "
                         f"student_logits of shape {tuple(student_logits.shape)}")
    weight, _ = C.token_weights(lead, student_logits.device, labels=labels, ignore_index=ignore_index,
                                mask=mask, reduction="sum" if per_seq else reduction, num_items_in_batch=None,
                                dtype=dt)
    if per_seq:  # 0/1 keep -> 1 / (kept tokens of the sequence · sequences keeping any token); no sync
        keep = weight.view(lead)
        count = keep.sum(1, keepdim=True)
        weight = (keep / count.clamp_min(1) / (count > 0).sum().clamp_min(1)).reshape(-1)
    n = weight.numel()
    s2 = student_logits.reshape(n, student_logits.shape[-1])
    t2 = teacher_logits.reshape(n, teacher_logits.shape[-1])
    if reduction == "none":
        return _ULDFunction.apply(s2, t2, weight, float(temperature), top_k, False).view(lead)
    return _ULDFunction.apply(s2, t2, weight, float(temperature), top_k, True)
