"""``fastkd.fused_linear_distill_loss``: distillation through the LM head without full logits.

The LM-head engine (:mod:`fastkd.core.lmhead`) owns the chunk loop, the chunk size
(``FASTKD_CHUNK_MB``), the softcap, the reused logits workspaces and the in-place gradient accumulation;
this module supplies its per-chunk loss, :class:`DenseChunkLoss`: the teacher's chunk logits (from a
second engine head over its hidden states + LM head, or sliced from given logits) and one ``distill``
backend (torch, Triton or CUDA, chosen by the registry) run on the chunk with the gradient written in
place of the chunk's student logits. Peak extra memory is O(chunk · V), independent of N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from fastkd.core import checks as C
from fastkd.core.docs import DENSE_KEYWORDS, PARAM_KEYWORDS, TOKEN_KEYWORDS, pick, shared_keywords
from fastkd.core.lmhead import (
    FusedHeadFunction,
    HeadOptions,
    LMHeadChunker,
    amp_dtype,
    auto_chunk_rows,
    check_linear,
    chunk_bytes_per_col,
    softcap_,
)
from fastkd.core.params import DistillParams
from fastkd.core.registry import requested_backend
from fastkd.core.selection import with_token_selection
from fastkd.core.sharding import sharded_entry
from fastkd.core.stats import new_buffer as new_stats_buffer
from fastkd.core.stats import stats_dict
from fastkd.distill import mixture as MX
from fastkd.distill.mixture import DenseAux
from fastkd.distill.op import backend_fn, make_params


class DenseChunkLoss:
    """The per-chunk loss of :func:`fused_linear_distill_loss` for :func:`~fastkd.core.lmhead.run_chunks`.

    aux: a :class:`DenseAux`. The teacher's chunk logits come from a second engine head (hidden states + LM
    head, its own reused workspace; softcap ``params.softcap``, logit scale ``teacher_scale``, compute dtype
    ``teacher_dtype``) or
    are copied from ``t_logits`` into a reused buffer when a scale, a softcap or a dtype cast (AMP) must be
    applied; then one ``distill`` backend runs on the chunk with the
    gradient written in place of the student's chunk logits. Vocabulary padding columns beyond ``vocab``
    get a zero gradient. ``stats``: an (N, 4) fp32 buffer (:mod:`fastkd.core.stats`) whose chunk rows the
    backend fills in the same call, or None; set it to None once the forward pass is done so that the
    ``reduction="none"`` backward re-run does not compute the statistics again.
    """

    def __init__(self, params: DistillParams, vocab: int, fn: Callable[..., torch.Tensor], rows: int,
                 stats: torch.Tensor | None = None, teacher_scale: float = 1.0,
                 teacher_dtype: torch.dtype | None = None):
        self.params, self.vocab, self.fn, self.rows = params, vocab, fn, rows
        self.stats = stats
        self.head = HeadOptions(softcap=params.softcap, scale=teacher_scale, dtype=teacher_dtype)
        self._teacher: LMHeadChunker | None = None
        self._tbuf: torch.Tensor | None = None

    def teacher_logits(self, sl: slice, aux: tuple) -> torch.Tensor:
        t_hidden, t_weight, t_bias, t_logits, _ = DenseAux(*aux)
        head = self.head
        if t_logits is None:
            if self._teacher is None:
                self._teacher = LMHeadChunker(t_hidden, t_weight, t_bias, head, self.rows)
            return self._teacher.logits(sl)
        dtype = t_logits.dtype if head.dtype is None else head.dtype
        if head.softcap is None and head.scale == 1.0 and dtype == t_logits.dtype:
            return t_logits[sl]
        c = sl.stop - sl.start
        if self._tbuf is None or self._tbuf.shape[0] < c:
            self._tbuf = t_logits.new_empty(max(c, self.rows), t_logits.shape[1], dtype=dtype)
        z = self._tbuf[:c].copy_(t_logits[sl])
        return softcap_(z.mul_(head.scale) if head.scale != 1.0 else z, head.softcap)

    def __call__(self, sl, z, grad, w, aux):
        zt = self.teacher_logits(sl, aux)
        labels, vocab = DenseAux(*aux).labels, self.vocab
        lab = None if labels is None else labels[sl]
        extra = () if self.stats is None else (self.stats[sl],)
        loss = self.fn(z[:, :vocab], zt[:, :vocab], lab, w, None if grad is None else grad[:, :vocab],
                       self.params, *extra)
        if grad is not None and vocab < grad.shape[1]:
            grad[:, vocab:].zero_()
        return loss

    def release(self) -> None:
        if self._teacher is not None:
            self._teacher.release()
        self._teacher = self._tbuf = None


def _pair(name: str, value, default):
    """``value`` for both sides, or a (student, teacher) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value for both sides or a (student, teacher) pair, got {value!r}")
        return tuple(default if v is None and default is not None else v for v in value)
    return value, value


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{name} must be a finite non-zero number, got {value!r}")
    return float(value)


def _teacher_constants(student_hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                       scale: float, cdt: torch.dtype | None):
    """Teacher tensors with the teacher's logit scale folded in and cast to the AMP compute dtype, for the paths
    that do not run on the engine's heads (several teachers, the token-selection pre-pass); also the student
    hidden states as those paths' dtype checks should see them. Constants: one copy per call, no gradient."""
    if scale == 1.0 and cdt is None:
        return student_hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits

    def conv(x, scaled):
        if x is None:
            return None
        x = x.detach() if cdt is None else x.detach().to(cdt)
        return x * scale if scaled and scale != 1.0 else x

    def each(x, scaled):
        return [conv(t, scaled) for t in x] if isinstance(x, (list, tuple)) else conv(x, scaled)

    sh = student_hidden if cdt is None else student_hidden.detach().to(cdt)
    return (sh, each(teacher_hidden, False), each(teacher_weight, True), each(teacher_bias, True),
            conv(teacher_logits, True))


def _selection_teacher_entropy(a: dict) -> torch.Tensor:
    """The ``select="teacher_entropy_top"`` pre-pass (:func:`fastkd.distill.mixture.fused_teacher_entropy`) with
    the teacher's own softcap and logit scale, under AMP in the compute dtype."""
    _, t_cap = _pair("softcap", a["softcap"], None)
    _, t_scale = _pair("logit_scale", a["logit_scale"], 1.0)
    cdt = amp_dtype(a["student_hidden"], a["student_weight"])
    sh, th, tw, tb, tl = _teacher_constants(a["student_hidden"], a["teacher_hidden"], a["teacher_weight"],
                                            a["teacher_bias"], a["teacher_logits"], _check_scale(
                                                "teacher logit_scale", t_scale), cdt)
    a = dict(a, softcap=t_cap, student_hidden=sh, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb,
             teacher_logits=tl)
    with torch.autocast(sh.device.type, enabled=False):
        return MX.fused_teacher_entropy(a)


@sharded_entry("fused", vocab_parallel="fastkd.distill.vocab_parallel:vocab_parallel_fused_linear_distill_loss")
@with_token_selection(teacher_entropy=_selection_teacher_entropy)
@shared_keywords(*DENSE_KEYWORDS)
def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "fkl",
    chunk_size: int | None = None,
    softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    return_stats: bool = False,
    teacher_weights: torch.Tensor | list[float] | None = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss from hidden states and LM-head weights, never materialising (N, V) logits.

    Args:
        student_hidden: (..., H) float32/bfloat16/float16; gets a gradient.
        student_weight: (V, H) as ``nn.Linear.weight``; student_bias: (V,) or None. Both get gradients.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's (..., Ht), (Vt, Ht), (Vt,) — constants;
            or ``teacher_logits`` (..., Vt) instead. Several teachers: lists of M ``teacher_hidden`` /
            ``teacher_weight`` (/ ``teacher_bias``) or stacked ``teacher_logits`` (M, ..., Vt), with
            ``teacher_weights`` (M,) | (M, ...) as in :func:`fastkd.distill_loss` (each teacher softcapped, then
            mixed; one reused (chunk, V) teacher workspace whatever M: :mod:`fastkd.distill.mixture`).
        chunk_size: tokens per chunk (default from N, V and free memory).
        softcap: Gemma-style ``softcap·tanh(z/softcap)`` on both sides' logits before the temperature; a
            ``(student, teacher)`` pair caps each side with its own value (None: that side uncapped).
        logit_scale: multiplier of the logits (Cohere-style ``logit_scale``), one value or a ``(student,
            teacher)`` pair. Each side's logits are ``cap·tanh(scale·(h W.T + b)/cap) / T``: scale, then softcap,
            then temperature (TRL's order).
        AMP: under ``torch.autocast`` (any device) the heads compute in the autocast dtype whatever the dtypes
            of the hidden states / weights (e.g. fp32 weights with bf16 or fp32 hidden states); the weight and
            bias gradients accumulate in fp32 and are returned in the parameters' dtype, the hidden-state
            gradients in the hidden states' dtype.
        return_stats: also return the per-token statistics of :func:`fastkd.distill_loss` (computed on the
            capped logits, chunk by chunk, in the backend calls the loss makes anyway; one (N, 4) fp32 buffer).
        {shared}
        Other keywords (``teacher_weights``): as :func:`fastkd.distill_loss`.

    Returns: fp32 scalar, or (...,) for reduction="none"; with ``return_stats`` a tuple ``(loss, stats)``.
    """
    cdt = amp_dtype(student_hidden, student_weight)
    amp = cdt is not None
    check_linear("student", student_hidden, student_weight, student_bias, amp=amp)
    s_cap, t_cap = _pair("softcap", softcap, None)
    s_scale, t_scale = (_check_scale(f"{side} logit_scale", x)
                        for side, x in zip(("student", "teacher"), _pair("logit_scale", logit_scale, 1.0)))
    if s_cap is not None:
        C.check_positive("student softcap", s_cap)
    lead = tuple(student_hidden.shape[:-1])
    several = (isinstance(teacher_hidden, (list, tuple)) or isinstance(teacher_weight, (list, tuple))
               or (teacher_logits is not None and teacher_logits.dim() == student_hidden.dim() + 1))
    check_hidden = student_hidden
    if several:  # the mixture's teacher heads are not engine heads: scale and AMP cast folded into constants
        check_hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits = _teacher_constants(
            student_hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, t_scale, cdt)
    mix = MX.split_teacher_heads(check_hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                                 teacher_weights)
    if mix is not None:  # several teachers: the checks below see the first, split_teacher_heads checked all
        (teacher_hidden, teacher_weight, teacher_bias, teacher_logits), *mix = mix
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden + teacher_weight, not both")
        C.check_float_tensor("teacher_logits", teacher_logits)
        C.check_constant("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape[:-1]) != lead:
            raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must match student_hidden "
                             f"{tuple(student_hidden.shape)} in every dimension but the last")
        if teacher_logits.dtype != student_hidden.dtype and not amp:
            raise TypeError(f"teacher_logits dtype {teacher_logits.dtype} differs from student_hidden dtype "
                            f"{student_hidden.dtype}")
        C.check_same_device(student_hidden=student_hidden, teacher_logits=teacher_logits)
        vt = teacher_logits.shape[-1]
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("pass teacher_hidden and teacher_weight (or teacher_logits)")
        check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias, amp=amp)
        for name, tensor in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                             ("teacher_bias", teacher_bias)):
            C.check_constant(name, tensor)
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} must match student_hidden "
                             f"{tuple(student_hidden.shape)} in every dimension but the last")
        if teacher_hidden.dtype != student_hidden.dtype and not amp:
            raise TypeError(f"teacher_hidden dtype {teacher_hidden.dtype} differs from student_hidden dtype "
                            f"{student_hidden.dtype}; cast it with .to({student_hidden.dtype})")
        C.check_same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
        vt = teacher_weight.shape[0]
    vocab = C.resolve_vocab(student_weight.shape[0], vt, options["vocab_size"])
    params = make_params(divergence, chunk_size=None, softcap=t_cap, family="fused",
                         **pick(options, PARAM_KEYWORDS))
    ce_weight, reduction = options["ce_weight"], options["reduction"]
    if ce_weight and options["labels"] is None:
        raise ValueError("ce_weight > 0 needs labels (the cross-entropy targets)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    device = student_hidden.device
    wdt = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    tok_weight, flat_labels = C.token_weights(lead, device, **pick(options, TOKEN_KEYWORDS), dtype=wdt)
    if ce_weight:
        C.check_label_range(flat_labels, tok_weight, vocab)
    n = tok_weight.numel()
    h = student_hidden.reshape(n, student_hidden.shape[-1])
    th = None if teacher_hidden is None else teacher_hidden.reshape(n, teacher_hidden.shape[-1])
    tl = None if teacher_logits is None else teacher_logits.reshape(n, vt)
    backend = requested_backend(options["backend"])
    rows = chunk_size or auto_chunk_rows(n, student_weight.shape[0] + vt, device,
                                         bytes_per_col=chunk_bytes_per_col(device, backend))
    # The torch backend keeps ~4 fp32 (rows, V) temporaries per call: quarter chunks keep them within about one
    # logits buffer, and at the default CPU budget still above its torch.compile threshold (docs/DESIGN.md,
    # "Memory"). Triton / CUDA ignore chunk_size (no temporaries).
    params = replace(params, chunk_size=max(8, rows // 4))
    stats = new_stats_buffer(n, device) if return_stats else None
    # params.softcap is the teacher's cap (its engine head and the mixture read it); the student's head has
    # its own options.
    s_head = HeadOptions(softcap=None if s_cap is None else float(s_cap), scale=s_scale, dtype=cdt)
    head_arg = s_head if s_head != HeadOptions(softcap=s_head.softcap) else s_head.softcap
    chunk_loss = DenseChunkLoss(params, vocab, backend_fn(backend), rows, stats,
                                teacher_scale=1.0 if several else t_scale, teacher_dtype=cdt)
    if mix is not None:
        chunk_loss = MX.bind_chunk_loss(chunk_loss, chunk_loss.fn, mix, tok_weight, params, vocab,
                                        student_weight.shape[0], options["vocab_size"], rows)
    loss = FusedHeadFunction.apply(h, student_weight, student_bias, tok_weight, chunk_loss, rows, reduction,
                                   head_arg, *DenseAux(th, teacher_weight, teacher_bias, tl,
                                                       flat_labels if ce_weight else None))
    chunk_loss.stats = None  # filled by the forward chunks; a reduction="none" backward re-run skips them
    loss = loss.view(lead) if reduction == "none" else loss
    return (loss, stats_dict(stats, tok_weight)) if return_stats else loss
