"""``cuda`` backend of the sparse (top-k / tail / sampled) losses: fastkd._C kernels (csrc/sparse.cu).

Same contract as :mod:`fastkd.sparse.torch_impl` (see :mod:`fastkd.sparse.op`). The two passes over
the vocabulary run in CUDA — statistics (lse, exact tail lse via an id bitmap, s at the ids) and the
gradient ``q_v·(a + b·[v ∉ ids]) + Σ_k c_k·[v = id_k]`` — and the O(N·K) terms between them are
:func:`fastkd.sparse.torch_impl.sparse_terms`, shared with the other backends. fp32 math; fp64 inputs
are left to the torch backend. With ``stats`` the statistics kernel (STATS template flag) also writes the
student's entropy and first argmax from its one pass, and :func:`fastkd.sparse.torch_impl.sparse_stats` adds
the O(N·K) teacher side. Imports cleanly without the extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastkd.core.registry import cuda_ext_reasons, register

if TYPE_CHECKING:
    from fastkd.core.params import SparseParams

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ROWS = 2**31 - 1


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def sparse_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: SparseParams,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend entry point (op ``sparse``).

    student (N, V) fp32/bf16/fp16 CUDA raw logits; ids (N, K) int64 (−1 = padding); t_logp (N, K) fp32,
    t_tail (N,) fp32 or None; weight (N,) fp32; grad (N, V) in the student's dtype or None (may alias
    student); stats (N, 4) fp32 or None. Returns the per-token loss (N,) fp32.
    """
    from fastkd import _cpp_lib
    from fastkd.sparse.torch_impl import sparse_stats, sparse_terms

    lib = _cpp_lib.lib()
    n, v = student.shape
    k = ids.shape[1]
    z = _unit_cols(student)
    ids = _unit_cols(ids.to(torch.int64))
    w = weight.to(torch.float32).contiguous()
    dev = student.device
    tail = p.mode == "topk_tail"
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    lse_tail = torch.empty(n, dtype=torch.float32, device=dev) if tail else None
    s_ids = torch.empty((n, k), dtype=torch.float32, device=dev)
    inv_t = 1.0 / p.temperature
    code = _cpp_lib.dtype_code(student.dtype)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        tail_ptr = 0 if lse_tail is None else lse_tail.data_ptr()
        h_s = torch.empty(n, dtype=torch.float32, device=dev) if stats is not None else None
        arg_s = torch.empty(n, dtype=torch.int64, device=dev) if stats is not None else None
        lib.sparse_stats(z.data_ptr(), ids.data_ptr(), w.data_ptr(), lse.data_ptr(), tail_ptr,
                         s_ids.data_ptr(), n, v, k, z.stride(0), ids.stride(0), code, inv_t, stream,
                         0 if h_s is None else h_s.data_ptr(), 0 if arg_s is None else arg_s.data_ptr())
        tlp = t_logp.to(torch.float32)
        tt = None if t_tail is None else t_tail.to(torch.float32)
        loss, c, a, lb, b = sparse_terms(s_ids, lse, lse_tail, tlp, tt, w, p)
        if stats is not None:
            sparse_stats(stats, h_s, arg_s, ids, s_ids, lse, lse_tail, tlp, tt, w)
        if grad is not None:
            out = grad
            if grad.stride(-1) != 1 and v > 1:
                out = torch.empty((n, v), dtype=grad.dtype, device=dev)
            zero_base = p.mode == "topk" and p.effective != "fkl"
            c = c.to(torch.float32).contiguous()
            lib.sparse_grad(z.data_ptr(), out.data_ptr(), ids.data_ptr(), w.data_ptr(), s_ids.data_ptr(),
                            lse.data_ptr(), lb.to(torch.float32).contiguous().data_ptr(),
                            a.to(torch.float32).contiguous().data_ptr(),
                            b.to(torch.float32).contiguous().data_ptr(), c.data_ptr(), n, v, k, z.stride(0),
                            out.stride(0), ids.stride(0), code, inv_t, zero_base, stream)
            if out is not grad:
                grad.copy_(out)
    return loss


def _limits(student: torch.Tensor | None = None, ids: torch.Tensor | None = None,
            params: SparseParams | None = None, **_: object) -> list[str]:
    if student is None or student.dim() != 2:
        return []
    if student.shape[0] > _MAX_ROWS:
        return [f"{student.shape[0]} rows exceed the one-block-per-row grid limit {_MAX_ROWS}"]
    if (params is not None and params.mode == "topk_tail" and student.dtype in SUPPORTED_DTYPES
            and not cuda_ext_reasons(student, ids)):  # the limit is the loaded extension's own constant
        from fastkd import _cpp_lib

        max_vocab = _cpp_lib.lib().SPARSE_MAX_TAIL_VOCAB  # the kernel's shared-memory id bitmap
        if student.shape[1] > max_vocab:
            return [f"mode='topk_tail' supports vocabularies up to {max_vocab} on the cuda backend "
                    f"(shared-memory id bitmap), got {student.shape[1]}"]
    return []


IMPL = register("sparse", "cuda", sparse_forward, _limits, requires="cuda_ext", tensors=("student", "ids"),
                dtypes=SUPPORTED_DTYPES, dtype_inputs=("student",))
sparse_reasons = IMPL.not_supported_reasons  # why the cuda backend cannot run some inputs ([] = it can)
