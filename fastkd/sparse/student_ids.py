"""Student-proposed ids for teachers that can only score given ids (served teachers), and the union of ids.

A teacher behind an inference server returns log-probabilities at ids it is *given* (prompt log-probs at
chosen continuations) and, at best, its own top-k. Reverse KL and JSD need the teacher's log-probs where the
*student* puts its mass, which the teacher's top-k does not cover. The two-phase recipe:

1. Student pass: ``ids, _ = student_topk_from_hidden(h_s, W_s, k)`` (chunked through the LM-head engine; never
   an (N, V) tensor) or ``student_topk(student_logits, k)`` — the student's k most likely ids per token.
2. Teacher: score those ids (log p_T at each of them) and, optionally, return its own top-k ids + log-probs.
3. Loss: either ``sparse_distill_loss(z, ids, teacher_logp_at_ids, mode="topk_tail", divergence=...)`` (K student
   buckets + the tail bucket, any sparse divergence) or ``mode="union"`` with the teacher's own top-k as
   ``teacher_ids`` / ``teacher_values`` and the student's ids as ``student_ids`` / ``student_id_values`` (the
   *teacher's* values at the student's ids, in the same ``values`` units). :func:`union_ids` merges the two
   sources into one row: an id present in both keeps the teacher-chosen slot and value (both are the teacher's
   probability of the same id), the student slot becomes padding (−1); padding in either source stays padding.
   The merged row is then a ``topk_tail`` row: buckets at the union's ids + one tail bucket for the rest.

As k → V each mode becomes the dense loss of the same divergence (the buckets cover the vocabulary and the
tail is empty); ``tests/sparse/test_student_ids.py`` checks it against float64.
"""

from __future__ import annotations

import torch

from fastkd.core import checks as C
from fastkd.core.lmhead import amp_dtype, auto_chunk_rows, check_linear, iter_logits


def _check_k(k: object, vocab: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    return k


def _topk_logprobs(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs) of the k largest entries of rows z (c, V): log q = z − logsumexp(z), in fp32/fp64
    (a bf16/fp16 chunk is converted once, O(c · V))."""
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    top = z.topk(k, dim=-1)
    lse = torch.logsumexp(z.to(cdt), dim=-1, keepdim=True)
    return top.indices, top.values.to(cdt) - lse


@torch.no_grad()
def student_topk(student_logits: torch.Tensor, k: int, *, temperature: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's k most likely ids per token and its log-probs there (no gradient).

    Args:
        student_logits: (..., V) float logits.
        k: ids per token, 1 ≤ k ≤ V.
        temperature: the student distribution is softmax(z / T) (T only changes the returned log-probs).

    Returns:
        ids (..., k) int64, in decreasing student probability; logprobs (..., k) fp32 (fp64 for fp64 logits),
        ``log_softmax(z / T)`` at the ids.
    """
    C.check_float_tensor("student_logits", student_logits)
    C.check_positive("temperature", temperature)
    vocab = student_logits.shape[-1]
    _check_k(k, vocab)
    lead = tuple(student_logits.shape[:-1])
    z = student_logits.detach().reshape(-1, vocab)
    n = z.shape[0]
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    ids = torch.empty(n, k, dtype=torch.int64, device=z.device)
    logp = torch.empty(n, k, dtype=cdt, device=z.device)
    rows = auto_chunk_rows(max(n, 1), vocab, z.device)
    for start in range(0, n, rows):  # row chunks: the fp32 copy (z / T in fp32, not in bf16) is O(chunk · V)
        sl = slice(start, min(n, start + rows))
        zc = z[sl].to(cdt)  # may be the caller's own fp32/fp64 tensor: never modified in place
        ids[sl], logp[sl] = _topk_logprobs(zc / temperature if temperature != 1.0 else zc, k)
    return ids.view(*lead, k), logp.view(*lead, k)


@torch.no_grad()
def student_topk_from_hidden(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    k: int,
    *,
    student_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`student_topk` of ``softcap(h @ W.T + b) / T`` without materialising the (N, V) logits.

    Args:
        student_hidden: (..., H); student_weight: (V, H) as ``nn.Linear.weight``; student_bias: (V,) or None.
        softcap: Gemma-style cap applied before the temperature, as in the fused losses.
        chunk_size: tokens per chunk (default: the LM-head engine's memory budget); extra memory O(chunk · V).
            Under ``torch.autocast`` the logits are computed in the autocast dtype (like ``nn.Linear``).

    Returns:
        ids (..., k) int64 and log-probs (..., k) fp32 (fp64 for fp64 heads), as :func:`student_topk`.
    """
    amp = amp_dtype(student_hidden, student_weight)
    check_linear("student", student_hidden, student_weight, student_bias, amp=amp is not None)
    C.check_positive("temperature", temperature)
    if softcap is not None:
        C.check_positive("softcap", softcap)
    vocab = student_weight.shape[0]
    _check_k(k, vocab)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = tuple(student_hidden.shape[:-1])
    h = student_hidden.detach().reshape(-1, student_hidden.shape[-1])
    n = h.shape[0]
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    ids = torch.empty(n, k, dtype=torch.int64, device=h.device)
    logp = torch.empty(n, k, dtype=cdt, device=h.device)
    rows = chunk_size or auto_chunk_rows(max(n, 1), vocab, h.device)
    with torch.autocast(h.device.type, enabled=False):  # iter_logits writes into a preallocated workspace
        for sl, z in iter_logits(h, student_weight.detach(),
                                 None if student_bias is None else student_bias.detach(), rows, softcap=softcap,
                                 temperature=temperature, dtype=amp):
            ids[sl], logp[sl] = _topk_logprobs(z, k)
    return ids.view(*lead, k), logp.view(*lead, k)


def union_ids(
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    student_ids: torch.Tensor,
    student_id_values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of ids per token from the teacher's and the student's ids, each id once.

    Args:
        teacher_ids: (..., Kt) integer, −1 = padding; teacher_values: (..., Kt) the teacher's values there.
        student_ids: (..., Ks) integer, −1 = padding; student_id_values: (..., Ks) the *teacher's* values at
            the student's ids (same units as ``teacher_values``).

    Returns:
        ids (..., Kt + Ks) int64 and values (..., Kt + Ks) in the promoted float dtype: the teacher slots first,
        then the student slots. A repeated id (across or within the sources) keeps its first slot — the
        teacher's when both chose it — and later slots become −1 (their values are kept but unused).
        Ids outside [−1, V) are left as they are for the loss's own check.
    """
    for name, t in (("teacher_ids", teacher_ids), ("student_ids", student_ids)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, t in (("teacher_values", teacher_values), ("student_id_values", student_id_values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if teacher_values.shape != teacher_ids.shape:
        raise ValueError(f"teacher_values shape {tuple(teacher_values.shape)} must equal teacher_ids shape "
                         f"{tuple(teacher_ids.shape)}")
    if student_id_values.shape != student_ids.shape:
        raise ValueError(f"student_id_values shape {tuple(student_id_values.shape)} must equal student_ids shape "
                         f"{tuple(student_ids.shape)}")
    if teacher_ids.dim() < 1 or teacher_ids.shape[:-1] != student_ids.shape[:-1]:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and student_ids {tuple(student_ids.shape)} must "
                         "have the same leading (token) dimensions")
    ids = torch.cat([teacher_ids.long(), student_ids.long().to(teacher_ids.device)], dim=-1)
    vdt = torch.promote_types(teacher_values.dtype, student_id_values.dtype)
    vals = torch.cat([teacher_values.to(vdt), student_id_values.to(vdt).to(teacher_values.device)], dim=-1)
    # a stable sort keeps equal ids in slot order, so the first slot of each id (teacher before student) leads
    srt, order = ids.sort(dim=-1, stable=True)
    later = torch.zeros_like(srt, dtype=torch.bool)
    later[..., 1:] = srt[..., 1:] == srt[..., :-1]
    dup = torch.zeros_like(later).scatter_(-1, order, later)
    return torch.where(dup, -1, ids), vals
