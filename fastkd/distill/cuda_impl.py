"""``cuda`` backend of the divergence losses on logits: the fastkd._C kernel (csrc/distill.cu).

Same contract as :mod:`fastkd.distill.torch_impl` (see :mod:`fastkd.distill.op`): one block per row
computes the row statistics, per-token loss and weighted gradient in fp32 from fp32/bf16/fp16 logits; rows
may be strided; the gradient may alias the student. The module imports without the extension (the
reasons say why it cannot run); auto dispatch does not pick it until GPU measurements exist. The divergence
code (``DistillParams.code``, after the table's endpoint rules) and the hyperparameters (``hyper_values()``,
csrc/fastkd.h ``enum Hyper`` order) pass through unchanged, so a new divergence needs no edit here.
"""

from __future__ import annotations

import torch

from fastkd.core.params import DistillParams
from fastkd.core.registry import register

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ROWS = 2**31 - 1  # grid.x limit: one block per row


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """Rows may be strided; columns must be unit-stride (else a contiguous copy)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def distill_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: DistillParams,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend entry point (op ``distill``).

    student, teacher: (N, V) fp32/bf16/fp16 CUDA, column stride 1 (else copied); labels (N,) int64 or
    None; weight (N,) fp32; grad (N, V) in the student's dtype or None (may alias student); stats (N, 4) fp32
    output or None (the kernel's STATS instantiation: pass 1 adds the raw-logit argmaxes, pass 2 the entropy
    and kl sums; :mod:`fastkd.core.stats`). Returns loss (N,) fp32.
    """
    from fastkd import _cpp_lib

    lib = _cpp_lib.lib()
    n, v = student.shape
    s = _row_major(student)
    t = _row_major(teacher)
    w = weight.to(torch.float32).contiguous()
    lab = None
    if p.ce_weight:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        lab = labels.to(torch.int64).contiguous()
    out_grad = grad
    if grad is not None and grad.stride(-1) != 1 and v > 1:
        out_grad = torch.empty((n, v), dtype=grad.dtype, device=grad.device)
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    st = stats
    if st is not None and (st.stride(1) != 1 or st.dtype != torch.float32):
        st = torch.empty((n, 4), dtype=torch.float32, device=student.device)
    if n and v:
        with torch.cuda.device(student.device):
            stream = torch.cuda.current_stream(student.device).cuda_stream
            lib.distill(
                s.data_ptr(), t.data_ptr(), 0 if out_grad is None else out_grad.data_ptr(),
                0 if lab is None else lab.data_ptr(), w.data_ptr(), loss.data_ptr(),
                n, v, s.stride(0), t.stride(0), 0 if out_grad is None else out_grad.stride(0),
                _cpp_lib.dtype_code(student.dtype), p.code, 1.0 / p.temperature, p.kd_scale,
                list(p.hyper_values()), p.ce_weight, stream,
                0 if st is None else st.data_ptr(), 0 if st is None else st.stride(0),
            )
    if out_grad is not None and out_grad is not grad:
        grad.copy_(out_grad)
    if st is not None and st is not stats:
        stats.copy_(st)
    return loss


def _limits(student: torch.Tensor | None = None, **_: object) -> list[str]:
    if student is not None and student.dim() == 2 and student.shape[0] > _MAX_ROWS:
        return [f"{student.shape[0]} rows exceed the one-block-per-row grid limit {_MAX_ROWS}"]
    return []


IMPL = register("distill", "cuda", distill_forward, _limits, requires="cuda_ext", tensors=("student", "teacher"),
                dtypes=SUPPORTED_DTYPES, dtype_inputs=("student",))
distill_reasons = IMPL.not_supported_reasons  # why the cuda backend cannot run some inputs ([] = it can)
