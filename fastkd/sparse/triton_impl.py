"""``triton`` backend of the sparse distillation losses (kernels in ``fastkd.kernels.sparse``).

Registers op ``"sparse"`` on backend ``"triton"`` with the contract of :mod:`fastkd.sparse.op`: the stats
kernel streams each row once (lse, tail lse, gather at the ids), the shared K-level math
(:func:`fastkd.sparse.torch_impl.sparse_terms`, O(N·K)) turns them into the loss and the gradient
coefficients, and the gradient kernel writes each row once. Imports cleanly without Triton (the backend is
then registered with the import error as its reason). Default launch: ``BLOCK_V=4096``, ``num_warps=8``;
:data:`CONFIG` can be changed (tests use small blocks so that several vocabulary tiles are exercised).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastkd.core.registry import register, triton_import_error, triton_reasons
from fastkd.sparse.torch_impl import sparse_terms

if TYPE_CHECKING:
    from fastkd.core.params import SparseParams

_IMPORT_ERROR = triton_import_error()
K_ = None
if _IMPORT_ERROR is None:
    try:
        import triton

        from fastkd.kernels import sparse as K_
    except Exception as exc:  # a broken Triton install or a kernel that does not compile under it
        _IMPORT_ERROR = f"fastkd.kernels.sparse failed to import ({type(exc).__name__}: {exc})"
        K_ = None

CONFIG: dict[str, int] = {"block_v": 4096, "num_warps": 8}
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sparse_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: SparseParams,
) -> torch.Tensor:
    """Backend entry point (op ``sparse``); shapes as in ``torch_sparse.sparse_forward``."""
    n, v = student.shape
    k = ids.shape[1]
    if student.stride(1) != 1:
        student = student.contiguous()
    ids = ids.contiguous()
    dev = student.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    has_tail = p.mode == "topk_tail"
    lse_tail = torch.empty(n, dtype=torch.float32, device=dev) if has_tail else lse
    s_ids = torch.empty(n, k, dtype=torch.float32, device=dev)
    block_v = min(CONFIG["block_v"], triton.next_power_of_2(max(v, 16)))
    block_k = triton.next_power_of_2(max(k, 2))
    # both kernels walk each row's ids in ascending order (a (N, K) sort here, O(N·K log K)): the tail's
    # membership test compares each id with the one tile it falls in, and the gradient's id fix-up sums a
    # repeated id's slots as a run of equal neighbours
    ids_sorted, perm = ids.sort(dim=1)
    # each id costs one BLOCK_V-wide compare: a smaller tile keeps that near one lane-op per logit at K = 64
    stats_block = max(16, min(block_v, max(1024, 65536 // block_k))) if has_tail else block_v
    stats_warps = max(1, min(CONFIG["num_warps"], stats_block // 256))  # >= 8 logits per thread
    inv_t = 1.0 / p.temperature
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=dev)
    K_._sparse_stats_kernel[(n,)](
        student,
        ids,
        ids_sorted,
        lse,
        lse_tail,
        s_ids,
        v,
        k,
        student.stride(0),
        ids.stride(0),
        inv_t,
        HAS_TAIL=has_tail,
        BLOCK_V=stats_block,
        BLOCK_K=block_k,
        num_warps=stats_warps,
    )
    loss, c, a, lb, b = sparse_terms(s_ids, lse, lse_tail if has_tail else None, t_logp, t_tail, weight, p)
    if grad is not None:
        dense = not (p.mode == "topk" and p.effective != "fkl")
        K_._sparse_grad_kernel[(n,)](
            student,
            grad,
            ids_sorted,
            perm,
            s_ids,
            c.contiguous(),
            lse,
            a.contiguous(),
            lb.contiguous(),
            b.contiguous(),
            weight,
            v,
            k,
            student.stride(0),
            grad.stride(0),
            inv_t,
            DENSE=dense,
            BLOCK_V=block_v,
            BLOCK_K=block_k,
            num_warps=CONFIG["num_warps"],
        )
    return loss


def _reasons(student: torch.Tensor | None = None, **_: object) -> list[str]:
    if _IMPORT_ERROR is not None:
        return [_IMPORT_ERROR]
    reasons = triton_reasons(student)
    if student is not None and student.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {student.dtype} (the Triton kernels take float32, bfloat16 or float16)")
    return reasons


register("sparse", "triton", sparse_forward, _reasons)
