"""Triton kernels of the sparse (top-k / tail / sampled) distillation losses.

Two row-per-program kernels around the shared K-level math of ``fastkd.sparse.torch_impl.sparse_terms``:

``_sparse_stats_kernel`` — grid (N,); program i streams row i of the student logits once in BLOCK_V tiles
and produces, for s = z / T: the online log-sum-exp over the whole vocabulary, (HAS_TAIL) the online
log-sum-exp over the entries whose id is NOT among the row's K ids, and s gathered at the K ids. Each
log-normaliser stays split as (shift m, log-sum): the kernel stores m (the row max) and s − m, log Σe^{s−m}
(and the tail's (m_tail − m) + log Σ_tail e^{s−m_tail}), which the shift-invariant K-level math takes in place
of s and the lse's; the gradient kernel exponentiates (s_v − m) − lb. So no value is rounded at the logits'
magnitude and a constant offset of the logits does not change the fp32 accuracy.

Tail membership in O(V + K·BLOCK_V) per row, not O(V·K): the wrapper passes the row's ids sorted ascending
(a torch sort of the (N, K) ids, K ≤ a few hundred). For the tile [start, start + BLOCK_V) the ids inside it
are the contiguous sorted slots [lo, hi) with lo = #{id < start}, hi = #{id < start + BLOCK_V} (two O(K)
counts per tile), and only those are compared with the tile: Σ over tiles of (hi − lo) = K, so each id costs
one BLOCK_V-wide compare in the whole row (the CUDA kernel marks a shared-memory bitmap instead; Triton has
no scatter into registers). Padding (−1) and any negative id sort below every tile start and are never
compared; an id ≥ V only matches a masked-off lane of the last tile (already −inf). The tail sum itself is
taken over the unmarked entries, never as total − head mass (that difference cancels catastrophically when
the head holds almost all the mass). With a tail, the tiles go through one online log-sum-exp only (the
tail's): the full lse is then logaddexp(lse_tail, logsumexp of s at the row's distinct valid ids) — exact,
a sum of positive terms — which halves the per-element exp work of this pass.
With ``STATS`` (``return_stats=True``) the same pass also yields the student's entropy over the whole
row (per-tile (m, d, c = Σ e^{x−m}(x − m)), H = log d − c/d; with a tail: the tail's tiles, then the head merged
in as for the lse) and its argmax (first index on ties): no extra read of the logits. ``STATS`` is a constexpr:
with it off the kernel is the loss-only one, so the loss and gradient are bitwise the same either way.

``_sparse_grad_kernel`` — grid (N,); program i writes row i of the gradient ``g_v = b'·exp((s_v − m) − lb)``
tile by tile (the off-id term; lb = lse_tail for topk_tail so that an underflowing tail stays finite), then,
after a block barrier, overwrites the K id positions with ``a·exp(s_id − lse) + Σ_{j: id_j = id} c_j`` (one
rounding to the output dtype; the gradient may alias the logits: each tile is read before it is written, and
the id fix-up needs only the gathered s_ids). The fix-up walks the ids in sorted order: a repeated id is a run
of equal neighbours whose Σ c a segmented prefix sum gives at the run's last slot, the only slot that stores
it — duplicated ids add up like ``scatter_add``, in O(K) registers (a K×K compare spilled at K ≥ 256).

Ids are untrusted on the device (value checks are off for GPU tensors by default): every access at an id is
masked by ``0 <= id < V``, and an id outside [−1, V) yields s = NaN in the stats pass, which makes that
token's loss and gradient NaN (``sparse_terms``) rather than touching memory outside the row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online(m, d, x):
    """Fold a tile x (BLOCK,) into a running (max m, sum d of exp(x − m)); −inf-safe."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
    return m_new, d


@triton.jit
def _online_stats(m, d, c, bv, bi, x, start):
    """:func:`_online` (the same m, d bit for bit) plus the entropy sum c = Σ e^{x−m}(x − m) and the running
    argmax (value bv, index bi; a later tile wins only when strictly larger: the first index on ties)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    # rescale the old c to the new max; a −inf x or an empty past (m = −inf, d = 0) adds 0, not 0·(−inf)
    c = (c + tl.where(m == float("-inf"), 0.0, d * (m - m_safe))) * alpha
    c = c + tl.sum(tl.where(x == float("-inf"), 0.0, e * (x - m_safe)), 0)
    d = d * alpha + tl.sum(e, 0)
    tv, ti = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    take = tv > bv
    return m_new, d, c, tl.where(take, tv, bv), tl.where(take, start + ti, bi)


@triton.jit
def _segmented_add(f1, v1, f2, v2):
    """Combine of a segmented sum: (flag, value) pairs; a set flag starts a new segment (associative)."""
    return f1 | f2, tl.where(f2 != 0, v2, v1 + v2)


@triton.jit
def _sparse_stats_kernel(
    z_ptr,  # (N, V) student logits, any float dtype, row stride stride_z, unit column stride
    ids_ptr,  # (N, K) int64, −1 = padding slot, row stride stride_ids
    sorted_ptr,  # (N, K) int64, contiguous: each row's ids sorted ascending (HAS_TAIL; else unused)
    shift_ptr,  # (N,) fp32 out: the row's shift m (its max; 0 for an all −inf row)
    lse_ptr,  # (N,) fp32 out: logsumexp_v (s_v − m)
    lse_tail_ptr,  # (N,) fp32 out: logsumexp_{v ∉ ids} (s_v − m) (HAS_TAIL)
    s_ids_ptr,  # (N, K) fp32 out, contiguous: s − m at the ids, −inf at padding
    h_ptr,  # (N,) fp32 out (STATS): entropy of softmax(s) over the whole row
    arg_ptr,  # (N,) int64 out (STATS): argmax_v s_v, first index on ties
    V,
    K,
    stride_z,
    stride_ids,
    inv_t,
    HAS_TAIL: tl.constexpr,
    STATS: tl.constexpr,  # False: the kernel is the loss-only one, unchanged (loss bitwise the same either way)
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * stride_ids + offs_k, mask=offs_k < K, other=-1)
    m = tl.full((), float("-inf"), tl.float32)  # full-row statistics (without a tail)
    d = tl.zeros((), tl.float32)
    mt = tl.full((), float("-inf"), tl.float32)  # tail statistics (HAS_TAIL)
    dt = tl.zeros((), tl.float32)
    c = tl.zeros((), tl.float32)  # STATS: Σ e^{x−m}(x − m) of the running (m, d) (the tail's with HAS_TAIL)
    bv = tl.full((), float("-inf"), tl.float32)  # STATS: running max value / its index (the tail's)
    bi = tl.zeros((), tl.int32)
    srt_row = sorted_ptr + row * K
    if HAS_TAIL:
        srt = tl.load(srt_row + offs_k, mask=offs_k < K, other=0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        if not HAS_TAIL:
            if STATS:
                m, d, c, bv, bi = _online_stats(m, d, c, bv, bi, x, start)
            else:
                m, d = _online(m, d, x)
        else:
            lo = tl.sum(((srt < start) & (offs_k < K)).to(tl.int32), 0)  # slots past K are not ids: never
            hi = tl.sum(((srt < start + BLOCK_V) & (offs_k < K)).to(tl.int32), 0)  # counted, never read
            for j in range(lo, hi):  # only the ids inside this tile (sorted slots lo..hi-1) leave the tail
                x = tl.where(offs == tl.load(srt_row + j), float("-inf"), x)
            if STATS:
                mt, dt, c, bv, bi = _online_stats(mt, dt, c, bv, bi, x, start)
            else:
                mt, dt = _online(mt, dt, x)
    valid = (ids >= 0) & (ids < V)
    s_ids = tl.load(z_row + tl.where(valid, ids, 0), mask=valid, other=float("-inf")).to(tl.float32) * inv_t
    if HAS_TAIL:
        mt_safe = tl.where(mt == float("-inf"), 0.0, mt)
        # the head: each distinct valid id once, in sorted order (a repeat equals its predecessor): O(K), no
        # K×K compare (that would spill registers at K = 512)
        prev = tl.load(srt_row + offs_k - 1, mask=(offs_k >= 1) & (offs_k < K), other=-1)
        first = (offs_k < K) & (srt >= 0) & (srt < V) & ((srt != prev) | (offs_k == 0))
        s_head = tl.load(z_row + tl.where(first, srt, 0), mask=first, other=float("-inf")).to(tl.float32) * inv_t
        mh = tl.max(s_head, 0)
        mh_safe = tl.where(mh == float("-inf"), 0.0, mh)
        dh = tl.sum(tl.exp(s_head - mh_safe), 0)
        m = tl.maximum(mt, mh)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        d = dt * tl.exp(mt - m_safe) + dh * tl.exp(mh - m_safe)
        if STATS:  # merge the head's (mh, dh, ch) and argmax into the tail's
            ch = tl.sum(tl.where(s_head == float("-inf"), 0.0, tl.exp(s_head - mh_safe) * (s_head - mh_safe)), 0)
            c = tl.where(mt == float("-inf"), 0.0, (c + dt * (mt - m_safe)) * tl.exp(mt - m_safe)) + tl.where(
                mh == float("-inf"), 0.0, (ch + dh * (mh - m_safe)) * tl.exp(mh - m_safe))
            # the head's argmax: its first sorted slot = the smallest id on ties; it wins a tie with the tail's
            # only when its id is smaller (torch.argmax's first index)
            hpos = tl.argmax(s_head, 0, tie_break_left=True)
            hid = tl.sum(tl.where(offs_k == hpos, srt, 0), 0).to(tl.int32)
            take = (mh > bv) | ((mh == bv) & (mh > float("-inf")) & (hid < bi))
            bi = tl.where(take, hid, bi)
        # the tail's normaliser relative to the row's shift: mt − m is the exact difference of two logits
        tl.store(lse_tail_ptr + row, (mt_safe - m_safe) + tl.log(dt))
    else:
        m_safe = tl.where(m == float("-inf"), 0.0, m)
    # the log-normaliser kept split as (m, log d): the K-level math sees s − m (exact differences), never
    # m + log d rounded at the logits' magnitude
    tl.store(shift_ptr + row, m_safe)
    tl.store(lse_ptr + row, tl.log(d))
    if STATS:
        tl.store(h_ptr + row, tl.log(d) - c / d)
        tl.store(arg_ptr + row, bi.to(tl.int64))
    s_ids = tl.where(valid | (ids == -1), s_ids - m_safe, float("nan"))  # an out-of-range id poisons its token
    tl.store(s_ids_ptr + row * K + offs_k, s_ids, mask=offs_k < K)


@triton.jit
def _sparse_grad_kernel(
    z_ptr,  # (N, V) student logits, row stride stride_z
    g_ptr,  # (N, V) gradient out in its dtype, row stride stride_g (may alias z_ptr)
    sorted_ptr,  # (N, K) int64, contiguous: each row's ids sorted ascending
    perm_ptr,  # (N, K) int64, contiguous: the slot each sorted id came from (ids[perm[j]] = sorted[j])
    s_ids_ptr,  # (N, K) fp32, contiguous (from the stats kernel): s − m at the ids
    c_ptr,  # (N, K) fp32, contiguous: coefficient added at each id
    shift_ptr,  # (N,) fp32: the row's shift m (from the stats kernel)
    lse_ptr,  # (N,) fp32: logsumexp of s − m over the row (the id columns' normaliser)
    a_ptr,  # (N,) fp32: coefficient of exp(s_v − m − lse) at the ids
    lb_ptr,  # (N,) fp32: normaliser of the off-id term (lse_tail for topk_tail, else lse; 0 if excluded)
    b_ptr,  # (N,) fp32: coefficient of exp(s_v − m − lb) off the ids
    w_ptr,  # (N,) fp32 token weights; 0 = excluded row (gradient 0 whatever the logits)
    V,
    K,
    stride_z,
    stride_g,
    inv_t,
    DENSE: tl.constexpr,  # False when a = b = 0 (topk rkl/jsd): the row is 0 except at the ids
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * stride_g
    keep = tl.load(w_ptr + row) != 0
    lse = tl.where(keep, tl.load(lse_ptr + row), 0.0)
    lb = tl.where(keep, tl.load(lb_ptr + row), 0.0)
    sh = tl.where(keep, tl.load(shift_ptr + row), 0.0)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        if DENSE:
            x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
            g = tl.where(keep, tl.exp((x - sh) - lb) * b, 0.0)
        else:
            g = tl.zeros((BLOCK_V,), tl.float32)
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)
    tl.debug_barrier()  # the id fix-up below must land after the tile stores of this row
    # the ids in ascending order: a repeated id is a run of equal neighbours; a segmented prefix sum gives each
    # run's total Σ c at its last slot, which alone stores it (one store per column, no race; O(K), not K×K)
    srt_row = sorted_ptr + row * K
    in_k = offs_k < K
    srt = tl.load(srt_row + offs_k, mask=in_k, other=-1)
    perm = tl.load(perm_ptr + row * K + offs_k, mask=in_k, other=0)
    prev = tl.load(srt_row + offs_k - 1, mask=in_k & (offs_k >= 1), other=-1)
    nxt = tl.load(srt_row + offs_k + 1, mask=offs_k + 1 < K, other=-1)
    valid = (srt >= 0) & (srt < V) & in_k
    s_ids = tl.load(s_ids_ptr + row * K + perm, mask=valid, other=float("-inf"))
    c = tl.load(c_ptr + row * K + perm, mask=valid, other=0.0)
    run_start = ((srt != prev) | (offs_k == 0)).to(tl.int32)
    _, c_sum = tl.associative_scan((run_start, c), 0, _segmented_add)
    last = valid & ((srt != nxt) | (offs_k + 1 >= K))
    g_ids = tl.where(keep, tl.exp(s_ids - lse) * a + c_sum, 0.0)
    if not DENSE:
        g_ids = tl.where(keep, c_sum, 0.0)
    tl.store(g_row + tl.where(last, srt, 0), g_ids.to(g_ptr.dtype.element_ty), mask=last)
