"""``fastkd.distill_loss``: divergence losses between student and teacher logits.

Layers: :func:`distill_loss` validates arguments and turns masks/reductions into per-token weights
(:mod:`fastkd.core.checks`); :class:`DistillFunction` calls one backend's ``distill`` implementation,
which computes the per-token loss *and* the weighted gradient in the forward pass; backward only scales
that gradient by ``grad_output`` (in place: the gradient buffer is the only (N, V) tensor kept).

Backend contract (op ``"distill"``)::

    fn(student (N, V), teacher (N, V), labels (N,) int64 | None, weight (N,) fp32,
       grad (N, V) | None, params: DistillParams, stats (N, 4) fp32 | None = None) -> loss (N,) fp32

Rows of ``student``/``teacher`` may be strided (vocabulary padding is sliced off as a view); ``grad``,
when given, must be written with ``weight[i] * ∂loss_i/∂student[i]`` in its own dtype and may alias
``student``; rows with ``weight == 0`` get loss 0 and gradient 0 whatever their logits are. ``stats``,
when given, gets each row's [teacher_entropy, student_entropy, top1_agree, kl] at the temperature
(:mod:`fastkd.core.stats`; excluded rows may hold anything, the op zeroes them), computed in the passes the
backend already makes; the loss and gradient must be bitwise the same with and without it.
``distill_loss(..., return_stats=True)`` returns ``(loss, stats_dict)``.

Divergence names, hyperparameter defaults/ranges and endpoint rules come from the divergence table
(:mod:`fastkd.core.divergences`); :func:`make_params` (:mod:`fastkd.core.params`) validates against it.
The custom op ``fastkd::distill_rows`` takes the :class:`DistillParams` fields as typed scalars (its schema
is built from the dataclass's annotations), so a new hyperparameter needs no edit here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastkd.core import checks as C
from fastkd.core.autograd import scale_grad
from fastkd.core.divergences import DIVERGENCES
from fastkd.core.docs import DENSE_KEYWORDS, PARAM_KEYWORDS, TOKEN_KEYWORDS, pick, shared_keywords
from fastkd.core.params import DistillParams, make_params, op_fields, op_schema
from fastkd.core.registry import declare, requested_backend, select
from fastkd.core.selection import with_token_selection
from fastkd.core.sharding import sharded_entry
from fastkd.core.stats import new_buffer as new_stats_buffer
from fastkd.core.stats import stats_dict
from fastkd.distill import mixture as MX

__all__ = ["DIVERGENCES", "DistillCall", "DistillFunction", "backend_fn", "distill_loss", "distill_rows", "make_params"]

declare(
    "distill",
    ["fastkd.distill.torch_impl", "fastkd.distill.triton_impl", "fastkd.distill.cuda_impl"],
    auto_order=("triton", "torch"),
)

# The custom op's scalar arguments are the fields of DistillParams, each typed in the op's schema by its
# annotation (float, int, bool, str, optional), in field order, so a new field needs no edit here.
# ``softcap`` is left out: the LM-head engine applies it to the logits before the rows reach a backend.
OP_FIELDS = op_fields(DistillParams, exclude=("softcap",))
_SCHEMA = op_schema(DistillParams, "Tensor student, Tensor teacher, Tensor? labels, Tensor weight, Tensor(a!)? grad, "
                    "str backend, Tensor(b!)? stats", exclude=("softcap",))


def op_args(p: DistillParams) -> tuple:
    """The scalar arguments of ``fastkd::distill_rows`` for ``p``: its fields but softcap, in field order."""
    return tuple(getattr(p, name) for name in OP_FIELDS)


def _distill_rows(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, weight: torch.Tensor,
                  grad: torch.Tensor | None, backend: str, stats: torch.Tensor | None, *scalars) -> torch.Tensor:
    p = DistillParams(**dict(zip(OP_FIELDS, scalars, strict=True)))
    impl = select("distill", backend, student=student, teacher=teacher, params=p, stats=stats)
    if stats is None:
        return impl.fn(student, teacher, labels, weight, grad, p)
    return impl.fn(student, teacher, labels, weight, grad, p, stats)


distill_rows = torch.library.custom_op("fastkd::distill_rows", _distill_rows, mutates_args=("grad", "stats"),
                                       schema=_SCHEMA)
distill_rows.__doc__ = """Per-token loss (N,) of one backend's ``distill`` on rows; writes the weighted gradient
into ``grad`` and, when given, the (N, 4) fp32 statistics into ``stats``.

The one entry point to the backends for dense losses: eager autograd Functions call it directly and
``torch.compile`` sees it as an opaque op (fake implementation below). Arguments: the tensors, the backend
name, ``stats``, then :func:`op_args` (the typed fields of :class:`DistillParams` but softcap).
"""


@distill_rows.register_fake
def _distill_rows_fake(student, teacher, labels, weight, grad, *args):
    return student.new_empty(student.shape[0], dtype=torch.float64 if student.dtype == torch.float64
                             else torch.float32)


def backend_fn(backend: str):
    """A ``distill`` backend callable (contract in the module docstring) that goes through the custom op."""

    def fn(student, teacher, labels, weight, grad, p: DistillParams, stats=None) -> torch.Tensor:
        return distill_rows(student, teacher, labels, weight, grad, backend, stats, *op_args(p))

    return fn


def _has_overlap(x: torch.Tensor) -> bool:
    """True when two elements of ``x`` share memory (an expanded / stride-0 or otherwise overlapping view)."""
    dims = sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return True
        span = st * sz
    return False


@dataclass(frozen=True)
class DistillCall:
    """The non-tensor arguments of :class:`DistillFunction` (one object, so backward returns a short tuple).

    vocab: columns used (the rest get a zero gradient); reduction: "mean" | "sum" | "none";
    inplace_grad: write the gradient into the student's storage; fn: the backend (:func:`backend_fn`);
    stats: also return the (N, 4) fp32 statistics buffer (:mod:`fastkd.core.stats`) as a second output.
    """

    params: DistillParams
    vocab: int
    reduction: str
    inplace_grad: bool
    fn: Callable[..., torch.Tensor]
    stats: bool = False


class DistillFunction(torch.autograd.Function):
    """Autograd wrapper: loss and gradient in forward, gradient scaling in backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, weight, call: DistillCall):
        n, v = student.shape
        vocab, reduction = call.vocab, call.reduction
        grad = None
        if ctx.needs_input_grad[0]:
            if call.inplace_grad:
                grad = student.detach()
            else:
                grad = torch.empty_like(student, memory_format=torch.contiguous_format)
            if vocab < v:
                grad[:, vocab:].zero_()
        stats = new_stats_buffer(n, student.device) if call.stats else None
        args = () if stats is None else (stats,)
        loss = call.fn(student[:, :vocab], teacher[:, :vocab], labels, weight,
                       None if grad is None else grad[:, :vocab], call.params, *args)
        out = C.reduce_tokens(loss, weight, reduction, (n,))
        ctx.per_row = reduction == "none"
        ctx.used = False
        if grad is not None:
            ctx.save_for_backward(grad)
        if stats is None:
            return out
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_output, *_stats_grad):
        if ctx.used:
            raise RuntimeError(
                "fastkd.distill_loss: backward ran twice through the same graph after the stored CUDA "
                "gradient was scaled in place; recompute the loss instead of using retain_graph=True"
            )
        (grad,) = ctx.saved_tensors
        grad, ctx.used = scale_grad(grad, grad_output, ctx.per_row)
        return grad, None, None, None, None


@sharded_entry("logits", vocab_parallel="fastkd.distill.vocab_parallel:vocab_parallel_distill_loss")
@with_token_selection()
@shared_keywords(*DENSE_KEYWORDS)
def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    *,
    chunk_size: int | None = None,
    inplace_grad: bool = False,
    return_stats: bool = False,
    teacher_weights: torch.Tensor | list[float] | None = None,
    inputs: str = "logits",
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation divergence between student and teacher logits, fused loss + gradient.

    Args:
        student_logits: (..., V) float32/bfloat16/float16 (float64 for checks); receives the gradient.
        teacher_logits: (..., V') same dtype and device; a constant (must not require grad). Or M stacked
            teachers (M, ..., V') with ``teacher_weights``.
        divergence: one of ``fastkd.DIVERGENCES`` (formulas in docs/DESIGN.md / README), with p = teacher,
            q = student after dividing both logits by ``temperature``.
        {shared}
        chunk_size: rows per chunk for the torch backend (default: ~4M elements per chunk).
        inplace_grad: write the gradient into ``student_logits``' storage (saves one (N, V) buffer;
            the logits are overwritten, autograd raises if something else still needs them). The student
            must not be an expanded / overlapping view (ValueError).
        return_stats: also return per-token statistics computed in the same kernel passes (the loss and
            its gradient are bitwise unchanged): a dict ``fastkd.core.stats.STATS_KEYS`` → fp32 (N,)
            (N = tokens, flattened), 0 where excluded, no grad, at ``temperature``: teacher_entropy,
            student_entropy, top1_agree (argmax match, first index on ties) and kl = KL(p‖q) (no T², no
            token weight, whatever ``divergence`` is).
        teacher_weights: (M,) or (M, ...) per-token weights of M stacked teachers: the loss distils towards
            p = Σ_m w_m softmax(teacher_m / T) (w ≥ 0, finite, Σ_m w_m = 1 per kept token, else ValueError;
            formed chunk by chunk in the log domain, O(chunk · V) extra memory: :mod:`fastkd.distill.mixture`).
            M = 1 is the single-teacher loss.
        inputs: "logits" (default) or "logprobs": both inputs are normalised log-probabilities and the gradient
            is Liger's / ``F.kl_div(log_target=True)``'s, w.r.t. the log-prob entries themselves (fkl, rkl, jsd;
            temperature 1; :mod:`fastkd.distill.logprobs`). Same values; reduction="none" stays per token.

    Returns:
        fp32 scalar, or fp32 (...,) for reduction="none" (float64 for float64 inputs); with
        ``return_stats`` a tuple ``(loss, stats)``.
    """
    if inputs != "logits":
        C.check_choice("inputs", inputs, ("logits", "logprobs"))
        from fastkd.distill.logprobs import logprob_distill_loss

        kw = dict(options, chunk_size=chunk_size, inplace_grad=inplace_grad, return_stats=return_stats,
                  teacher_weights=teacher_weights)
        return logprob_distill_loss(distill_loss, student_logits, teacher_logits, divergence, kw)
    C.check_float_tensor("student_logits", student_logits)
    C.check_float_tensor("teacher_logits", teacher_logits)
    C.check_constant("teacher_logits", teacher_logits)
    C.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    teacher_logits, teachers, t_weights = MX.split_teacher_logits(student_logits, teacher_logits, teacher_weights)
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(f"student_logits and teacher_logits must have one dtype, got {student_logits.dtype} "
                        f"and {teacher_logits.dtype}; cast the teacher with .to({student_logits.dtype})")
    lead = tuple(student_logits.shape[:-1])
    if tuple(teacher_logits.shape[:-1]) != lead:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must match in every dimension but the last")
    vocab = C.resolve_vocab(student_logits.shape[-1], teacher_logits.shape[-1], options["vocab_size"])
    params = make_params(divergence, chunk_size=chunk_size, **pick(options, PARAM_KEYWORDS))
    ce_weight, reduction = options["ce_weight"], options["reduction"]
    if ce_weight and options["labels"] is None:
        raise ValueError("ce_weight > 0 needs labels (the cross-entropy targets)")
    if inplace_grad and student_logits.requires_grad and _has_overlap(student_logits):
        raise ValueError(
            f"inplace_grad=True needs student_logits whose elements do not share memory, got an expanded or "
            f"overlapping view (shape {tuple(student_logits.shape)}, strides {student_logits.stride()}); "
            f"pass student_logits.contiguous() or use inplace_grad=False"
        )
    device = student_logits.device
    weight, flat_labels = C.token_weights(lead, device, **pick(options, TOKEN_KEYWORDS),
                                          dtype=torch.float64 if student_logits.dtype == torch.float64
                                          else torch.float32)
    if ce_weight:
        C.check_label_range(flat_labels, weight, vocab)
    n = weight.numel()
    student2d = student_logits.reshape(n, student_logits.shape[-1])
    teacher2d = teacher_logits.reshape(n, teacher_logits.shape[-1])
    fn = backend_fn(requested_backend(options["backend"]))
    if teachers is not None:  # M stacked teachers: the backend runs on each chunk's mixture
        fn, teacher2d = MX.bind_rows(fn, teachers, t_weights, weight, params, vocab)
    call = DistillCall(params, vocab, reduction, bool(inplace_grad), fn,
                       bool(return_stats))
    loss = DistillFunction.apply(student2d, teacher2d, flat_labels if ce_weight else None, weight, call)
    if return_stats:
        loss, buf = loss
        loss = loss.view(lead) if reduction == "none" else loss
        return loss, stats_dict(buf, weight)
    return loss.view(lead) if reduction == "none" else loss
