"""``fastkd.sparse_distill_loss`` / ``fused_linear_sparse_distill_loss``: distillation from sparse teachers.

The teacher is given per token as K ids (−1 = padding slot) and K values (log-probs, probs, raw logits or
sample counts), e.g. from a :class:`fastkd.cache.TeacherCache`. Formulas: :mod:`fastkd.sparse.reference`.
The student's normaliser is always its full vocabulary.

Layers: the public functions validate arguments, turn masks/reductions into per-token weights
(:mod:`fastkd.core.checks`) and the teacher's values into per-slot log-probabilities (O(N·K), here, once
for every backend); the autograd Functions call one backend's ``sparse`` implementation, which computes
the per-token loss and the weighted gradient in forward; backward scales it by ``grad_output``.

Backend contract (op ``"sparse"``)::

    fn(student (N, V), ids (N, K) int64, t_logp (N, K), t_tail (N,) | None, weight (N,),
       grad (N, V) | None, params: SparseParams, stats (N, 4) fp32 | None = None) -> loss (N,)

``t_logp``/``t_tail`` are in the compute dtype (fp32; fp64 for fp64 logits). ``grad``, when given, is
written with ``weight[i] · ∂loss_i/∂student[i]`` in its own dtype and may alias ``student``. ``stats``, when
given, gets each row's [teacher_entropy, student_entropy, top1_agree, kl] (:mod:`fastkd.core.stats`; the
sparse definitions are :func:`fastkd.sparse.torch_impl.sparse_stats` and docs/sparse.md): the student's
entropy and argmax come from the backend's vocabulary pass, the rest from the O(N·K) teacher side; the loss
and gradient are bitwise the same with and without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from fastkd.core import checks as C
from fastkd.core.autograd import scale_grad
from fastkd.core.divergences import HYPERS, names
from fastkd.core.docs import SPARSE_KEYWORDS, TOKEN_KEYWORDS, pick, shared_keywords
from fastkd.core.lmhead import (
    FusedHeadFunction,
    HeadOptions,
    amp_dtype,
    auto_chunk_rows,
    check_linear,
    chunk_bytes_per_col,
)
from fastkd.core.params import SparseParams, op_fields, op_schema
from fastkd.core.registry import declare, requested_backend, select
from fastkd.core.selection import with_token_selection
from fastkd.core.sharding import sharded_entry
from fastkd.core.stats import new_buffer as new_stats_buffer
from fastkd.core.stats import stats_dict

MODES = ("topk", "topk_tail", "sampled")  # what the backends compute
PUBLIC_MODES = (*MODES, "union")  # "union": merged teacher + student ids, then computed as topk_tail
SPARSE_DIVERGENCES = names("sparse")  # from the divergence table
VALUE_KINDS = ("logprobs", "logits", "probs", "counts")

declare(
    "sparse",
    ["fastkd.sparse.torch_impl", "fastkd.sparse.triton_impl", "fastkd.sparse.cuda_impl"],
    auto_order=("triton", "torch"),
)


# The custom op's scalar arguments are the fields of SparseParams but softcap (the LM-head engine applies it),
# typed by their annotations, in field order; ``mode`` is ``sparse_mode`` in the schema (the name is taken
# inside PyTorch's functionalization of mutating ops).
OP_FIELDS = op_fields(SparseParams, exclude=("softcap",))
_SCHEMA = op_schema(SparseParams, "Tensor student, Tensor ids, Tensor t_logp, Tensor? t_tail, Tensor weight, "
                    "Tensor(a!)? grad, str backend, Tensor(b!)? stats", exclude=("softcap",),
                    rename={"mode": "sparse_mode"})


def _sparse_rows(student: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor, t_tail: torch.Tensor | None,
                 weight: torch.Tensor, grad: torch.Tensor | None, backend: str, stats: torch.Tensor | None,
                 *scalars) -> torch.Tensor:
    params = SparseParams(**dict(zip(OP_FIELDS, scalars, strict=True)))
    impl = select("sparse", backend, student=student, ids=ids, params=params, stats=stats)
    if stats is None:
        return impl.fn(student, ids, t_logp, t_tail, weight, grad, params)
    return impl.fn(student, ids, t_logp, t_tail, weight, grad, params, stats)


sparse_rows = torch.library.custom_op("fastkd::sparse_rows", _sparse_rows, mutates_args=("grad", "stats"),
                                      schema=_SCHEMA)
sparse_rows.__doc__ = """Per-token loss (N,) of one backend's ``sparse`` on rows; writes the weighted gradient into
``grad`` and, when given, the (N, 4) fp32 statistics into ``stats``.

The one entry point to the sparse backends: eager autograd Functions call it and ``torch.compile`` sees an
opaque op (fake implementation below). Arguments: the tensors, the backend name, ``stats``, then the typed
fields of :class:`SparseParams` but softcap (:data:`OP_FIELDS`).
"""


@sparse_rows.register_fake
def _sparse_rows_fake(student, ids, t_logp, t_tail, weight, grad, *args):
    return student.new_empty(student.shape[0], dtype=torch.float64 if student.dtype == torch.float64
                             else torch.float32)


def _backend_fn(backend: str) -> Callable[..., torch.Tensor]:
    """A ``sparse`` backend callable (contract in the module docstring) that goes through the custom op."""

    def fn(student, ids, t_logp, t_tail, weight, grad, p: SparseParams, stats=None) -> torch.Tensor:
        return sparse_rows(student, ids, t_logp, t_tail, weight, grad, backend, stats,
                           *(getattr(p, name) for name in OP_FIELDS))

    return fn


def _union(mode, values, teacher_ids, teacher_values, teacher_tail, student_ids, student_id_values):
    """(backend mode, ids, values): ``mode="union"`` merges the two id sources (:func:`union_ids`) into one
    ``topk_tail`` row; every other mode passes through and must not be given student ids."""
    C.check_choice("mode", mode, PUBLIC_MODES)
    if mode != "union":
        if student_ids is not None or student_id_values is not None:
            raise ValueError(f"student_ids / student_id_values are only used by mode='union', got mode={mode!r}")
        return mode, teacher_ids, teacher_values
    if student_ids is None or student_id_values is None:
        raise ValueError("mode='union' needs student_ids and student_id_values (the teacher's values at the "
                         "student's ids, e.g. from fastkd.student_topk + a served teacher)")
    if values not in ("logprobs", "probs"):
        raise ValueError(f"mode='union' needs the teacher's unnormalised values='logprobs' or 'probs', got {values!r}")
    if teacher_tail is not None:
        raise ValueError("teacher_tail is the mass outside the teacher's own ids, not outside the union; "
                         "mode='union' computes its tail as 1 - (mass at the union's ids)")
    from fastkd.sparse.student_ids import union_ids

    ids, vals = union_ids(teacher_ids, teacher_values, student_ids, student_id_values)
    return "topk_tail", ids, vals


def _make_params(
    mode, divergence, values, temperature, teacher_temperature, scale_by_t2, beta, chunk_size, softcap
) -> SparseParams:
    C.check_choice("mode", mode, MODES)
    C.check_choice("divergence", divergence, SPARSE_DIVERGENCES)
    C.check_choice("values", values, VALUE_KINDS)
    C.check_positive("temperature", temperature)
    if beta is not None:  # None: the divergence's default (SparseParams resolves it from the table)
        C.check_range("beta", beta, 0.0, 1.0)
    if teacher_temperature is not None:
        C.check_positive("teacher_temperature", teacher_temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None:
        C.check_positive("softcap", softcap)
    if mode == "sampled":
        if divergence != "fkl":
            raise ValueError(
                f"mode='sampled' estimates the forward KL only; divergence must be 'fkl', got {divergence!r}"
            )
        if values != "counts":
            raise ValueError(
                f"mode='sampled' needs values='counts' (how often each id was drawn), got {values!r}"
            )
    if values == "logits" and mode != "topk":
        raise ValueError(
            f"values='logits' (raw teacher logits at the ids) is only meaningful with mode='topk' "
            f"(renormalised over the K ids), got mode={mode!r}"
        )
    if values == "counts" and mode == "topk_tail":
        raise ValueError("values='counts' has no tail mass; use mode='sampled' or 'topk'")
    if teacher_temperature is not None and (mode != "topk" or values not in ("logprobs", "probs")):
        raise ValueError(
            "teacher_temperature (re-tempering stored probabilities) applies to mode='topk' with "
            f"values='logprobs' or 'probs' only, got mode={mode!r}, values={values!r}"
        )
    return SparseParams(
        mode=mode,
        divergence=divergence,
        temperature=float(temperature),
        scale_by_t2=bool(scale_by_t2),
        beta=None if beta is None else float(beta),
        chunk_size=chunk_size,
        softcap=None if softcap is None else float(softcap),
    )


def _check_teacher(
    ids: torch.Tensor,
    vals: torch.Tensor,
    lead: tuple[int, ...],
    vocab: int,
    device: torch.device,
    values: str,
) -> None:
    if vocab == 0:  # before any backend: torch would index an empty row, Triton would return 0
        raise ValueError("the student vocabulary (last dimension) is empty: a distribution needs V >= 1")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
    if not isinstance(vals, torch.Tensor):
        raise TypeError(f"teacher_values must be a torch.Tensor, got {type(vals).__name__}")
    if (
        vals.dtype == torch.bool
        or vals.is_complex()
        or (not vals.dtype.is_floating_point and values != "counts")
    ):
        raise TypeError(
            f"teacher_values must be a float tensor (integer only for values='counts'), got {vals.dtype}"
        )
    C.check_constant("teacher_values", vals)
    if ids.dim() < 1 or tuple(ids.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_ids must have shape {(*lead, 'K')} (the student's leading dimensions plus K), "
            f"got {tuple(ids.shape)}"
        )
    if ids.shape[-1] == 0:
        raise ValueError("teacher_ids has K = 0 slots per token; at least one teacher id is needed")
    if tuple(vals.shape) != tuple(ids.shape):
        raise ValueError(
            f"teacher_values shape {tuple(vals.shape)} must equal teacher_ids shape "
            f"{tuple(ids.shape)} (one value per id)"
        )
    if ids.device != device or vals.device != device:
        raise ValueError(
            f"teacher_ids ({ids.device}) and teacher_values ({vals.device}) must be on the "
            f"student's device {device}"
        )
    if not C.value_checks_enabled(ids):
        return
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= vocab:
            raise ValueError(
                f"teacher_ids must be in [0, {vocab}) or -1 (padding); got values in [{lo}, {hi}]"
            )
        srt = ids.reshape(-1, ids.shape[-1]).sort(-1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(-1).nonzero()[0, 0])
            raise ValueError(
                f"teacher_ids has a duplicated id within one token (flat token {row}); each id "
                f"may appear once per token (merge the values / counts)"
            )
    if values in ("probs", "counts"):
        bad = (vals < 0) & (ids >= 0)
        if bool(bad.any()):
            raise ValueError(
                f"teacher_values must be >= 0 for values={values!r}; found {int(bad.sum())} negative entries"
            )
    elif values == "logprobs":
        bad = (vals > 1e-3) & (ids >= 0)
        if bool(bad.any()):
            raise ValueError(
                "teacher_values has log-probabilities > 0; if they are raw logits pass values='logits'"
            )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, accurate near 0 and for very negative x (Mächler's switch at −ln 2)."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_log_probs(
    ids: torch.Tensor,
    vals: torch.Tensor,
    values: str,
    p: SparseParams,
    teacher_temperature: float | None,
    cdt: torch.dtype,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-slot teacher log-probabilities (N, K) and, for topk_tail, the log tail mass (N,), in ``cdt``."""
    valid = ids >= 0
    neg_inf = torch.tensor(-math.inf, dtype=cdt, device=ids.device)
    v = vals.to(cdt)
    log_u = v if values in ("logprobs", "logits") else torch.log(v)
    log_u = torch.where(valid, log_u, neg_inf)
    if p.mode == "topk_tail":
        total = torch.logsumexp(log_u, dim=-1)
        if check and bool((total > math.log1p(1e-2)).any()):
            raise ValueError(
                "teacher_values sum to more than 1 in some token; mode='topk_tail' needs the "
                "teacher's unnormalised top-k probabilities (use mode='topk' to renormalise)"
            )
        # a tail below the rounding noise of K stored values is no mass (e.g. ids covering the vocabulary)
        eps = torch.finfo(vals.dtype).eps if vals.dtype.is_floating_point else 0.0
        t_tail = _log1mexp(total)
        t_tail = torch.where(t_tail <= math.log(4 * ids.shape[-1] * eps + 1e-300), -math.inf, t_tail)
        return log_u, t_tail
    if values == "logits":
        f = 1.0 / p.temperature
    elif teacher_temperature is not None:
        f = teacher_temperature / p.temperature
    else:
        f = 1.0
    if f != 1.0:
        log_u = log_u * f
    m = log_u.amax(-1, keepdim=True)
    empty = m == -math.inf  # no valid slot or zero total mass: the token contributes 0
    out = torch.log_softmax(torch.where(empty, torch.zeros_like(log_u), log_u), dim=-1)
    return torch.where(empty | ~valid, neg_inf, out), None


_TAIL_TOL = 1e-3  # the tolerance of a log-prob above 0 in _check_teacher: rounding noise, never real mass


def _prepare(
    lead,
    vocab,
    device,
    ids,
    vals,
    values,
    p,
    teacher_temperature,
    labels,
    ignore_index,
    mask,
    reduction,
    num_items_in_batch,
    cdt,
    tail=None,
):
    _check_teacher(ids, vals, lead, vocab, device, values)
    if tail is not None:
        if p.mode != "topk_tail":
            raise ValueError(f"teacher_tail is only used by mode='topk_tail', got mode={p.mode!r}")
        C.check_float_tensor("teacher_tail", tail, min_dim=0)
        C.check_constant("teacher_tail", tail)
        if tuple(tail.shape) != lead or tail.device != device:
            raise ValueError(
                f"teacher_tail must have shape {lead} on {device}, got {tuple(tail.shape)} on {tail.device}"
            )
    weight, _ = C.token_weights(
        lead,
        device,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        dtype=cdt,
    )
    n = weight.numel()
    k = ids.shape[-1]
    ids2 = ids.reshape(n, k).long()
    t_logp, t_tail = teacher_log_probs(
        ids2, vals.reshape(n, k), values, p, teacher_temperature, cdt, C.value_checks_enabled(ids)
    )
    if tail is not None:
        # a log mass above 0 is a mass above 1: only rounding noise (up to _TAIL_TOL, docs/DESIGN.md) is clamped
        if C.value_checks_enabled(tail) and bool((tail > _TAIL_TOL).any()):
            worst = float(tail.max())
            raise ValueError(f"teacher_tail is a log mass and must be <= 0 (a mass <= 1); got a value of {worst!r} "
                             f"(beyond the rounding tolerance {_TAIL_TOL})")
        t_tail = tail.reshape(n).to(cdt).clamp_max(0.0)
    return weight, ids2, t_logp, t_tail


class SparseDistillFunction(torch.autograd.Function):
    """Loss and gradient in forward, gradient scaling in backward (as :class:`DistillFunction`); with
    ``want_stats`` forward returns ``(loss, stats (N, 4) fp32)``, the statistics non-differentiable."""

    @staticmethod
    def forward(ctx, student, ids, t_logp, t_tail, weight, params, reduction, fn, want_stats=False):
        grad = (
            torch.empty_like(student, memory_format=torch.contiguous_format)
            if ctx.needs_input_grad[0]
            else None
        )
        stats = new_stats_buffer(weight.numel(), student.device) if want_stats else None
        loss = fn(student, ids, t_logp, t_tail, weight, grad, params, *(() if stats is None else (stats,)))
        ctx.per_row = reduction == "none"
        ctx.used = False
        if grad is not None:
            ctx.save_for_backward(grad)
        out = C.reduce_tokens(loss, weight, reduction, (weight.numel(),))
        if stats is None:
            return out
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_output, *_stats_grad):
        if ctx.used:
            raise RuntimeError(
                "fastkd.sparse_distill_loss: backward ran twice through the same graph after the stored CUDA "
                "gradient was scaled in place; recompute the loss instead of using retain_graph=True"
            )
        (grad,) = ctx.saved_tensors
        grad, ctx.used = scale_grad(grad, grad_output, ctx.per_row)
        return grad, None, None, None, None, None, None, None, None


@sharded_entry("logits")
@with_token_selection()
@shared_keywords(*SPARSE_KEYWORDS)
def sparse_distill_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    values: str = "logprobs",
    mode: str = "topk",
    divergence: str = "fkl",
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    teacher_tail: torch.Tensor | None = None,
    chunk_size: int | None = None,
    student_ids: torch.Tensor | None = None,
    student_id_values: torch.Tensor | None = None,
    return_stats: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss from a sparse teacher (K ids + values per token) against full student logits.

    Args:
        student_logits: (..., V) float32/bfloat16/float16 (float64 for checks); receives the gradient.
        teacher_ids: (..., K) integer ids in [0, V), −1 = padding slot; no id twice within a token. Checked
            where value checks run (CPU tensors, FASTKD_CHECK_INPUTS=1); elsewhere, without a host sync, every
            backend gives NaN loss for a token holding an id outside [−1, V) (never reading outside the row)
            and adds up the gradient of a repeated id's slots.
        teacher_values: (..., K) constants: "logprobs" (default), "probs", "logits" (raw teacher logits at
            the ids; topk only) or "counts" (sample counts; sampled, or topk).
        mode: "topk" (teacher renormalised over its K ids), "topk_tail" (K buckets + one tail bucket holding
            1 − Σ on both sides; values must be unnormalised probs / log-probs), "sampled" (Random-
            Sampling KD: counts; an unbiased estimate of the full forward-KL gradient) or "union" (see
            ``student_ids``).
        divergence: "fkl", "rkl" or "jsd" (with ``beta``; β=0 → fkl, β=1 → rkl). For topk, rkl/jsd compare
            with the student renormalised over the same K ids; fkl uses the full-vocabulary log q.
        temperature: student logits divided by T (and raw teacher logits for values="logits").
        teacher_temperature: T_gen of stored log-probs/probs (topk only): the teacher becomes p^(T_gen/T),
            renormalised over K (DistillKit / axolotl re-tempering). None: use the stored values as they are.
        teacher_tail: (...,) log of the teacher's mass outside its K ids (topk_tail only), e.g. the exact
            one a :class:`fastkd.cache.TeacherCache` stores; default log(1 − Σ values).
        {shared}
        chunk_size: rows per chunk of the torch backend.
        student_ids, student_id_values: (..., Ks) for mode="union" only: ids the student proposed (e.g.
            :func:`fastkd.student_topk`; −1 = padding) and the *teacher's* values there (same ``values``
            units). The row becomes the union of the teacher's and the student's ids, each id once (the
            teacher's slot wins; :func:`fastkd.sparse.student_ids.union_ids`), computed as topk_tail: buckets
            at the union's ids + a tail bucket of 1 − Σ. values must be "logprobs" or "probs".
        return_stats: also return ``{name: fp32 (N,)}`` for :data:`fastkd.core.stats.STATS_KEYS` (N = tokens,
            flattened; 0 where excluded; no grad), computed in the passes the loss makes (loss and gradient
            bitwise unchanged), for the distributions this mode uses (docs/sparse.md, "Statistics"):
            teacher_entropy of the teacher the loss distils towards (topk/sampled: p̃ over the K slots;
            topk_tail/union: the K slots + the tail as one outcome), student_entropy of softmax(z/T) over
            the full vocabulary, top1_agree (the student's argmax over V == the teacher's highest-valued
            stored id, the smallest id on ties) and kl = this call's per-token loss with divergence="fkl"
            (no T², no token weight), whatever ``divergence`` is trained.

    Tokens whose K slots are all padding (or carry zero teacher mass) contribute 0 in topk/sampled mode.
    A NaN in a kept token's teacher values / tail or in its student logits (for top-k rkl/jsd: at its ids,
    the only logits that loss reads) gives a NaN loss for that token on every backend (an inf teacher value
    too: it makes the normalisation NaN).

    Returns:
        fp32 scalar, or fp32 (...,) for reduction="none" (float64 for float64 inputs); with ``return_stats``
        a tuple ``(loss, stats)``.
    """
    C.check_float_tensor("student_logits", student_logits)
    mode, teacher_ids, teacher_values = _union(mode, values, teacher_ids, teacher_values, teacher_tail, student_ids,
                                               student_id_values)
    params = _make_params(mode, divergence, values, temperature, teacher_temperature, options["scale_by_t2"],
                          options["beta"], chunk_size, None)
    lead = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    cdt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    weight, ids2, t_logp, t_tail = _prepare(lead, vocab, student_logits.device, teacher_ids, teacher_values, values,
                                            params, teacher_temperature, cdt=cdt, tail=teacher_tail,
                                            **pick(options, TOKEN_KEYWORDS))
    reduction = options["reduction"]
    student2d = student_logits.reshape(weight.numel(), vocab)
    fn = _backend_fn(requested_backend(options["backend"]))
    out = SparseDistillFunction.apply(student2d, ids2, t_logp, t_tail, weight, params, reduction, fn,
                                      bool(return_stats))
    loss, buf = out if return_stats else (out, None)
    loss = loss.view(lead) if reduction == "none" else loss
    return (loss, stats_dict(buf, weight)) if return_stats else loss


class _SparseChunkLoss:
    """Per-chunk loss for :class:`FusedHeadFunction` (aux: ids, t_logp, t_tail). ``stats``: the (N, 4) fp32
    buffer whose chunk rows the backend fills, or None; the caller clears it after the forward pass so that a
    ``reduction="none"`` backward re-run (token weights × grad_output) neither recomputes nor overwrites it."""

    def __init__(self, params: SparseParams, fn: Callable[..., torch.Tensor], stats: torch.Tensor | None):
        self.params, self.fn, self.stats = params, fn, stats

    def __call__(self, sl, z, grad, w, aux):
        ids, t_logp, t_tail = aux
        extra = () if self.stats is None else (self.stats[sl],)
        return self.fn(z, ids[sl], t_logp[sl], None if t_tail is None else t_tail[sl], w, grad, self.params,
                       *extra)


@sharded_entry("fused")
@with_token_selection()
@shared_keywords(*SPARSE_KEYWORDS)
def fused_linear_sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    values: str = "logprobs",
    mode: str = "topk",
    divergence: str = "fkl",
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    teacher_tail: torch.Tensor | None = None,
    student_ids: torch.Tensor | None = None,
    student_id_values: torch.Tensor | None = None,
    return_stats: bool = False,
    semantics: str = "fastkd",
    log_prob_min_clamp: float | None = None,
    tail_mass_eps: float = 1e-6,
    return_mass: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`sparse_distill_loss` on ``student_hidden @ student_weight.T (+ bias)`` without (N, V) logits.

    Args:
        student_hidden: (..., H); student_weight: (V, H) as ``nn.Linear.weight``; student_bias: (V,) or None.
            All three get gradients.
        softcap: Gemma-style ``softcap·tanh(z/softcap)`` on the student logits before the temperature.
        logit_scale: multiplier of the student logits before the softcap (Cohere-style; TRL's order: scale,
            softcap, temperature).
        chunk_size: tokens per chunk (default from N, V and free memory); peak extra memory O(chunk · V).
        Under ``torch.autocast`` the head computes in the autocast dtype (fp32 weights with bf16 / fp32 hidden
        states are accepted); weight / bias gradients accumulate in fp32 into the parameters' dtype.
        {shared}
        Other arguments (``mode="union"`` with ``student_ids`` / ``student_id_values`` included, and
        ``return_stats``: the statistics of the capped logits, filled chunk by chunk in the backend calls the
        loss makes anyway): as :func:`sparse_distill_loss`.
        semantics: "fastkd" (the modes above) or a framework's top-k loss on the teacher's top-k log-probs
            (values="logprobs", mode="topk"): "verl_topk" (verl ``compute_forward_kl_topk``, with
            ``log_prob_min_clamp``), "verl_topk_tail" (verl's tail-aware variant, with ``tail_mass_eps``) or
            "trl_tail" (TRL's top-k + tail bucket, β from ``divergence`` / ``beta``); formulas in
            :mod:`fastkd.onpolicy.frameworks`. ``return_mass``: also return ``{"student_mass", "teacher_mass"}``
            (...,) — Σ of each side's probabilities at the teacher's ids (framework semantics only).
    """
    if options["beta"] is None:  # the framework semantics take a number (jsd's table default)
        options["beta"] = HYPERS["beta"].default
    if semantics != "fastkd" or log_prob_min_clamp is not None or return_mass:
        from fastkd.onpolicy.frameworks import fused_linear_framework_loss

        own = {k: v for k, v in locals().items() if k not in ("student_hidden", "student_weight", "teacher_ids",
                                                                 "teacher_values", "options",
                                                                 "fused_linear_framework_loss")}
        return fused_linear_framework_loss(student_hidden, student_weight, teacher_ids, teacher_values, **own,
                                           **options)
    amp = amp_dtype(student_hidden, student_weight)
    check_linear("student", student_hidden, student_weight, student_bias, amp=amp is not None)
    mode, teacher_ids, teacher_values = _union(mode, values, teacher_ids, teacher_values, teacher_tail, student_ids,
                                               student_id_values)
    params = _make_params(mode, divergence, values, temperature, teacher_temperature, options["scale_by_t2"],
                          options["beta"], chunk_size, softcap)
    lead = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    device = student_hidden.device
    cdt = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    tok_weight, ids2, t_logp, t_tail = _prepare(lead, vocab, device, teacher_ids, teacher_values, values, params,
                                                teacher_temperature, cdt=cdt, tail=teacher_tail,
                                                **pick(options, TOKEN_KEYWORDS))
    reduction = options["reduction"]
    n = tok_weight.numel()
    h = student_hidden.reshape(n, student_hidden.shape[-1])
    backend = requested_backend(options["backend"])
    rows = chunk_size or auto_chunk_rows(n, vocab, device, bytes_per_col=chunk_bytes_per_col(device, backend))
    stats = new_stats_buffer(n, device) if return_stats else None
    fn = _backend_fn(backend)
    chunk_loss = _SparseChunkLoss(replace(params, chunk_size=rows), fn, stats)
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale) \
            or logit_scale == 0:
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")
    head = (params.softcap if amp is None and logit_scale == 1.0
            else HeadOptions(softcap=params.softcap, scale=float(logit_scale), dtype=amp))
    loss = FusedHeadFunction.apply(h, student_weight, student_bias, tok_weight, chunk_loss, rows, reduction,
                                   head, ids2, t_logp, t_tail)
    chunk_loss.stats = None  # filled by the forward chunks; a reduction="none" backward re-run skips them
    loss = loss.view(lead) if reduction == "none" else loss
    return (loss, stats_dict(stats, tok_weight)) if return_stats else loss
