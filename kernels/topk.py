"""Triton streaming top-k over the rows of a (N, V) fp32 logits chunk (teacher-cache extraction).

``_topk_kernel`` — grid (N,); program i streams row i in BLOCK_V tiles once and keeps the row's running top-K
(values and ids, KP = next power of two ≥ K lanes, lanes ≥ K held at −inf) in registers. A tile whose maximum
does not beat the running K-th value is skipped after one reduction (the common case once the running set has
filled on a long row); otherwise the K best of (running ∪ tile) are selected by K rounds of "take the larger of
the two maxima and knock it out" — O(K · (K + BLOCK_V)) for such a tile. The result is sorted descending like
``torch.topk``; ties go to the lower lane of the tile / the earlier-kept entry (so ids may differ from torch's
on exactly tied values, the values never do). NaN logits are not supported (the caller's logits are finite or
−inf). Opt-in (``extract_topk(..., topk_backend="triton")``): not measured on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_kernel(z_ptr, stride_z, V, vals_ptr, ids_ptr, K: tl.constexpr, KP: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    run_v = tl.full([KP], neg_inf, tl.float32)
    run_i = tl.full([KP], -1, tl.int32)
    # running entries taken so far (a −inf logit is a valid entry: a row may hold fewer than K finite ones)
    filled = tl.sum(tl.zeros([KP], tl.int32))
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inb = offs < V
        x = tl.load(z_ptr + row * stride_z + offs, mask=inb, other=neg_inf).to(tl.float32)
        kth = tl.min(tl.where(lanes < K, run_v, float("inf")))
        if (tl.max(x) > kth) | (filled < K):
            new_v = tl.full([KP], neg_inf, tl.float32)
            new_i = tl.full([KP], -1, tl.int32)
            avail_x = inb
            avail_r = (lanes < K) & (run_i >= 0)
            for r in tl.static_range(K):
                mx = tl.max(tl.where(avail_x, x, neg_inf))
                mr = tl.max(tl.where(avail_r, run_v, neg_inf))
                any_x = tl.max(avail_x.to(tl.int32)) > 0
                any_r = tl.max(avail_r.to(tl.int32)) > 0
                # the running entry wins ties (it came from an earlier column)
                take_r = any_r & ((mr >= mx) | (~any_x))
                ir = tl.min(tl.where(avail_r & (run_v == mr), lanes, KP))
                ix = tl.min(tl.where(avail_x & (x == mx), cols, BLOCK_V))
                id_r = tl.sum(tl.where(lanes == ir, run_i, 0))
                val = tl.where(take_r, mr, mx)
                idx = tl.where(take_r, id_r, start + ix)
                ok = any_r | any_x
                new_v = tl.where((lanes == r) & ok, val, new_v)
                new_i = tl.where((lanes == r) & ok, idx, new_i)
                avail_r = avail_r & ~((lanes == ir) & take_r)
                avail_x = avail_x & ~((cols == ix) & ~take_r & any_x)
            run_v = new_v
            run_i = new_i
            filled = tl.minimum(filled + tl.sum(inb.to(tl.int32)), K)
    tl.store(vals_ptr + row * K + lanes, run_v, mask=lanes < K)
    tl.store(ids_ptr + row * K + lanes, run_i.to(tl.int64), mask=lanes < K)


def topk_rows(z: torch.Tensor, k: int, block_v: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``z`` (N, V) fp32 (CUDA, or CPU under TRITON_INTERPRET=1) → (values (N, k) fp32
    descending, ids (N, k) int64). ``k`` ≤ 128 (the selection is unrolled k times)."""
    if z.dim() != 2 or z.dtype != torch.float32:
        raise ValueError(f"z must be a 2-D float32 tensor, got {tuple(z.shape)} {z.dtype}")
    n, v = z.shape
    if not 1 <= k <= min(v, 128):
        raise ValueError(f"k must be in [1, min(V, 128)] = [1, {min(v, 128)}], got {k}")
    if z.stride(1) != 1:
        z = z.contiguous()
    vals = torch.empty(n, k, dtype=torch.float32, device=z.device)
    ids = torch.empty(n, k, dtype=torch.int64, device=z.device)
    if n:
        kp = triton.next_power_of_2(k)
        bv = min(triton.next_power_of_2(v), block_v)
        _topk_kernel[(n,)](z, z.stride(0), v, vals, ids, K=k, KP=kp, BLOCK_V=bv)
    return vals, ids
