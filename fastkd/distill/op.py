"""``fastkd.distill_loss``: divergence losses between student and teacher logits.

Layers: :func:`distill_loss` validates arguments and turns masks/reductions into per-token weights
(:mod:`fastkd.core.checks`); :class:`DistillFunction` calls one backend's ``distill`` implementation,
which computes the per-token loss *and* the weighted gradient in the forward pass; backward only scales
that gradient by ``grad_output`` (in place: the gradient buffer is the only (N, V) tensor kept).

Backend contract (op ``"distill"``)::

    fn(student (N, V), teacher (N, V), labels (N,) int64 | None, weight (N,) fp32,
       grad (N, V) | None, params: DistillParams) -> loss (N,) fp32

Rows of ``student``/``teacher`` may be strided (vocabulary padding is sliced off as a view); ``grad``,
when given, must be written with ``weight[i] * ∂loss_i/∂student[i]`` in its own dtype and may alias
``student``; rows with ``weight == 0`` get loss 0 and gradient 0 whatever their logits are.
"""

from __future__ import annotations

import math

import torch

from fastkd.core import checks as C
from fastkd.core.autograd import scale_grad
from fastkd.core.params import DIVERGENCE_CODES, DistillParams
from fastkd.core.registry import declare, requested_backend, select

DIVERGENCES: tuple[str, ...] = tuple(DIVERGENCE_CODES)

declare(
    "distill",
    ["fastkd.distill.torch_impl", "fastkd.distill.triton_impl", "fastkd.distill.cuda_impl"],
    auto_order=("triton", "torch"),
)


@torch.library.custom_op("fastkd::distill_rows", mutates_args=("grad",))
def distill_rows(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, weight: torch.Tensor,
    grad: torch.Tensor | None, divergence: str, temperature: float, scale_by_t2: bool, beta: float, alpha: float,
    mu: float, t: float, ce_weight: float, chunk_size: int, backend: str,
) -> torch.Tensor:
    """Per-token loss (N,) of one backend's ``distill`` on rows; writes the weighted gradient into ``grad``.

    The one entry point to the backends for dense losses: eager autograd Functions call it directly and
    ``torch.compile`` sees it as an opaque op (fake implementation below). ``chunk_size=0`` = automatic.
    """
    params = DistillParams(divergence=divergence, temperature=temperature, scale_by_t2=scale_by_t2, beta=beta,
                           alpha=alpha, mu=mu, t=t, ce_weight=ce_weight, chunk_size=chunk_size or None)
    impl = select("distill", backend, student=student, teacher=teacher, params=params)
    return impl.fn(student, teacher, labels, weight, grad, params)


@distill_rows.register_fake
def _distill_rows_fake(student, teacher, labels, weight, grad, *args):
    return student.new_empty(student.shape[0], dtype=torch.float64 if student.dtype == torch.float64
                             else torch.float32)


def backend_fn(backend: str):
    """A ``distill`` backend callable (contract in the module docstring) that goes through the custom op."""

    def fn(student, teacher, labels, weight, grad, p: DistillParams) -> torch.Tensor:
        return distill_rows(student, teacher, labels, weight, grad, p.divergence, p.temperature, p.scale_by_t2,
                            p.beta, p.alpha, p.mu, p.t, p.ce_weight, p.chunk_size or 0, backend)

    return fn


def make_params(
    divergence: str,
    *,
    temperature: float,
    scale_by_t2: bool,
    beta: float,
    alpha: float,
    mu: float,
    t: float,
    ce_weight: float,
    chunk_size: int | None,
    softcap: float | None = None,
) -> DistillParams:
    """Validate the non-tensor arguments shared by the dense losses and pack them."""
    C.check_choice("divergence", divergence, DIVERGENCES)
    C.check_positive("temperature", temperature)
    C.check_range("beta", beta, 0.0, 1.0)
    C.check_range("alpha", alpha, 0.0, 1.0)
    C.check_range("mu", mu, 0.0, 1.0)
    C.check_range("t", t, 0.0, 1.0)
    C.check_range("ce_weight", ce_weight, 0.0, math.inf)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None:
        C.check_positive("softcap", softcap)
    return DistillParams(
        divergence=divergence, temperature=float(temperature), scale_by_t2=bool(scale_by_t2),
        beta=float(beta), alpha=float(alpha), mu=float(mu), t=float(t), ce_weight=float(ce_weight),
        chunk_size=chunk_size, softcap=None if softcap is None else float(softcap),
    )


class DistillFunction(torch.autograd.Function):
    """Autograd wrapper: loss and gradient in forward, gradient scaling in backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, weight, params, vocab, reduction, inplace_grad, fn):
        n, v = student.shape
        grad = None
        if ctx.needs_input_grad[0]:
            if inplace_grad:
                grad = student.detach()
            else:
                grad = torch.empty_like(student, memory_format=torch.contiguous_format)
            if vocab < v:
                grad[:, vocab:].zero_()
        loss = fn(student[:, :vocab], teacher[:, :vocab], labels, weight,
                  None if grad is None else grad[:, :vocab], params)
        out = C.reduce_tokens(loss, weight, reduction, (n,))
        ctx.per_row = reduction == "none"
        ctx.used = False
        if grad is not None:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError(
                "fastkd.distill_loss: backward ran twice through the same graph after the stored CUDA "
                "gradient was scaled in place; recompute the loss instead of using retain_graph=True"
            )
        (grad,) = ctx.saved_tensors
        grad, ctx.used = scale_grad(grad, grad_output, ctx.per_row)
        return grad, None, None, None, None, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    mu: float = 0.5,
    t: float = 0.5,
    chunk_size: int | None = None,
    inplace_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation divergence between student and teacher logits, fused loss + gradient.

    Args:
        student_logits: (..., V) float32/bfloat16/float16 (float64 for checks); receives the gradient.
        teacher_logits: (..., V') same dtype and device; a constant (must not require grad).
        divergence: one of ``fastkd.DIVERGENCES`` (formulas in DESIGN.md / README), with p = teacher,
            q = student after dividing both logits by ``temperature``.
        scale_by_t2: multiply the divergence term by T² (Hinton).
        labels, ignore_index, mask: exclude tokens (``labels == ignore_index`` or ``mask == False``).
        reduction: "mean" (over kept tokens), "sum" or "none" (per token, 0 where excluded).
        num_items_in_batch: when given, the sum is divided by it (HF gradient accumulation).
        ce_weight: adds ``ce_weight × cross_entropy(student_logits, labels)`` (un-tempered) per token.
        vocab_size: use only the first ``vocab_size`` columns of both (vocabulary padding).
        beta: jsd / symkl mixing weight; alpha: skl / srkl skew; mu: akl head mass; t: taid interpolation.
        chunk_size: rows per chunk for the torch backend (default: ~4M elements per chunk).
        inplace_grad: write the gradient into ``student_logits``' storage (saves one (N, V) buffer;
            the logits are overwritten, autograd raises if something else still needs them).
        backend: "auto", "torch", "triton" or "cuda" (``FASTKD_BACKEND`` when "auto").

    Returns:
        fp32 scalar, or fp32 (...,) for reduction="none" (float64 for float64 inputs).
    """
    C.check_float_tensor("student_logits", student_logits)
    C.check_float_tensor("teacher_logits", teacher_logits)
    C.check_constant("teacher_logits", teacher_logits)
    C.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(f"student_logits and teacher_logits must have one dtype, got {student_logits.dtype} "
                        f"and {teacher_logits.dtype}; cast the teacher with .to({student_logits.dtype})")
    lead = tuple(student_logits.shape[:-1])
    if tuple(teacher_logits.shape[:-1]) != lead:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must match in every dimension but the last")
    vocab = C.resolve_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    params = make_params(divergence, temperature=temperature, scale_by_t2=scale_by_t2, beta=beta, alpha=alpha,
                         mu=mu, t=t, ce_weight=ce_weight, chunk_size=chunk_size)
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels (the cross-entropy targets)")
    device = student_logits.device
    weight, flat_labels = C.token_weights(lead, device, labels=labels, ignore_index=ignore_index, mask=mask,
                                          reduction=reduction, num_items_in_batch=num_items_in_batch,
                                          dtype=torch.float64 if student_logits.dtype == torch.float64
                                          else torch.float32)
    if ce_weight:
        C.check_label_range(flat_labels, weight, vocab)
    n = weight.numel()
    student2d = student_logits.reshape(n, student_logits.shape[-1])
    teacher2d = teacher_logits.reshape(n, teacher_logits.shape[-1])
    loss = DistillFunction.apply(student2d, teacher2d, flat_labels if ce_weight else None, weight, params,
                                 vocab, reduction, inplace_grad, backend_fn(requested_backend(backend)))
    return loss.view(lead) if reduction == "none" else loss
