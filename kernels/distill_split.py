"""Split-row Triton schedule of the divergence losses: each logit is read once from HBM (the re-reads hit L2).

Same mathematics, notation and conventions as :mod:`fastkd.kernels.distill` (the two-pass kernel, kept as the
fallback); this module changes only the schedule.

Why a new schedule. The two-pass kernel gives a whole row to one program: it reads the row pair for the
statistics and reads it again for the gradient. At V = 131072 bf16 a row pair is 512 KB and ~528 programs are
resident on an H100/H200 (132 SMs × 4 programs of 8 warps), so ~270 MB are touched between the two reads of a
logit, far more than the 50 MB L2: the second read comes from HBM (fkl at most 3/5 of the floor). A row cannot
be kept on chip either (512 KB of bf16 row pair > 228 KB of shared memory per SM), and Triton exposes neither
thread-block clusters nor distributed shared memory.

The schedule. A row is cut into ``S = ceil(V / BLOCK_V)`` segments of one block each; a *unit* is (row r,
segment j) and is processed in phases, each phase a different row so that no program waits on itself:

* phase 0 (stats) of row r: online max / sum-exp (+ the fkl / rkl sums, the raw-logit lse for the
  cross-entropy, and the label's logit when it lies in this segment) of the segment, written to a small
  fp32 workspace ``ws[r, j, :]``, then ``cnt[r, 0] += 1`` (release);
* phase 1 (mid, only for jsd / skl / srkl / tvd / ab and taid, ``LAG = 2``) of row r − 1: waits for
  ``cnt[r−1, 0] == S`` (acquire), merges the S partial statistics (fixed order: deterministic), and writes the
  segment's partial D and Σqg (taid: the max / sum-exp sums of its interpolated logits, which are formed from
  the row maxima); segment 0 also writes the merged log-normalisers to a row summary ``rs[r−1]``; then
  ``cnt[r−1, 1] += 1``;
* final phase of row r − LAG: waits for the last counter of that row, merges (a mixture without ``STATS`` reads
  ``rs`` instead: 4 scalars, not S segments), writes the gradient of the segment (and, segment 0 only, the row's
  loss).

Units are handed out by an atomic ticket counter (not by program id), so a program only ever waits for units
with *smaller* tickets, i.e. units already owned by programs that started before it and that publish their
phase-0/1 results without waiting for anything later: the wait graph has no cycle and no co-residency
assumption is needed (the decoupled look-back argument). In Triton's interpreter the programs run one after the
other in ticket order, so every wait is already satisfied: the same code is tested on CPU. The grid is
``(N + LAG) · S`` programs (the last LAG·S only finish the last rows).

The L2 argument (the rule the cost model applies, ``bench/costcount.py``). A segment is read by ticket u
(phase 0), re-read by ticket u + S (phase 1) and u + LAG·S (final). Between the first read and the last
re-read the GPU runs at most (resident programs + LAG·S) programs, each touching its distinct bytes
b = (LAG + 1) segment pairs + one gradient segment. bf16 at V = 131072: fkl at (8192, 8), b = 80 KB (2 × 32 KB
read + 16 KB written), 2 programs per SM → resident = 264, LAG·S = 16 → 280 × 80 KB = 22 MB; jsd at (8192, 8)
in sub-blocks of 4096 (below), b = 112 KB, 3 programs per SM → (396 + 32) × 112 KB = 48 MB (the closest to the
L2 of the defaults); tvd at (8192, 8), (264 + 32) × 112 KB = 33 MB; all under the 50 MB L2, so the re-reads
are L2 hits and HBM sees each logit read once and the gradient written once (+ ~0.8 KB of workspace per unit,
2–3 % of the traffic). With ``STATS`` (return_stats) phase 0 writes 6 more slots (``NSLOT_STATS`` = 20: 24 B per
unit) and the segment-0 program of the final phase reads them for every segment (6·S·4 B per row, 24 B per
unit): ~+48 B per unit at S = 32, +0.1 % of the 40 KB, no extra
pass over the logits and the same L2 window. The bound scales with BLOCK_V, not V: any
vocabulary fits. AKL has its own split kernel (:mod:`fastkd.kernels.distill_akl`: the same schedule with the head
search as extra phases); ``fastkd.distill.triton_impl.schedule`` says which kernel runs and why.

Sub-blocks: the mid and final phases take a segment in ``BLOCK_V / SUB_V`` sub-blocks, in a loop that is not
unrolled (``SUB_V``: the table's ``split_sub``, :func:`sub_block`), so that a large segment keeps the registers of
a sub-block while the fixed work of a unit (ticket, waits, merges, cross-warp reductions) is paid once per
segment; the mid phase accumulates its terms elementwise and reduces once. Phase 0 takes the segment whole (its
max precedes its exponentials).

Loads: a full segment is loaded without a mask (vectorised when the column stride is 1 and the row stride a
multiple of 16 bytes, which Triton specialises on), only the tail segment (j = S − 1 when V % BLOCK_V != 0) is
masked. The gradient buffer may alias the student: a segment is written in the final phase, after its own
phase 0 / 1 reads (ordered by the counters) and the label's logit was captured in phase 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.core.divergences import BY_CODE, TABLE
from fastkd.kernels._blocks import (  # noqa: F401  (NSLOT, NSLOT_STATS, NRS: the launcher's workspace sizes)
    LN2,
    NEG,
    NRS,
    NSLOT,
    NSLOT_STATS,
    RS_L2_S,
    RS_L2_T,
    RS_M_S,
    RS_M_T,
    WS_A_F,
    WS_A_R,
    WS_A_U,
    WS_C_S,
    WS_C_T,
    WS_D_S,
    WS_D_T,
    WS_D_U,
    WS_D_Z,
    WS_M_S,
    WS_M_T,
    WS_M_U,
    WS_M_Z,
    WS_P0,
    WS_P1,
    WS_RI_S,
    WS_RI_T,
    WS_RM_S,
    WS_RM_T,
    WS_ZL,
    _argmax_block,
    _ce_store,
    _ent_block,
    _ent_merge,
    _exp,
    _exp_row,
    _load_seg,
    _logp_row,
    _logp_shift,
    _lse_block,
    _merge,
    _online,
    _prob_scale,
    _slots,
    _split_logp,
    _store_stats,
    _wait,
    split_defaults,
    ticket_magic,
)
from fastkd.kernels.distill import (
    AB,
    FKL,
    JSD,
    MIX_SET,
    RKL,
    SYMKL,
    TAID,
    TVD,
    TVD_H,
    TVD_H_INV,
    _constants,
    _grad_qg,
    _mix_coefs,
    _mix_grad,
    _mix_terms,
    _mix_unit,
    _row_value,
    _taid_logits,
    _tvd_terms,
)


@triton.jit
def _distill_split_kernel(
    s_ptr, t_ptr, g_ptr, lab_ptr, w_ptr, loss_ptr,  # as _distill_kernel
    ws_ptr,  # (N, S, NSLOT) fp32 workspace (no initialisation needed)
    cnt_ptr,  # (1 + 2N,) int32, zeroed: [0] = ticket counter, [1 + 2r + phase] = units of row r done
    rs_ptr,  # (N, NRS) fp32 row summaries of the mixtures' mid phase (no initialisation needed)
    N, V, S,
    s_magic, s_shift,  # ticket_magic(S): the ticket's row u // S as a multiply and a shift
    s_row, s_col, t_row, t_col, g_row, g_col,
    inv_t, kd_scale, kd_coef, ce_w,
    h_beta, h_alpha, h_mu, h_t,
    st_ptr, st_row,  # (N, 4) fp32 statistics output (unit column stride); unused without STATS
    DIV: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE_RAW: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SP: tl.constexpr,  # next power of two >= S
    LAG: tl.constexpr,  # 1: fkl, rkl, symkl, zero; 2: jsd, skl, srkl, tvd, ab, taid (one more pass)
    SCALED: tl.constexpr,  # temperature != 1 (else the logits are used as loaded)
    STATS: tl.constexpr,  # also write the statistics (fastkd.core.stats): 6 more slots, merged by segment 0
    WS: tl.constexpr,  # workspace slots per unit: NSLOT, or NSLOT_STATS with STATS
    SUB_V: tl.constexpr,  # sub-block of the mid and final phases (BLOCK_V / SUB_V of them, in a loop)
):
    u = tl.atomic_add(cnt_ptr, 1).to(tl.int64)  # ticket: units are taken in this order (see docstring)
    # divmod(u, S) by a multiply and a shift: an integer division compiles to a called subroutine whose stack
    # frame ptxas reports as spill bytes
    r = (u * s_magic) >> s_shift
    j = u - r * S
    start = j * BLOCK_V
    offs = tl.arange(0, BLOCK_V)
    full = start + BLOCK_V <= V
    segs = tl.arange(0, SP)
    sm = segs < S
    zero = tl.full((), 0.0, tl.float32)
    c1, c2, w_a, w_b = _constants(h_beta, h_alpha, h_t, DIV)
    NSUB: tl.constexpr = BLOCK_V // SUB_V
    offs_h = tl.arange(0, SUB_V)

    # ---- phase 0: statistics of segment j of row r ---------------------------------------------------------
    if r < N:
        w0 = tl.load(w_ptr + r)
        if w0 != 0.0:
            xs = _load_seg(s_ptr + r * s_row, s_col, start, offs, V, full, NEG)
            xt = _load_seg(t_ptr + r * t_row, t_col, start, offs, V, full, NEG)
            s = xs
            t = xt
            if SCALED:
                s = xs * inv_t
                t = xt * inv_t
            # only the sums the divergence uses: fkl Σe^t(t−s), rkl Σe^s(s−t), symkl both
            a_r = zero
            a_f = zero
            if STATS:
                # the entropy partials reuse the loss's exponentials (one exp per logit and side, as without
                # STATS); (m, d) and the a sums are the same expressions as _lse_block / _online from an empty
                # state (0·0 + Σ = Σ), so the loss and gradient stay bitwise those of the STATS-off kernel
                m_s, d_s, c_s, a_s = _ent_block(s, t)
                m_t, d_t, c_t, a_f = _ent_block(t, s)  # kl needs Σe^{t−m}(t−s) whatever the divergence
                if (DIV == RKL) | (DIV == SYMKL):
                    a_r = a_s
            else:
                if (DIV == RKL) | (DIV == SYMKL):
                    m_s, d_s, a_r = _online(zero + NEG, zero, zero, s, t)
                else:
                    m_s, d_s = _lse_block(s)
                if (DIV == FKL) | (DIV == SYMKL):
                    m_t, d_t, a_f = _online(zero + NEG, zero, zero, t, s)
                else:
                    m_t, d_t = _lse_block(t)
            m_z = zero + NEG
            d_z = zero
            if CE_RAW:
                m_z, d_z = _lse_block(xs)
            zl = zero
            if HAS_LABELS:
                label = tl.load(lab_ptr + r)
                mine = (label >= start) & (label < start + BLOCK_V) & (label < V)
                zl = tl.load(s_ptr + r * s_row + tl.where(mine, label, 0) * s_col, mask=mine, other=0.0)
                zl = zl.to(tl.float32)
            wp = ws_ptr + (r * S + j) * WS
            if STATS:
                j0 = start.to(tl.int32)  # column indices in int32 (V < 2^31): half the registers of int64
                rm_s, ri_s = _argmax_block(xs, offs + j0)
                rm_t, ri_t = _argmax_block(xt, offs + j0)
                tl.store(wp + WS_C_S, c_s)
                tl.store(wp + WS_C_T, c_t)
                tl.store(wp + WS_RM_S, rm_s)
                tl.store(wp + WS_RM_T, rm_t)
                tl.store(wp + WS_RI_S, ri_s.to(tl.float32, bitcast=True))
                tl.store(wp + WS_RI_T, ri_t.to(tl.float32, bitcast=True))
            tl.store(wp + WS_M_S, m_s)
            tl.store(wp + WS_D_S, d_s)
            tl.store(wp + WS_A_R, a_r)
            tl.store(wp + WS_M_T, m_t)
            tl.store(wp + WS_D_T, d_t)
            tl.store(wp + WS_A_F, a_f)
            tl.store(wp + WS_M_Z, m_z)
            tl.store(wp + WS_D_Z, d_z)
            tl.store(wp + WS_ZL, zl)
        tl.atomic_add(cnt_ptr + 1 + 2 * r, 1, sem="release")

    # ---- phase 1 (LAG == 2): partial D and Σqg (taid: its logits' sums) of segment j of row r − 1 ---------
    if LAG == 2:
        r1 = r - 1
        if (r1 >= 0) & (r1 < N):
            w1 = tl.load(w_ptr + r1)
            if w1 != 0.0:
                _wait(cnt_ptr + 1 + 2 * r1, S)
                ws_row = ws_ptr + r1 * S * WS
                if DIV == TAID:  # the segment's sums of u = _taid_logits (padding lanes: u = −inf, skipped)
                    m_s = tl.max(_slots(ws_row, WS_M_S, segs, sm, WS, float("-inf")), 0)
                    m_t = tl.max(_slots(ws_row, WS_M_T, segs, sm, WS, float("-inf")), 0)
                    xs = _load_seg(s_ptr + r1 * s_row, s_col, start, offs, V, full, NEG)
                    xt = _load_seg(t_ptr + r1 * t_row, t_col, start, offs, V, full, NEG)
                    s = xs
                    t = xt
                    if SCALED:
                        s = xs * inv_t
                        t = xt * inv_t
                    m_u, d_u, a_u = _online(zero + NEG, zero, zero, _taid_logits(s, t, m_s, m_t, c1), s - m_s)
                    wp = ws_ptr + (r1 * S + j) * WS
                    tl.store(wp + WS_M_U, m_u)
                    tl.store(wp + WS_D_U, d_u)
                    tl.store(wp + WS_A_U, a_u)
                else:
                    m_s, l2_s, _ra = _merge(ws_row, WS_M_S, WS_D_S, WS_A_R, segs, sm, WS)
                    m_t, l2_t, _fa = _merge(ws_row, WS_M_T, WS_D_T, WS_A_F, segs, sm, WS)
                    if j == 0:  # the row summary the final phase reads (published by this phase's counter)
                        rp = rs_ptr + r1 * NRS
                        tl.store(rp + RS_M_S, m_s)
                        tl.store(rp + RS_L2_S, l2_s)
                        tl.store(rp + RS_M_T, m_t)
                        tl.store(rp + RS_L2_T, l2_t)
                    # the segment in NSUB sub-blocks (a loop, not unrolled: the registers of one sub-block); the
                    # terms accumulate elementwise and are reduced once. One sub-block: no loop (Triton 3.6 keeps a
                    # one-trip loop, whose accumulators spilled ab's launches)
                    o_s, k_s = _prob_scale(m_s, l2_s)  # tvd: p and q as exponentials times row scalars
                    o_t, k_t = _prob_scale(m_t, l2_t)
                    if NSUB == 1:
                        tu, tv = _mid_terms(s_ptr + r1 * s_row, t_ptr + r1 * t_row, s_col, t_col, start, offs, V,
                                            m_s, l2_s, m_t, l2_t, o_s, k_s, o_t, k_t, inv_t, c1, c2, w_a, w_b, DIV,
                                            SCALED)
                    else:
                        tu = tl.zeros([SUB_V], tl.float32)
                        tv = tl.zeros([SUB_V], tl.float32)
                        for h in tl.range(0, NSUB, loop_unroll_factor=1):
                            hu, hv = _mid_terms(s_ptr + r1 * s_row, t_ptr + r1 * t_row, s_col, t_col, start + h * SUB_V,
                                                offs_h, V, m_s, l2_s, m_t, l2_t, o_s, k_s, o_t, k_t, inv_t, c1, c2, w_a,
                                                w_b, DIV, SCALED)
                            tu += hu
                            tv += hv
                    wp = ws_ptr + (r1 * S + j) * WS
                    if DIV == TVD:  # the scales once per segment: Σ|q − p| = Σ|h|·k_s/TVD_H, Σq·sign = k_s·Σeq·sign
                        tl.store(wp + WS_P0, tl.sum(tu, 0) * (k_s * TVD_H_INV))
                        tl.store(wp + WS_P1, tl.sum(tv, 0) * k_s)
                    else:  # Σu, Σv (_mix_coefs combines them in the final phase)
                        tl.store(wp + WS_P0, tl.sum(tu, 0))
                        tl.store(wp + WS_P1, tl.sum(tv, 0))
            tl.atomic_add(cnt_ptr + 2 + 2 * r1, 1, sem="release")

    # ---- final phase: loss (segment 0) and gradient of segment j of row r − LAG ---------------------------
    r2 = r - LAG
    if r2 >= 0:
        w = tl.load(w_ptr + r2)
        cols = start + offs
        g_base = g_ptr + r2 * g_row
        if w == 0.0:
            if j == 0:
                tl.store(loss_ptr + r2, 0.0)
            if HAS_GRAD:
                tl.store(g_base + cols * g_col, tl.zeros([BLOCK_V], tl.float32).to(g_ptr.dtype.element_ty),
                         mask=cols < V)
        else:
            _wait(cnt_ptr + LAG + 2 * r2, S)
            ws_row = ws_ptr + r2 * S * WS
            if ((MIX_SET >> DIV) & 1) and (not STATS):  # the mid phase's row summary (no fkl / rkl sums needed)
                rp = rs_ptr + r2 * NRS
                m_s = tl.load(rp + RS_M_S, cache_modifier=".cg")
                l2_s = tl.load(rp + RS_L2_S, cache_modifier=".cg")
                m_t = tl.load(rp + RS_M_T, cache_modifier=".cg")
                l2_t = tl.load(rp + RS_L2_T, cache_modifier=".cg")
                ra = zero
                fa = zero
            else:
                m_s, l2_s, ra = _merge(ws_row, WS_M_S, WS_D_S, WS_A_R, segs, sm, WS)
                m_t, l2_t, fa = _merge(ws_row, WS_M_T, WS_D_T, WS_A_F, segs, sm, WS)
            ld_s = l2_s * LN2  # natural log-sums for the row's scalars
            ld_t = l2_t * LN2
            lse_s = m_s + ld_s
            lse_t = m_t + ld_t
            fkl = fa + (m_s - m_t) + (ld_s - ld_t)  # = fa − lse_t + lse_s, without rounding the lse's
            rkl = ra + (m_t - m_s) + (ld_t - ld_s)
            m_u = m_s
            ld_u = ld_s
            taid = zero
            if DIV == TAID:
                m_u, l2_u, ua = _merge(ws_row, WS_M_U, WS_D_U, WS_A_U, segs, sm, WS)
                ld_u = l2_u * LN2
                taid = ua - m_u + (ld_s - ld_u)  # Σ r (log r − log q), log r = u − m_u − ld_u, log q = s − m_s − ld_s
            dval, ssum, w_f, w_r = _row_value(fkl, rkl, taid, lse_s, lse_t, c1, zero, DIV)
            if (MIX_SET >> DIV) & 1:  # a mixture: D and Σqg from the sums of the mid phase's partials Σu, Σv (Σqg
                # in _mix_coefs' units, as the gradient below: the unit goes into its coefficient)
                a_u, a_v, b_u, b_v = _mix_coefs(c1, DIV)
                su = tl.sum(_slots(ws_row, WS_P0, segs, sm, WS, 0.0), 0)
                sv = tl.sum(_slots(ws_row, WS_P1, segs, sm, WS, 0.0), 0)
                if DIV == JSD:  # the mid phase's terms at y = log2 − δ (_logp_row): u = 2^δq·(u' + δq·q'), and
                    # Σq = Σp = 1 over the row: Σu = 2^δq·Σu' + δq
                    dq = _logp_shift(m_s, l2_s)
                    dp = _logp_shift(m_t, l2_t)
                    su = tl.math.exp2(dq) * su + dq
                    sv = tl.math.exp2(dp) * sv + dp
                dval = a_u * su + a_v * sv
                ssum = b_u * su + b_v * sv
            label = 0
            m_z = m_s
            l2_z = l2_s
            if HAS_LABELS:
                label = tl.load(lab_ptr + r2)
                if CE_RAW:
                    m_z, l2_z, _za = _merge(ws_row, WS_M_Z, WS_D_Z, WS_A_R, segs, sm, WS)
            if j == 0:
                loss = kd_scale * dval
                if HAS_LABELS:
                    ok = (label >= 0) & (label < V)  # a bad label was never read: NaN loss
                    zl = tl.sum(_slots(ws_row, WS_ZL, segs, sm, WS, 0.0), 0)
                    loss += ce_w * tl.where(ok, (m_z - zl) + l2_z * LN2, float("nan"))
                tl.store(loss_ptr + r2, loss)
                if STATS:  # the row's statistics, by the program that writes its loss
                    zv = tl.zeros([SP], tl.float32)
                    _m, d_s, c_s, _a = _ent_merge(_slots(ws_row, WS_M_S, segs, sm, WS, float("-inf")),
                                                  _slots(ws_row, WS_D_S, segs, sm, WS, 0.0),
                                                  _slots(ws_row, WS_C_S, segs, sm, WS, 0.0), zv)
                    _m, d_t, c_t, _a = _ent_merge(_slots(ws_row, WS_M_T, segs, sm, WS, float("-inf")),
                                                  _slots(ws_row, WS_D_T, segs, sm, WS, 0.0),
                                                  _slots(ws_row, WS_C_T, segs, sm, WS, 0.0), zv)
                    bits_s = _slots(ws_row, WS_RI_S, segs, sm, WS, 0.0).to(tl.int32, bitcast=True)
                    bits_t = _slots(ws_row, WS_RI_T, segs, sm, WS, 0.0).to(tl.int32, bitcast=True)
                    _m, i_s = _argmax_block(_slots(ws_row, WS_RM_S, segs, sm, WS, float("-inf")), bits_s)
                    _m, i_t = _argmax_block(_slots(ws_row, WS_RM_T, segs, sm, WS, float("-inf")), bits_t)
                    _store_stats(st_ptr + r2 * st_row, d_t, c_t, d_s, c_s, i_t, i_s, fkl)
            if HAS_GRAD:
                s_b = s_ptr + r2 * s_row
                t_b = t_ptr + r2 * t_row
                if NSUB == 1:
                    _final_block(s_b, t_b, g_base, s_col, t_col, g_col, start, offs, full, V, m_s, l2_s, m_t, l2_t,
                                 m_u, ld_u, m_z, l2_z, ssum, kd_coef, w, w_f, w_r, label, ce_w, inv_t, c1, c2, w_a, w_b,
                                 DIV, SCALED, HAS_LABELS, CE_RAW)
                else:
                    for h in tl.range(0, NSUB, loop_unroll_factor=1):  # as the mid phase
                        st_h = start + h * SUB_V
                        _final_block(s_b, t_b, g_base, s_col, t_col, g_col, st_h, offs_h, st_h + SUB_V <= V, V, m_s,
                                     l2_s, m_t, l2_t, m_u, ld_u, m_z, l2_z, ssum, kd_coef, w, w_f, w_r, label, ce_w,
                                     inv_t, c1, c2, w_a, w_b, DIV, SCALED, HAS_LABELS, CE_RAW)


@triton.jit
def _mid_terms(s_base, t_base, s_col, t_col, st, offs, V, m_s, l2_s, m_t, l2_t, o_s, k_s, o_t, k_t, inv_t, c1, c2,
               w_a, w_b, DIV: tl.constexpr, SCALED: tl.constexpr):
    """The mid phase's terms (u, v) of one (sub-)block of a row starting at column ``st`` (:func:`_mix_terms`; tvd
    from exponentials and the row scalars of :func:`_prob_scale`, whose k_s the caller applies to the sums)."""
    full = st + offs.shape[0] <= V
    xs = _load_seg(s_base, s_col, st, offs, V, full, NEG)
    xt = _load_seg(t_base, t_col, st, offs, V, full, NEG)
    if DIV == TVD:
        s = xs
        t = xt
        if SCALED:
            s = xs * inv_t
            t = xt * inv_t
        eq = _exp_row(s, o_s)
        tu, tv = _tvd_terms(eq, _exp_row(t, o_t), (k_t / k_s) * TVD_H)
    elif DIV == JSD:  # log-probabilities y + δ (_logp_row): 2^y = 2^{−δ}·p, the 2^δ in the weights; the final
        # phase folds the δ's into its row scalars (their Σ: 2^δ·Σ + δ)
        lq2, dq = _logp_row(xs, m_s, l2_s, inv_t, SCALED)
        lp2, dp = _logp_row(xt, m_t, l2_t, inv_t, SCALED)
        tu, tv = _mix_terms(lp2, lq2, tl.math.exp2(lp2), tl.math.exp2(lq2), c1, c2, w_a * tl.math.exp2(dp),
                            w_b * tl.math.exp2(dq), DIV)
    else:
        lq2, lp2 = _split_logp(xs, xt, m_s, l2_s, m_t, l2_t, inv_t, SCALED)
        tu, tv = _mix_terms(lp2, lq2, tl.math.exp2(lp2), tl.math.exp2(lq2), c1, c2, w_a, w_b, DIV)
    if (DIV == AB) and (not full):  # padding lanes (p = q = 0) add 0, but ab's e^{α·(−inf) + β·(−inf)} is NaN
        # for opposite-sign exponents
        cm = (st + offs) < V
        tu = tl.where(cm, tu, 0.0)
        tv = tl.where(cm, tv, 0.0)
    return tu, tv


@triton.jit
def _final_block(s_base, t_base, g_base, s_col, t_col, g_col, st, offs, full, V, m_s, l2_s, m_t, l2_t, m_u, ld_u,
                 m_z, l2_z, ssum, kd_coef, w, w_f, w_r, label, ce_w, inv_t, c1, c2, w_a, w_b, DIV: tl.constexpr,
                 SCALED: tl.constexpr, HAS_LABELS: tl.constexpr, CE_RAW: tl.constexpr):
    """The final phase's gradient of one (sub-)block of a row starting at column ``st`` (``full``: st + its size <= V),
    stored (:func:`_ce_store`). The coefficients are formed after the loads, as the kernel did inline (formed
    before, ptxas spilled a register of taid's fp32 launch with the raw-logit cross-entropy on Triton 3.6)."""
    cols = st + offs
    xs = _load_seg(s_base, s_col, st, offs, V, full, NEG)
    xt = _load_seg(t_base, t_col, st, offs, V, full, NEG)
    s = xs
    t = xt
    if SCALED:
        s = xs * inv_t
        t = xt * inv_t
    cw = kd_coef * w * _mix_unit(DIV)
    if DIV == TVD:  # (q·sign − q·Σq·sign)·cw = (eq·sign − eq·Σq·sign)·(k_s·cw)
        o_s, k_s = _prob_scale(m_s, l2_s)
        o_t, k_t = _prob_scale(m_t, l2_t)
        eq = _exp_row(s, o_s)
        _a, eqs = _tvd_terms(eq, _exp_row(t, o_t), (k_t / k_s) * TVD_H)
        g = (eqs - eq * ssum) * (k_s * cw)
        q = eq * k_s
    elif DIV == JSD:  # as the mid phase: q = 2^{lq2}·2^{dq}; the gradient from q·(k·(log2 q − log2 m) − ssum·cw)
        # with k = b_u·cw becomes 2^{lq2}·(k'·(lq2 − log2 m) − ssum'·cw'), cw' = 2^{dq}·cw, ssum' = ssum − b_u·dq
        lq2, dq = _logp_row(xs, m_s, l2_s, inv_t, SCALED)
        lp2, dp = _logp_row(xt, m_t, l2_t, inv_t, SCALED)
        eq = tl.math.exp2(lq2)
        fq = tl.math.exp2(dq)
        _a_u, _a_v, b_u, _b_v = _mix_coefs(c1, DIV)
        g = _mix_grad(lp2, lq2, eq, ssum - b_u * dq, cw * fq, c1, c2, w_a * tl.math.exp2(dp), w_b * fq, DIV)
        q = eq * fq  # the cross-entropy's softmax (dead without labels)
    else:
        lq2, lp2 = _split_logp(xs, xt, m_s, l2_s, m_t, l2_t, inv_t, SCALED)
        q = tl.math.exp2(lq2)
    if DIV == FKL:  # qg − q·Σqg = q − p
        g = (q - tl.math.exp2(lp2)) * cw
    elif (MIX_SET >> DIV) & 1:  # (a mixture's D came from the mid phase: only its gradient here)
        if (DIV != TVD) and (DIV != JSD):
            g = _mix_grad(lp2, lq2, q, ssum, cw, c1, c2, w_a, w_b, DIV)
    else:
        qg = _grad_qg(lp2, lq2, q, s, t, m_s, m_t, m_u, ld_u, w_f, w_r, c1, DIV, offs.shape[0])
        g = (qg - q * ssum) * cw
    _ce_store(g, xs, q, m_z, l2_z, label, ce_w * w, g_base, cols, g_col, V, full, HAS_LABELS, CE_RAW)


def lag(code: int) -> int:
    """Phases after the statistics (the table's ``lag``): 2 for a mixture and for taid (a mid phase), else 1."""
    return BY_CODE[code].lag


def launch_config(code: int, itemsize: int = 2, heavy: bool = False) -> tuple[int, int]:
    """Default (BLOCK_V, num_warps) of a divergence: :func:`fastkd.kernels._blocks.split_defaults` of the table's
    ``split_launch`` (2-byte logits, plain launch) and ``split_heavy`` (STATS or CE_RAW). Every default compiles for
    sm_90 without spills on the oldest and the newest supported Triton (``bench/aot.py --all`` checks them; the
    history of these choices is in docs/DESIGN.md)."""
    cfg = BY_CODE[code].split_launch
    if cfg is None:
        raise ValueError(f"divergence {BY_CODE[code].name!r} has its own split kernel")
    return split_defaults(cfg, BY_CODE[code].split_heavy, heavy, itemsize)


def sub_block(code: int, block_v: int) -> int:
    """SUB_V of a launch with segments of ``block_v``: the table's ``split_sub`` (the mid and final phases of a
    segment in sub-blocks of that size, when the segment is larger), else the whole segment."""
    sub = BY_CODE[code].split_sub
    return min(sub, block_v) if sub else block_v


def unaligned_config(code: int, cfg: tuple[int, int]) -> tuple[int, int]:
    """The launch of rows that are not vector-loadable (a vocabulary or row stride that is not a multiple of 16
    elements: Triton then loads and masks element by element, up to ~2× the registers): the table's
    ``split_unaligned`` where the plain configuration spilled there on sm_90 (jsd bf16 V=50257 at (8192, 8) in
    sub-blocks of 4096: 24 B; taid bf16 V=50257 at (8192, 8) on Triton 3.6: 16 B; tvd bf16 V=50257 with labels at
    (8192, 4): 96 B, so its unaligned rows take 8 warps), else ``cfg``; never a larger block than ``cfg``'s (a
    heavy or 4-byte launch keeps its smaller block)."""
    alt = BY_CODE[code].split_unaligned
    return alt if alt and alt[0] <= cfg[0] else cfg


# The codes this kernel runs: every row with a split_launch (akl's head search has its own split kernel,
# fastkd.kernels.distill_akl).
SPLIT_CODES = tuple(d.code for d in TABLE if d.split_launch is not None)
