"""Triton row kernels of the on-policy losses: the student's log-probs at given ids and their logits gradient.

For a chunk's logits z (c, V) in the head's workspace dtype (bf16 / fp16 / fp32), u = z / T and ids (c, K):

``_rows_lse_kernel`` — grid (c,); program i streams row i once in BLOCK_V tiles: the log-sum-exp of u kept split
as (shift m = the row max, log Σ e^{u − m}), and u at the ids minus it, ``(u_id − m) − log Σ``: a difference of
two logits (exact in fp32) minus a log-sum of order log V, so a large constant offset of the logits costs no
accuracy. An id outside [0, V) is never read (its log-prob is NaN).

Between the two launches the caller turns the (c, K) log-probs into g = ∂loss/∂logq (c, K) (a torch step of
O(c·K)).

``_rows_grad_kernel`` — grid (c,); program i reads row i again and overwrites it (in place: each tile is read
before it is written) with the gradient of Σ_k g_k·logq_k in u, divided by T:

    ∂/∂z_v = (Σ_k g_k·[v = ids_k] − p_v·Σ_k g_k) / T,        p_v = exp((u_v − m) − log Σ)

rounded once to z's dtype. The ids come sorted ascending (with g in the same order): the ids inside the tile
[start, start + BLOCK_V) are the sorted slots [lo, hi), found by two O(K) counts, and only those are compared
with the tile, so each id costs one BLOCK_V-wide compare per row and a repeated id adds up like ``scatter_add``.
Traffic per logit: two reads and one write in z's dtype (6 B for bf16), no (c, V) temporary.

NaN logits give NaN log-probs and gradients for their row (the max and the sum carry them), as in torch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels._blocks import _lse_block


@triton.jit
def _rows_lse_kernel(
    z_ptr,  # (c, V) logits, any float dtype, row stride stride_z, unit column stride
    ids_ptr,  # (c, K) int64, row stride stride_ids
    shift_ptr,  # (c,) fp32 out: the row's shift m (its max of u; 0 for an all −inf row)
    ld_ptr,  # (c,) fp32 out: log Σ_v e^{u_v − m}
    lq_ptr,  # (c, K) fp32 out, contiguous: (u_id − m) − log Σ; NaN at an id outside [0, V)
    V,
    K,
    stride_z,
    stride_ids,
    inv_t,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        bm, bd = _lse_block(x)
        m_new = tl.maximum(m, bm)
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)
        # both terms rescaled to the new max (≤ 1 factors); an all −inf block or past adds 0, never 0·inf
        d = d * tl.exp(m - ms) + tl.where(bm == float("-inf"), 0.0, bd * tl.exp(bm - ms))
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ld = tl.log(d)
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    ids = tl.load(ids_ptr + row * stride_ids + offs_k, mask=in_k, other=0)
    ok = in_k & (ids >= 0) & (ids < V)
    x_id = tl.load(z_row + tl.where(ok, ids, 0), mask=ok, other=float("nan")).to(tl.float32) * inv_t
    tl.store(shift_ptr + row, m_safe)
    tl.store(ld_ptr + row, ld)
    tl.store(lq_ptr + row * K + offs_k, (x_id - m_safe) - ld, mask=in_k)


@triton.jit
def _rows_grad_kernel(
    z_ptr,  # (c, V) logits, row stride stride_z
    out_ptr,  # (c, V) gradient out in its dtype, row stride stride_out (may alias z_ptr)
    srt_ptr,  # (c, K) int64, contiguous: each row's ids sorted ascending, all in [0, V)
    gs_ptr,  # (c, K) fp32, contiguous: g in the sorted ids' order
    gsum_ptr,  # (c,) fp32: Σ_k g_k
    shift_ptr,  # (c,) fp32: m from _rows_lse_kernel
    ld_ptr,  # (c,) fp32: log Σ e^{u − m} from _rows_lse_kernel
    V,
    K,
    stride_z,
    stride_out,
    inv_t,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    out_row = out_ptr + row * stride_out
    srt_row = srt_ptr + row * K
    gs_row = gs_ptr + row * K
    m = tl.load(shift_ptr + row)
    ld = tl.load(ld_ptr + row)
    s = tl.load(gsum_ptr + row)
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    srt = tl.load(srt_row + offs_k, mask=in_k, other=0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        gv = -tl.exp((x - m) - ld) * s
        lo = tl.sum(((srt < start) & in_k).to(tl.int32), 0)
        hi = tl.sum(((srt < start + BLOCK_V) & in_k).to(tl.int32), 0)
        for j in range(lo, hi):  # the ids inside this tile only (sorted slots lo..hi-1)
            gv += tl.where(offs == tl.load(srt_row + j), tl.load(gs_row + j), 0.0)
        tl.store(out_row + offs, (gv * inv_t).to(out_ptr.dtype.element_ty), mask=offs < V)
