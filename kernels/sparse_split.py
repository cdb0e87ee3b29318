"""Split-row Triton schedule of the sparse (top-k / tail / sampled) losses: each student logit read once from HBM.

Same contract and notation as :mod:`fastkd.kernels.sparse` (the row-per-program kernels, kept as the fallback)
and :func:`fastkd.sparse.torch_impl.sparse_terms` (the K-level math); this module changes the schedule.

Why. The row-per-program pair (stats kernel, then the torch K-level math, then the gradient kernel) reads each
row twice; at V = 131072 bf16 a row is 256 KB and ~528-1024 rows are in flight, far more than the 50 MB L2,
so the gradient pass re-reads the logits from HBM. Splitting rows across programs bounds the bytes between the
two reads (the argument of :mod:`fastkd.kernels.distill_split`), but the gradient of row r needs the K-level
coefficients (a, b', lb, c) of row r, i.e. every segment's statistics *and* the O(K) math before its first
gradient element: with one launch that math must run inside the kernel. It runs once per row, in the program
of segment 0 (``_row_terms``, the Triton transcription of ``sparse_terms``: same formulas, same NaN /
exclusion rules, tested against the torch path and the float64 reference).

Schedule. ``S = ceil(V / BLOCK_V)`` segments per row; a unit is (row r, segment j), taken in ticket order
(an atomic counter, not the program id); the grid is ``(N + lag) · S`` programs. Unit (r, j) runs

* phase 0 (statistics of row r, segment j): the online (max m, Σe^{s−m}) of s = z / T over the segment, in
  SUB_V-wide tiles; with a tail (topk_tail) the row's ids inside each tile are set to −inf first (the sorted-id
  walk of :mod:`fastkd.kernels.sparse`: the ids of tile [a, a + SUB_V) are the sorted slots [lo, hi), two
  O(K) counts, each id compared with one tile), so the partial is the tail's. Writes ``ws[r, j] = (m, d)``,
  then ``cnt[r, 0] += 1`` (release).
* terms of row r − 1, only for j = 0 (the row's *terms* unit): waits for ``cnt[r−1, 0] == S``, merges the S
  partials in a fixed order (deterministic) into lse (or lse_tail, then lse = logaddexp(lse_tail, logsumexp
  of s at the distinct valid ids), exactly as the stats kernel), gathers s at the K ids from the row (still
  intact: nobody writes row r − 1 before this unit's release), runs ``_row_terms`` → loss (stored), the row
  scalars (lb, b', shift) and the value each sorted id slot receives (``fix``: a·e^{s_id − lse} + Σ c over
  the id's run), written to the workspace, then ``cnt[r−1, 1] = 1`` (release). Every log-normaliser stays
  split as (shift, log-sum), shift = the row max: ``_row_terms`` gets s − shift and lse's relative to it (exact
  differences of logits; its math is shift-invariant), so nothing is rounded at the logits' magnitude.
* gradient of row r − lag, segment j: waits for that row's terms flag, loads (lb, b', shift), writes the
  segment's gradient b'·e^{(s_v − shift) − lb} (0 for top-k rkl/jsd: the row lives on its ids only), then,
  after a block barrier, overwrites the ids inside the segment with ``fix`` (a repeated id: only the last slot
  of its run of equal sorted neighbours stores, the run's sum).

An excluded row (weight 0) skips its reads and waits: loss 0 and a zero gradient.

``lag`` (rows, a runtime argument ≥ 1). With lag = 1 the S − 1 gradient units of a row start right behind its
terms unit and spin while it merges, gathers and runs the O(K) math. The launcher sets lag ≈ 512 / S rows
(``CONFIG["lag_units"]``, at most N): about one wave of resident programs separates a row's terms unit from
its gradient units, so the terms are normally published before they are needed (a latency argument, to be
tuned on a GPU: not measured).

A unit waits only for smaller tickets (phase-0 units of row r − 1 for the terms, the terms unit of row r − lag
for a gradient), and each of those publishes without waiting for anything later: no cycle, no co-residency
assumption. The Triton interpreter runs the programs in ticket order, so every wait is already satisfied there
and the same code is tested on CPU.

L2 window (the rule ``bench/costcount.py`` applies to cross-program re-reads). A segment is read in phase 0 by
ticket u, gathered at its ids by the terms unit (≤ S tickets later) and re-read by ticket u + lag·S (its
gradient): at most resident + lag·S programs run in between, each touching 2 segments + the ids (BLOCK_V =
4096 bf16: ~17-19 KB), i.e. (528 + 512) × 19 KB ≈ 20 MB (≈ 30 MB if 1056 programs are resident), under the
50 MB L2: HBM sees each logit read once and the gradient written once (+ 8 B per unit of statistics and
~20·K B per row of ids, teacher values and ``fix``). The bound depends on BLOCK_V and lag·S, not on V.

Aliasing. The gradient may be the logits buffer (the fused path): a segment is written only by its gradient
unit, after its phase-0 read (ordered by the counter) and after the terms unit's gather (ordered by its flag);
its own tile is read before it is written.

Untrusted ids (as :mod:`fastkd.kernels.sparse`): every access at an id is masked by 0 ≤ id < V; an id outside
[−1, V) gets s = NaN, which makes its token's loss and gradient NaN; −1 is padding.

Statistics (``STATS`` constexpr; off, the kernel is the loss-only one): phase 0 also keeps the
segment's c = Σe^{s−m}(s − m) and first-index argmax (``sws``, NSTAT slots per unit, m and d bit for bit those of
the loss-only kernel); the terms unit merges them (``_row_stats``: the head ids merged in for a tail, as for the
lse) into the student's entropy and argmax and stores s at the ids and the lse's, from which
``fastkd.sparse.torch_impl.sparse_stats`` computes the teacher side in O(N·K): no extra read of the logits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.core.divergences import CODES
from fastkd.kernels._blocks import _lae, _wait
from fastkd.kernels.sparse import _online, _online_stats, _segmented_add

NSLOT = 2  # fp32 slots per unit in the workspace: the segment's (max, Σe^{s−max})
NSTAT = 3  # fp32 slots per unit of the STATS workspace: (c = Σe^{s−max}(s − max), max again, argmax bits)
MODE_CODES = {"topk": 0, "topk_tail": 1, "sampled": 2}  # MODE (sampled: topk fkl's math on counts)
# DIV: the effective divergence (jsd at β ∈ {0, 1} is fkl / rkl), coded as in the divergence table
DIV_CODES = {name: CODES[name] for name in ("fkl", "rkl", "jsd")}
TOPK = tl.constexpr(MODE_CODES["topk"])
TOPK_TAIL = tl.constexpr(MODE_CODES["topk_tail"])
SAMPLED = tl.constexpr(MODE_CODES["sampled"])
FKL = tl.constexpr(DIV_CODES["fkl"])
RKL = tl.constexpr(DIV_CODES["rkl"])
JSD = tl.constexpr(DIV_CODES["jsd"])
NEG = tl.constexpr(float("-inf"))


@triton.jit
def _pos(x, value):
    """0 where x == 0 else value (the 0·log 0 terms); a NaN x or value stays NaN."""
    return tl.where(x == 0, 0.0, value)


@triton.jit
def _any_nan(x, mask):
    return tl.max(((x != x) & mask).to(tl.int32), 0) > 0


@triton.jit
def _row_terms(s, tlp, tt, lse, lse_t, in_k, keep, wgt, kd_scale, coef, beta, log_b, log_1b,
               MODE: tl.constexpr, DIV: tl.constexpr):
    """``sparse_terms`` for one row: (loss, c (BLOCK_K,), a, lb, b').

    s: (BLOCK_K,) fp32 tempered student logits at the ids (−inf at padding and lanes ≥ K, NaN at an id
    outside [−1, V)); tlp: (BLOCK_K,) teacher log-probabilities in the same slot order (−inf at padding);
    tt: teacher log tail mass (TOPK_TAIL); lse / lse_t: the row's full / tail log-sum-exp; keep = weight != 0;
    coef = kd_scale / T. Formulas: module docstring of fastkd.sparse.torch_impl.
    """
    lse_k = tl.where(keep, lse, 0.0)
    lb = tl.where(keep, lse, 0.0)
    if MODE == TOPK_TAIL:
        log_q = s - lse_k
        log_qt = tl.where(keep, lse_t - lse_k, 0.0)
        q = tl.exp(log_q)
        qt = tl.exp(log_qt)
        pk = tl.exp(tlp)
        pt = tl.exp(tt)
        if DIV == FKL:
            loss = tl.sum(_pos(pk, pk * (tlp - log_q)), 0) + _pos(pt, pt * (tt - log_qt))
            c = -pk
            ct = -pt
        elif DIV == RKL:
            c = _pos(q, q * (log_q - tlp))
            ct = _pos(qt, qt * (log_qt - tt))
            loss = tl.sum(c, 0) + ct
        else:
            log_m = _lae(tlp + log_b, log_q + log_1b)
            log_mt = _lae(tt + log_b, log_qt + log_1b)
            c = (1.0 - beta) * _pos(q, q * (log_q - log_m))
            ct = (1.0 - beta) * _pos(qt, qt * (log_qt - log_mt))
            loss = (beta * (tl.sum(_pos(pk, pk * (tlp - log_m)), 0) + _pos(pt, pt * (tt - log_mt)))
                    + tl.sum(c, 0) + ct)
        a = -(tl.sum(c, 0) + ct)
        b = a * qt + ct  # b' = q_tail·(a + qg_tail / q_tail) without the division (q_tail may underflow)
        lb = tl.where(keep & (lse_t > float("-inf")), lse_t, 0.0)
    elif (DIV == FKL) | (MODE == SAMPLED):
        pk = tl.exp(tlp)
        loss = tl.sum(_pos(pk, pk * (tlp - (s - lse_k))), 0)
        c = -pk
        a = tl.sum(pk, 0)
        b = a
    else:  # topk rkl / jsd: the student renormalised over the K ids (an all −inf row: all −inf, not NaN)
        mx = tl.max(s, 0)
        mx_s = tl.where(mx == float("-inf"), 0.0, mx)
        log_q = s - (mx_s + tl.log(tl.sum(tl.exp(s - mx_s), 0)))
        log_q = tl.where(mx == float("-inf"), float("-inf"), log_q)
        q = tl.exp(log_q)
        if DIV == RKL:
            qg = _pos(q, q * (log_q - tlp))
            loss = tl.sum(qg, 0)
        else:
            pk = tl.exp(tlp)
            log_m = _lae(tlp + log_b, log_q + log_1b)
            qg = (1.0 - beta) * _pos(q, q * (log_q - log_m))
            loss = beta * tl.sum(_pos(pk, pk * (tlp - log_m)), 0) + tl.sum(qg, 0)
        c = qg - q * tl.sum(qg, 0)
        a = tl.sum(tl.zeros_like(c), 0)
        b = a
    scale = wgt * coef
    loss = tl.where(keep, loss * kd_scale, 0.0)
    c = tl.where(keep, c * scale, 0.0)
    a = tl.where(keep, a * scale, 0.0)
    b = tl.where(keep, b * scale, 0.0)
    # a NaN logit at an id, an id outside the vocabulary or a NaN teacher value poisons the token
    bad = _any_nan(s, in_k) | _any_nan(tlp, in_k)
    if MODE == TOPK_TAIL:
        bad = bad | (tt != tt)
    bad = keep & bad
    loss = tl.where(bad, float("nan"), loss)
    a = tl.where(bad, float("nan"), a)
    b = tl.where(bad, float("nan"), b)
    c = tl.where(bad, float("nan"), c)
    return loss, c, a, lb, b


@triton.jit
def _row_stats(sws_ptr, h_ptr, arg_ptr, sid_ptr, lse_ptr, lst_ptr, r2, S, K, s, s_sh, srt, perm, valid, run_start,
               mseg, dseg, mm, mm_s, dd, lse, lse_t, segs, sm, offs_k, in_k, MODE: tl.constexpr):
    """STATS outputs of row r2 (terms unit): merge the segments' (c, max, argmax) with their (m, d) into the
    student's entropy H = log d − c/d and first-index argmax (with a tail the head ids are merged in as for the
    lse: the segments' partials are the tail's) from the unshifted s; store the shifted s_sh at the ids and the
    lse's (relative to the same shift) for the O(K) teacher side."""
    cseg = tl.load(sws_ptr + (r2 * S + segs) * 3, mask=sm, other=0.0, cache_modifier=".cg")
    bvseg = tl.load(sws_ptr + (r2 * S + segs) * 3 + 1, mask=sm, other=float("-inf"), cache_modifier=".cg")
    biseg = tl.load(sws_ptr + (r2 * S + segs) * 3 + 2, mask=sm, other=0.0, cache_modifier=".cg").to(
        tl.int32, bitcast=True)
    c = tl.sum(tl.where(mseg == float("-inf"), 0.0, (cseg + dseg * (mseg - mm_s)) * tl.exp(mseg - mm_s)), 0)
    bv = tl.max(bvseg, 0)
    bi = tl.sum(tl.where(segs == tl.argmax(bvseg, 0, tie_break_left=True), biseg, 0), 0)  # first segment
    d = dd
    if MODE == TOPK_TAIL:
        s_head = tl.where(valid & run_start, s, float("-inf"))
        mh = tl.max(s_head, 0)
        mh_s = tl.where(mh == float("-inf"), 0.0, mh)
        e_h = tl.exp(s_head - mh_s)
        dh = tl.sum(e_h, 0)
        ch = tl.sum(tl.where(s_head == float("-inf"), 0.0, e_h * (s_head - mh_s)), 0)
        m2 = tl.maximum(mm, mh)
        m2_s = tl.where(m2 == float("-inf"), 0.0, m2)
        d = dd * tl.exp(mm - m2_s) + dh * tl.exp(mh - m2_s)
        c = tl.where(mm == float("-inf"), 0.0, (c + dd * (mm - m2_s)) * tl.exp(mm - m2_s)) + tl.where(
            mh == float("-inf"), 0.0, (ch + dh * (mh - m2_s)) * tl.exp(mh - m2_s))
        hid = tl.sum(tl.where(offs_k == tl.argmax(s_head, 0, tie_break_left=True), srt, 0), 0).to(tl.int32)
        take = (mh > bv) | ((mh == bv) & (mh > float("-inf")) & (hid < bi))  # first index on ties
        bi = tl.where(take, hid, bi)
        tl.store(lst_ptr + r2, lse_t)
    tl.store(h_ptr + r2, tl.log(d) - c / d)
    tl.store(arg_ptr + r2, bi.to(tl.int64))
    tl.store(lse_ptr + r2, lse)
    tl.store(sid_ptr + r2 * K + perm, s_sh, mask=in_k)


@triton.jit
def _sparse_split_kernel(
    z_ptr,  # (N, V) student logits, any float dtype, row stride stride_z, unit column stride
    g_ptr,  # (N, V) gradient out in its dtype, row stride stride_g (may alias z_ptr); unused without HAS_GRAD
    sorted_ptr,  # (N, K) int64, contiguous: each row's ids sorted ascending (−1 = padding sorts first)
    perm_ptr,  # (N, K) int64, contiguous: the slot each sorted id came from (ids[perm[j]] = sorted[j])
    tlp_ptr,  # (N, K) fp32, contiguous: teacher log-probabilities per (unsorted) slot
    tt_ptr,  # (N,) fp32: teacher log tail mass (TOPK_TAIL; else any fp32 pointer)
    w_ptr,  # (N,) fp32 token weights; 0 = excluded row
    loss_ptr,  # (N,) fp32 out: per-token loss (kd_scale included, weight not)
    ws_ptr,  # (N, S, NSLOT) fp32 workspace: the segments' (max, Σe^{s−max}) (no initialisation needed)
    row_ptr,  # (N, 3) fp32 workspace: the row's (lb, b', shift)
    fix_ptr,  # (N, K) fp32 workspace: value stored at each sorted slot's id (last slot of a run only)
    cnt_ptr,  # (1 + 2N,) int32, zeroed: [0] ticket, [1 + 2r] phase-0 units of row r done, [2 + 2r] terms flag
    sws_ptr,  # (N, S, NSTAT) fp32 workspace (STATS): the segments' entropy sum c, max value and argmax (bits)
    h_ptr,  # (N,) fp32 out (STATS): entropy of softmax(s) over the whole row
    arg_ptr,  # (N,) int64 out (STATS): argmax_v s_v, first index on ties
    sid_ptr,  # (N, K) fp32 out (STATS): s at each (unsorted) slot's id, as the row kernels' s_ids
    lse_ptr,  # (N,) fp32 out (STATS): the row's lse
    lst_ptr,  # (N,) fp32 out (STATS and TOPK_TAIL): the row's tail lse
    N, V, K, S,
    lag,  # rows between a row's terms unit and its gradient units (>= 1; the grid is (N + lag)·S, see above)
    stride_z, stride_g,
    inv_t, kd_scale, coef, beta, log_b, log_1b,
    MODE: tl.constexpr,
    DIV: tl.constexpr,
    DENSE: tl.constexpr,  # False when a = b = 0 (topk rkl/jsd): the gradient row is 0 except at the ids
    HAS_GRAD: tl.constexpr,
    SCALED: tl.constexpr,  # temperature != 1 (else the logits are used as loaded)
    BLOCK_V: tl.constexpr,  # segment width
    SUB_V: tl.constexpr,  # tile width of phase 0 (BLOCK_V, or smaller with a tail: cheaper id compares)
    BLOCK_K: tl.constexpr,  # next power of two >= K
    SP: tl.constexpr,  # next power of two >= S
    STATS: tl.constexpr = False,  # per-token statistics (off: the loss-only kernel, bitwise the same results)
):
    u = tl.atomic_add(cnt_ptr, 1).to(tl.int64)  # ticket: units are taken in this order (see docstring)
    r = u // S
    j = u % S
    start = j * BLOCK_V
    full = start + BLOCK_V <= V
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K

    # ---- phase 0: (max, Σe^{s−max}) of segment j of row r (the tail's with HAS_TAIL) -------------------------
    if r < N:
        if tl.load(w_ptr + r) != 0.0:
            z_row = z_ptr + r * stride_z
            srt_row = sorted_ptr + r * K
            m = tl.full((), float("-inf"), tl.float32)
            d = tl.zeros((), tl.float32)
            c_e = tl.zeros((), tl.float32)  # STATS: Σe^{s−m}(s − m), running max value and its column
            bv = tl.full((), float("-inf"), tl.float32)
            bi = tl.zeros((), tl.int64)
            if MODE == TOPK_TAIL:
                srt = tl.load(srt_row + offs_k, mask=in_k, other=0)
            for t0 in range(0, BLOCK_V, SUB_V):
                offs = start + t0 + tl.arange(0, SUB_V)
                if full:
                    x = tl.load(z_row + offs).to(tl.float32)
                else:
                    x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                if SCALED:
                    x = x * inv_t
                if MODE == TOPK_TAIL:
                    lo = tl.sum(((srt < start + t0) & in_k).to(tl.int32), 0)
                    hi = tl.sum(((srt < start + t0 + SUB_V) & in_k).to(tl.int32), 0)
                    for jj in range(lo, hi):  # only the ids inside this tile leave the tail
                        x = tl.where(offs == tl.load(srt_row + jj), float("-inf"), x)
                if STATS:
                    m, d, c_e, bv, bi = _online_stats(m, d, c_e, bv, bi, x, start + t0)
                else:
                    m, d = _online(m, d, x)
            wp = ws_ptr + (r * S + j) * 2
            tl.store(wp, m)
            tl.store(wp + 1, d)
            if STATS:
                sp = sws_ptr + (r * S + j) * 3
                tl.store(sp, c_e)
                tl.store(sp + 1, bv)
                tl.store(sp + 2, bi.to(tl.int32).to(tl.float32, bitcast=True))
        tl.debug_barrier()  # every thread's stores before the release below
        tl.atomic_add(cnt_ptr + 1 + 2 * r, 1, sem="release")

    # ---- terms of row r − 1 (the unit of segment 0 only): loss, (lb, b') and the id values -------------------
    r1 = r - 1
    if (j == 0) & (r1 >= 0) & (r1 < N):
        keep = tl.load(w_ptr + r1) != 0.0
        if not keep:
            tl.store(loss_ptr + r1, 0.0)  # no flag: the gradient units of an excluded row do not wait
        else:
            z_row = z_ptr + r1 * stride_z
            srt_row = sorted_ptr + r1 * K
            srt = tl.load(srt_row + offs_k, mask=in_k, other=-1)
            _wait(cnt_ptr + 1 + 2 * r1, S)
            segs = tl.arange(0, SP)
            sm = segs < S
            mseg = tl.load(ws_ptr + (r1 * S + segs) * 2, mask=sm, other=float("-inf"), cache_modifier=".cg")
            dseg = tl.load(ws_ptr + (r1 * S + segs) * 2 + 1, mask=sm, other=0.0, cache_modifier=".cg")
            mm = tl.max(mseg, 0)
            mm_s = tl.where(mm == float("-inf"), 0.0, mm)
            dd = tl.sum(dseg * tl.exp(mseg - mm_s), 0)
            valid = in_k & (srt >= 0) & (srt < V)
            s = tl.load(z_row + tl.where(valid, srt, 0), mask=valid, other=float("-inf")).to(tl.float32)
            if SCALED:
                s = s * inv_t
            s = tl.where(valid | (srt == -1), s, float("nan"))  # an out-of-range id poisons its token
            prev = tl.load(srt_row + offs_k - 1, mask=in_k & (offs_k >= 1), other=-1)
            run_start = (srt != prev) | (offs_k == 0)
            # each log-normaliser kept split as (shift, log-sum): the K-level math and the gradient see s − shift
            # (exact differences of logits), so nothing is rounded at the logits' magnitude
            if MODE == TOPK_TAIL:
                # the head: each distinct valid id once (a repeat equals its sorted predecessor)
                s_head = tl.where(valid & run_start, s, float("-inf"))
                mh = tl.max(s_head, 0)
                mh_s = tl.where(mh == float("-inf"), 0.0, mh)
                dh = tl.sum(tl.exp(s_head - mh_s), 0)
                m2 = tl.maximum(mm, mh)
                shift = tl.where(m2 == float("-inf"), 0.0, m2)
                lse = tl.log(dd * tl.exp(mm - shift) + dh * tl.exp(mh - shift))
                lse_t = (mm_s - shift) + tl.log(dd)
            else:
                shift = mm_s
                lse = tl.log(dd)
                lse_t = lse
            s_sh = s - shift
            perm = tl.load(perm_ptr + r1 * K + offs_k, mask=in_k, other=0)
            tlp = tl.load(tlp_ptr + r1 * K + perm, mask=in_k, other=float("-inf"))
            tt = 0.0
            if MODE == TOPK_TAIL:
                tt = tl.load(tt_ptr + r1)
            wgt = tl.load(w_ptr + r1)
            loss, c, a, lb, b = _row_terms(s_sh, tlp, tt, lse, lse_t, in_k, keep, wgt, kd_scale, coef, beta,
                                           log_b, log_1b, MODE, DIV)
            tl.store(loss_ptr + r1, loss)
            if STATS:
                _row_stats(sws_ptr, h_ptr, arg_ptr, sid_ptr, lse_ptr, lst_ptr, r1, S, K, s, s_sh, srt, perm, valid,
                           run_start, mseg, dseg, mm, mm_s, dd, lse, lse_t, segs, sm, offs_k, in_k, MODE)
            if HAS_GRAD:
                # Σ c over each run of equal sorted ids (a repeated id adds up, like scatter_add), at every slot
                _, c_sum = tl.associative_scan((run_start.to(tl.int32), c), 0, _segmented_add)
                if DENSE:
                    fix = tl.exp(s_sh - lse) * a + c_sum
                else:
                    fix = c_sum
                tl.store(row_ptr + r1 * 3, lb)
                tl.store(row_ptr + r1 * 3 + 1, b)
                tl.store(row_ptr + r1 * 3 + 2, shift)
                tl.store(fix_ptr + r1 * K + offs_k, fix, mask=in_k)
                tl.debug_barrier()  # every thread's stores before the release below
                tl.atomic_add(cnt_ptr + 2 + 2 * r1, 1, sem="release")

    # ---- gradient of segment j of row r − lag -----------------------------------------------------------------
    r2 = r - lag
    if HAS_GRAD:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if r2 >= 0:
            cols = start + tl.arange(0, BLOCK_V)
            g_row = g_ptr + r2 * stride_g
            if tl.load(w_ptr + r2) == 0.0:
                tl.store(g_row + cols, tl.zeros([BLOCK_V], tl.float32).to(g_ptr.dtype.element_ty), mask=cols < V)
            else:
                _wait(cnt_ptr + 2 + 2 * r2, 1)  # the row's terms (their unit took ticket (lag − 1)·S + j earlier)
                lb = tl.load(row_ptr + r2 * 3, cache_modifier=".cg")
                b = tl.load(row_ptr + r2 * 3 + 1, cache_modifier=".cg")
                if DENSE:
                    z_row = z_ptr + r2 * stride_z
                    if full:
                        x = tl.load(z_row + cols).to(tl.float32)
                    else:
                        x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    if SCALED:
                        x = x * inv_t
                    g = tl.exp((x - tl.load(row_ptr + r2 * 3 + 2, cache_modifier=".cg")) - lb) * b
                else:
                    g = tl.zeros([BLOCK_V], tl.float32)
                g = g.to(g_ptr.dtype.element_ty)
                if full:
                    tl.store(g_row + cols, g)
                else:
                    tl.store(g_row + cols, g, mask=cols < V)
                tl.debug_barrier()  # the id fix-up below must land after the segment's tile store
                srt_row = sorted_ptr + r2 * K
                srt = tl.load(srt_row + offs_k, mask=in_k, other=-1)
                nxt = tl.load(srt_row + offs_k + 1, mask=offs_k + 1 < K, other=-1)
                last = (in_k & (srt >= start) & (srt < start + BLOCK_V) & (srt < V)
                        & ((srt != nxt) | (offs_k + 1 >= K)))
                fix = tl.load(fix_ptr + r2 * K + offs_k, mask=last, other=0.0, cache_modifier=".cg")
                tl.store(g_row + tl.where(last, srt, 0), fix.to(g_ptr.dtype.element_ty), mask=last)
