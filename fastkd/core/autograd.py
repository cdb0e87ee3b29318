"""Autograd helpers shared by the fused-in-forward losses (gradient computed in forward, scaled in backward).

Why grad_output is applied here and not inside the loss kernels: the kernels write the gradient during the
forward pass (that is what makes the logits path one read of each logit plus one write of the gradient), when
grad_output is not known yet. Backward then costs nothing when grad_output == 1 (the usual
``loss.backward()``): the device-side kernel reads one scalar per row and returns. With grad_output != 1 it
reads and writes the gradient once more; the only alternative that avoids it without knowing grad_output in
forward, deferring the gradient to backward (with the row statistics saved), re-reads the student and teacher
instead — the same bytes for grad_output != 1 and two extra reads for grad_output == 1 — so it is not used.
Consumers that know the factor earlier can fold it into the per-token weights (``weight``) instead.
"""

from __future__ import annotations

import torch


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, bool]:
    """grad · grad_output (a scalar, or one value per row) → (result, whether ``grad`` was modified).

    On CUDA the device-side Triton kernel scales in place and skips the pass when grad_output == 1 (no host
    sync, no second (N, V) buffer). Elsewhere ``grad`` is never modified: it is returned as is when
    grad_output is exactly 1 (checked on the host, which costs no sync for CPU tensors), else a scaled copy.
    """
    if grad.is_cuda and not torch.compiler.is_compiling():
        from fastkd.core.registry import triton_import_error

        if triton_import_error() is None:
            return scale_grad_(grad, grad_output, per_row), True
    if not grad.is_cuda and not torch.compiler.is_compiling() and bool((grad_output == 1).all()):
        return grad, False
    g = grad_output.reshape(-1, *([1] * (grad.dim() - 1))) if per_row else grad_output
    return grad * g.to(grad.dtype), False


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``grad *= grad_output`` in place, reading grad_output on the device (no host sync).

    grad: (N, V) any float dtype (a 1-D tensor is treated as (N, 1)); grad_output: a one-element tensor
    (``per_row=False``) or (N,) (``per_row=True``). Rows whose factor is exactly 1.0 are not touched.
    Returns ``grad``.
    """
    g2 = grad if grad.dim() == 2 else grad.reshape(grad.shape[0], -1) if grad.dim() else grad.reshape(1, 1)
    n, v = g2.shape
    if per_row:
        if grad_output.numel() != n:
            raise ValueError(f"grad_output must have {n} values (one per row), got {grad_output.numel()}")
        go = grad_output.reshape(n)
        go_stride = go.stride(0)
    else:
        if grad_output.numel() != 1:
            raise ValueError(f"grad_output must have one value, got shape {tuple(grad_output.shape)}")
        go = grad_output.reshape(1)
        go_stride = 0
    if n == 0 or v == 0:
        return grad
    block = min(4096, max(16, 1 << (v - 1).bit_length()))
    from fastkd.kernels.distill import _scale_grad_kernel

    _scale_grad_kernel[(n,)](g2, go, v, g2.stride(0), g2.stride(1), go_stride, BLOCK=block,
                               num_warps=4)
    return grad
