"""Split-row Triton schedule of the AKL loss: each logit read once from HBM, the head set found without sorting.

Same mathematics and conventions as :mod:`fastkd.kernels.distill` (the two-pass kernel, kept as the fallback) and
the same ticket-ordered split-row schedule as :mod:`fastkd.kernels.distill_split` (read that docstring first);
this module changes how the head set H of AKL is searched.

The order. The reference sorts p descending with a *stable* sort: equal p are ranked by index. Here every
teacher logit gets a 64-bit code ``E = (key(x) − key_min) · 2³¹ + (2³¹ − 1 − i)`` where ``key`` is the
order-preserving int32 of the raw fp32 value x (−0 counted as +0): a larger E means an earlier rank, and E is
unique per element, so the ranks are the reference's, ties included (p is strictly increasing in x; ordering by
the raw logit also keeps distinct logits apart that the temperature scaling would round to one fp32 p). The head
is then a prefix of that order: ``H = {i : E_i ≥ θ} ∪ {argmax}`` for the smallest θ with
``M(θ) = Σ_{E ≥ θ} p ≤ mu``, and one threshold θ per row is all that must be found.

The search. A bracket (lo, hi) of codes with M(lo) > mu ≥ M(hi) and the counts C(lo) ≥ C(hi) is narrowed by
rounds that test ``AKL_NT`` = 16 thresholds at once; it is resolved when C(lo) − C(hi) ≤ 1 or hi = lo + 1
(then H = {E ≥ hi}: the element at lo is the first whose cumulative mass exceeds mu). Thresholds: while the
bracket spans more than NT + 1 distinct keys, 14 are uniform in the logit *value* between the bracket's ends
(they shrink the candidate count ~15× per round for any smooth distribution) and 2 uniform in E (a guaranteed
shrink of the code range); within a few keys, all 16 are uniform in E, i.e. in the index order inside a tied
group. The first bracket is hi = one past the max key and lo = the key of ``x_b = T·(lse_t + log((1−mu)/V) − 1)``:
the first excluded element has p ≥ (1−mu)/V (the ≥ 1−mu of mass after it lies on ≤ V elements), so M(lo) > mu;
with mu ≥ 1 − 1e-6 or no element below x_b, lo = −1 (every element). Masses and counts are summed as one int64
per element, ``2⁴² + round(p · 2⁴⁰)`` (count in the top bits, p in 2⁻⁴⁰ fixed point): integer sums are exact
and order-free, so the per-round atomics are deterministic and M(θ) is compared with ``mu · 2⁴⁰`` exactly
(V < 2²¹ keeps the count field from overflowing; larger vocabularies use the two-pass kernel). p itself is fp32
(``exp(x/T − lse_t)``), so H equals the float64 reference's unless mu lies within ~1e-7 of a cumulative head mass.

The schedule (``LAG = AKL_ROUNDS + 2`` phases after the statistics; unit = (row r, segment j), ticket-ordered):

* phase 0, row r: segment statistics (max / sum-exp and the fkl, rkl sums of s and t, min / max key and the first
  index of the max, the cross-entropy's raw lse and label logit) → workspace ``ws[r, j]``;
* phases 1..R (round k), row r − k: wait for phase k − 1 of that row; merge (round 1: the S segment statistics,
  segment 0 then writes the row summary ``rs[r]``; later rounds: ``rs[r]``); replay rounds 1..k − 1 from their
  accumulators to get the bracket; if unresolved, read the teacher segment and ``atomic_add`` the segment's NT
  packed sums into ``acc[r, k − 1]``;
* phase R + 1, row r − R − 1: replay the R rounds; if still unresolved (rare: clustered logits), finish the
  bisection over the whole row in this program (same thresholds, every program of the row identically); then
  read s and t of the segment and write ``A_j = Σ_{j, H} |p − q|`` and ``G_j = Σ_j |p − q|``;
* phase R + 2 (final), row r − R − 2: ``g_H = Σ_j A_j``, ``g_T = Σ_j G_j − g_H`` (fixed order), the loss
  (segment 0) and the gradient of the segment (as the two-pass kernel's akl branch).

Bytes (the L2 argument of ``distill_split``, the rule of ``bench/costcount.py``). A unit's distinct bytes are
b = its phase-0 s + t segments, R teacher segments, the phase R + 1 and final s + t segments (+ the gradient
segment written) and the row merges (S × 8 fp32 once in round 1, then rs and the accumulators): with
``BLOCK_V = 1024`` bf16, R = 6, S = 128 (V = 131072) b ≈ 4 + 6·2 + 4 + 4 + ~3 = 27 KB; a segment's last re-read
comes LAG · S = 1024 tickets after its first read, so at most (528 resident + 1024) × 27 KB ≈ 42 MB < 50 MB L2
are touched in between: every re-read is an L2 hit and HBM sees the logits read once and the gradient written
once, plus the workspace (~2 % of the traffic). Rounds of a resolved row read nothing.

``STATS`` (return_stats): phase 0 also writes the segment's entropy sums and the student's raw max and
first index (``NSLOT_STATS``; the shared helpers and slot names of :mod:`fastkd.kernels._blocks`), and segment 0
of round 1, which merges the row anyway, writes ``[teacher_entropy, student_entropy, top1_agree, kl]``; no other phase
changes, so loss and gradient are bitwise those of the launch without stats.

Work per logit: phase 0 ≈ 2 exps, each executed round one exp and NT compare-select-add (≈ 3 NT + 20 ops), the
err phase 2 exps, the final phase 2 exps. A smooth row resolves in a few rounds (the bracket shrinks ~15× per
round, then the last rounds split the boundary's group of equal logits by index) and the later rounds read
nothing; the round counts of a sample row and the cost model's figures are in docs/DESIGN.md / bench/RESULTS.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.core.divergences import HYPER_NAMES
from fastkd.kernels._blocks import (
    NSLOT,
    NSLOT_STATS,
    WS_A_F,
    WS_A_R,
    WS_AKL_RI_S,
    WS_C_S,
    WS_C_T,
    WS_D_S,
    WS_D_T,
    WS_D_Z,
    WS_IMAX,
    WS_KMAX,
    WS_KMIN,
    WS_M_S,
    WS_M_T,
    WS_M_Z,
    WS_P0,
    WS_P1,
    WS_RM_S,
    WS_ZL,
    _argmax_block,
    _ce_store,
    _ent_block,
    _ent_merge,
    _exp,
    _online,
    _split_logp,
    _store_stats,
    _wait,
)

AKL_BLOCK_V = 1024  # segment size (see the L2 argument in the docstring)
AKL_NUM_WARPS = 8
AKL_ROUNDS = 6  # search rounds done as phases (unresolved rows finish in the err phase)
AKL_NT = 16  # thresholds per round
AKL_NV = 14  # of which uniform in the logit value while the bracket spans more than NT + 1 keys
AKL_MAX_V = 1 << 20  # count field of the packed sums: 21 bits
RSLOT = tl.constexpr(12)  # fp32 slots per row in rs: maxima m_s, m_t, m_z (0, 1, 7) and log-sums ld_s, ld_t, ld_z
# (9, 10, 11) of the log-normalisers kept split (x − m exact at large logits), fkl, rkl (2, 3), keys (4–6), zl (8)
NEG = tl.constexpr(float("-inf"))
ONE = tl.constexpr(1 << 42)  # one element in the packed (count, mass) sum
FIX = tl.constexpr(1099511627776.0)  # 2**40: p in fixed point
MASS_MASK = tl.constexpr((1 << 42) - 1)


@triton.jit
def _key(x, SH: tl.constexpr):
    """Order-preserving int32 of fp32 x (−0 and +0 equal), shifted right by SH: the low SH bits of a bf16 (16) or
    fp16 (13) value widened to fp32 are constant, so the shifted keys are consecutive for consecutive values."""
    b = x.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    return tl.where(x == 0.0, 0, k >> SH)


@triton.jit
def _unkey(k, SH: tl.constexpr):
    """A value with key ``k`` under :func:`_key` (fp32; for negative keys within one input ulp of it)."""
    k = k << SH
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _codes(xt, cols, kmin, IB, SH: tl.constexpr):
    """E = (key − key_min) · 2^IB + (2^IB − 1 − index): unique per element, larger = earlier in the stable order."""
    b = xt.to(tl.int32, bitcast=True)  # _key inlined (each nested jit call costs the interpreter ~1 ms)
    key = tl.where(xt == 0.0, 0, (b ^ ((b >> 31) & 0x7FFFFFFF)) >> SH)
    d = key.to(tl.int64) - kmin.to(tl.int64)
    return (d << IB) + ((1 << IB) - 1 - cols).to(tl.int64)


@triton.jit
def _thresholds(lo, hi, kmin, IB, SH: tl.constexpr, NT: tl.constexpr, NV: tl.constexpr):
    """NT codes in (lo, hi): NV uniform in the logit value + the rest uniform in E when the bracket spans more
    than NT + 1 keys and finite values, else all uniform in E (see the module docstring)."""
    k = tl.arange(0, NT).to(tl.int64)
    span = hi - lo
    klo = kmin + (tl.maximum(lo, 0) >> IB).to(tl.int32)
    khi = kmin + ((hi - 1) >> IB).to(tl.int32)
    x_lo = _unkey(klo, SH)
    x_hi = _unkey(khi, SH)
    finite = (tl.abs(x_lo) < float("inf")) & (tl.abs(x_hi) < float("inf"))
    nv = tl.where(((khi - klo) > NT + 1) & finite, NV, 0).to(tl.int64)
    f = (k + 1).to(tl.float32) / (NV + 1)
    xv = x_lo * (1.0 - f) + x_hi * f
    th_v = (_key(xv, SH).to(tl.int64) - kmin.to(tl.int64)) << IB
    ke = k - nv
    step = span // (NT - nv + 1)
    th_e = tl.where(step > 0, lo + step * (ke + 1), lo + tl.minimum(ke + 1, span - 1))
    th = tl.where(k < nv, th_v, th_e)
    return tl.minimum(tl.maximum(th, lo + 1), hi - 1)


@triton.jit
def _narrow(lo, hi, n_lo, n_hi, th, packed, mu_fix):
    """Bracket after testing thresholds ``th`` with packed sums ``packed`` (unchanged when already resolved)."""
    mass = packed & MASS_MASK
    cnt = packed >> 42
    fail = mass > mu_fix  # M(θ) > mu: θ is below the head threshold
    lo_n = tl.max(tl.where(fail, th, lo), 0)
    n_lo_n = tl.min(tl.where(fail, cnt, n_lo), 0)
    hi_n = tl.min(tl.where(fail, hi, th), 0)
    n_hi_n = tl.max(tl.where(fail, n_hi, cnt), 0)
    done = ((n_lo - n_hi) <= 1) | ((hi - lo) <= 1)
    return (tl.where(done, lo, lo_n), tl.where(done, hi, hi_n), tl.where(done, n_lo, n_lo_n),
            tl.where(done, n_hi, n_hi_n))


@triton.jit
def _seg_sums(xt, cols, cm, m_t, ld_t, inv_t, kmin, IB, SH: tl.constexpr, th, NT: tl.constexpr,
              SCALED: tl.constexpr):
    """Packed (count, mass) of {E ≥ θ_k} over one segment, for the NT thresholds (an int64 vector); the teacher's
    log-normaliser is m_t + ld_t (max + log sum, kept split: exact x − max at large logits)."""
    e = _codes(xt, cols, kmin, IB, SH)
    if SCALED:
        lp = (xt * inv_t - m_t) - ld_t
    else:
        lp = (xt - m_t) - ld_t
    val = tl.where(cm, (_exp(lp) * FIX + 0.5).to(tl.int64) + ONE, 0)  # 2⁴² + round(p · 2⁴⁰)
    # NC thresholds at a time: an (NC, BLOCK_V) tile is NC int64 per element in registers (NT at once spills)
    NC: tl.constexpr = 4
    th2 = tl.reshape(th, [NT // NC, NC])
    rows = tl.arange(0, NT // NC)[:, None]
    out = tl.zeros([NT // NC, NC], tl.int64)
    for c in tl.static_range(NT // NC):
        th_c = tl.sum(tl.where(rows == c, th2, 0), 0)
        s_c = tl.sum(tl.where(e[None, :] >= th_c[:, None], val[None, :], 0), 1)
        out = tl.where(rows == c, s_c[None, :], out)
    return tl.reshape(out, [NT])


@triton.jit
def _first_bracket(lse_t, kmin, kmax, mu, V, IB, inv_t, SH: tl.constexpr):
    """(lo, hi, C(lo) upper bound, C(hi)) before the first round (see the module docstring)."""
    hi = (kmax.to(tl.int64) - kmin.to(tl.int64) + 1) << IB
    x_b = (lse_t + tl.log((1.0 - mu) / V) - 1.0) / inv_t
    kb = _key(x_b, SH)
    ok = (mu < 1.0 - 1e-6) & (tl.abs(x_b) < float("inf")) & (kb > kmin)
    lo = tl.where(ok, (kb.to(tl.int64) - kmin.to(tl.int64)) << IB, -1)
    return lo, hi, (V + 0 * kmin).to(tl.int64), (0 * kmin).to(tl.int64)


@triton.jit
def _step(acc_row, i, kmin, mu_fix, IB, SH: tl.constexpr, NT: tl.constexpr, NV: tl.constexpr, ROUNDS: tl.constexpr):
    """The bracket after round i (0-based): the published bracket before it, narrowed by its sums (every
    program of the row computes the same)."""
    b = acc_row + ROUNDS * NT + ((i + 1) % 2) * 4  # published by round i + 1 (1-based) of the row
    lo = tl.load(b + 0, cache_modifier=".cg")
    hi = tl.load(b + 1, cache_modifier=".cg")
    n_lo = tl.load(b + 2, cache_modifier=".cg")
    n_hi = tl.load(b + 3, cache_modifier=".cg")
    if ((n_lo - n_hi) > 1) & ((hi - lo) > 1):  # unresolved
        th = _thresholds(lo, hi, kmin, IB, SH, NT, NV)
        packed = tl.load(acc_row + i * NT + tl.arange(0, NT), cache_modifier=".cg")
        lo, hi, n_lo, n_hi = _narrow(lo, hi, n_lo, n_hi, th, packed, mu_fix)
    return lo, hi, n_lo, n_hi


@triton.jit
def _load(base, col_stride, cols, cm, FULL):
    if FULL:
        x = tl.load(base + cols * col_stride)
    else:
        x = tl.load(base + cols * col_stride, mask=cm, other=float("-inf"))
    return x.to(tl.float32)


@triton.jit
def _akl_split_kernel(
    s_ptr, t_ptr, g_ptr, lab_ptr, w_ptr, loss_ptr,  # as _distill_kernel
    ws_ptr,  # (N, S, WS) fp32 workspace (no initialisation needed)
    rs_ptr,  # (N, RSLOT) fp32 row summaries (no initialisation needed)
    acc_ptr,  # (N, ROUNDS·NT + 8) int64, zeroed: packed (count, mass) sums of each round's thresholds, then
    # two slots for the bracket (lo, hi, C(lo), C(hi)) before round k (slot k % 2, written by its segment 0)
    cnt_ptr,  # (1 + N·(ROUNDS + 2),) int32, zeroed: [0] ticket, [1 + r·(ROUNDS + 2) + phase] units done
    st_ptr, st_row,  # (N, 4) fp32 statistics output (unit column stride); unused without STATS
    N, V, S,
    IB,  # index bits of the codes: V <= 2^IB
    s_row, s_col, t_row, t_col, g_row, g_col,
    inv_t, kd_scale, kd_coef, ce_w, h_mu,
    HAS_GRAD: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE_RAW: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SP: tl.constexpr,  # next power of two >= S
    ROUNDS: tl.constexpr,
    NT: tl.constexpr,
    NV: tl.constexpr,
    SCALED: tl.constexpr,
    SH: tl.constexpr,  # key shift: 16 for bf16, 13 for fp16, 0 for fp32 (see _key)
    STATS: tl.constexpr,  # also write the row statistics (fastkd.core.stats), by segment 0 of round 1
    WS: tl.constexpr,  # workspace slots per unit: NSLOT, or NSLOT_STATS with STATS
):
    NPH: tl.constexpr = ROUNDS + 2
    ACC_ROW: tl.constexpr = ROUNDS * NT + 8
    u = tl.atomic_add(cnt_ptr, 1).to(tl.int64)  # ticket (distill_split's docstring: why not the program id)
    r = u // S
    j = u % S
    start = j * BLOCK_V
    cols = start + tl.arange(0, BLOCK_V)
    cm = cols < V
    full = start + BLOCK_V <= V
    segs = tl.arange(0, SP)
    sm = segs < S
    zero = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    mu = zero + h_mu  # a tensor in the interpreter too (a Python float there)
    mu_fix = (mu * FIX).to(tl.int64)

    # ---- phase 0: statistics of segment j of row r ---------------------------------------------------------
    if r < N:
        if tl.load(w_ptr + r) != 0.0:
            xs = _load(s_ptr + r * s_row, s_col, cols, cm, full)
            xt = _load(t_ptr + r * t_row, t_col, cols, cm, full)
            s = xs
            t = xt
            if SCALED:
                s = xs * inv_t
                t = xt * inv_t
            m_s, d_s, a_r = _online(zero + NEG, zero, zero, s, t)
            m_t, d_t, a_f = _online(zero + NEG, zero, zero, t, s)
            key = _key(xt, SH)
            kmin = tl.min(tl.where(cm, key, 0x7FFFFFFF), 0)
            kmax = tl.max(tl.where(cm, key, -0x7FFFFFFF - 1), 0)
            imax = tl.min(tl.where(cm & (key == kmax), cols, V), 0).to(tl.int32)
            wp = ws_ptr + (r * S + j) * WS
            if STATS:
                _m, _d, c_s, _a = _ent_block(s, t)
                _m, _d, c_t, _a = _ent_block(t, s)
                rm_s, ri_s = _argmax_block(xs, cols)
                tl.store(wp + WS_C_S, c_s)
                tl.store(wp + WS_C_T, c_t)
                tl.store(wp + WS_RM_S, rm_s)
                tl.store(wp + WS_AKL_RI_S, ri_s.to(tl.float32, bitcast=True))
            if CE_RAW:
                m_z, d_z, _az = _online(zero + NEG, zero, zero, xs, xs)
                tl.store(wp + WS_M_Z, m_z)
                tl.store(wp + WS_D_Z, d_z)
            if HAS_LABELS:
                label = tl.load(lab_ptr + r)
                mine = (label >= start) & (label < start + BLOCK_V) & (label < V)
                zl = tl.load(s_ptr + r * s_row + tl.where(mine, label, 0) * s_col, mask=mine, other=0.0)
                tl.store(wp + WS_ZL, zl.to(tl.float32))
            tl.store(wp + WS_M_S, m_s)
            tl.store(wp + WS_D_S, d_s)
            tl.store(wp + WS_A_R, a_r)
            tl.store(wp + WS_M_T, m_t)
            tl.store(wp + WS_D_T, d_t)
            tl.store(wp + WS_A_F, a_f)
            tl.store(wp + WS_KMIN, kmin.to(tl.float32, bitcast=True))
            tl.store(wp + WS_KMAX, kmax.to(tl.float32, bitcast=True))
            tl.store(wp + WS_IMAX, imax.to(tl.float32, bitcast=True))
        tl.atomic_add(cnt_ptr + 1 + r * NPH, 1, sem="release")

    # ---- phases 1..ROUNDS: search round k of row r − k -----------------------------------------------------
    for k in range(1, ROUNDS + 1):
        x = r - k
        if (x >= 0) & (x < N):
            if tl.load(w_ptr + x) != 0.0:
                _wait(cnt_ptr + 1 + x * NPH + k - 1, S)
                rp = rs_ptr + x * RSLOT
                if k == 1:  # merge the segment statistics; segment 0 publishes the row summary
                    wr = ws_ptr + x * S * WS + segs * WS
                    m = tl.load(wr + WS_M_T, mask=sm, other=float("-inf"), cache_modifier=".cg")
                    d = tl.load(wr + WS_D_T, mask=sm, other=0.0, cache_modifier=".cg")
                    mm = tl.max(m, 0)
                    mms = tl.where(mm == float("-inf"), 0.0, mm)
                    m_t = mm
                    ld_t = tl.log(tl.sum(d * _exp(m - mms), 0))
                    kmins = tl.load(wr + WS_KMIN, mask=sm, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
                    kmin = tl.min(tl.where(sm, kmins, 0x7FFFFFFF), 0)
                    kmaxs = tl.where(sm, tl.load(wr + WS_KMAX, mask=sm, other=0.0, cache_modifier=".cg")
                                     .to(tl.int32, bitcast=True), -0x7FFFFFFF - 1)
                    kmax = tl.max(kmaxs, 0)
                    if j == 0:
                        imaxs = tl.load(wr + WS_IMAX, mask=sm, other=0.0, cache_modifier=".cg").to(tl.int32,
                                                                                                     bitcast=True)
                        amax = tl.min(tl.where(sm & (kmaxs == kmax), imaxs, V), 0)
                        a = tl.load(wr + WS_A_R, mask=sm, other=0.0, cache_modifier=".cg")
                        m = tl.load(wr + WS_M_S, mask=sm, other=float("-inf"), cache_modifier=".cg")
                        d = tl.load(wr + WS_D_S, mask=sm, other=0.0, cache_modifier=".cg")
                        ms_ = tl.max(m, 0)
                        mss = tl.where(ms_ == float("-inf"), 0.0, ms_)
                        sc = _exp(m - mss)
                        dd = tl.sum(d * sc, 0)
                        m_s = ms_
                        ld_s = tl.log(dd)
                        tl.store(rp + 0, m_s)
                        tl.store(rp + 9, ld_s)
                        dm = m_s - m_t  # lse_s − lse_t = dm + dl (exact differences first)
                        dl = ld_s - ld_t
                        tl.store(rp + 3, tl.sum(a * sc, 0) / dd - dm - dl)  # rkl = A/D − lse_s + lse_t
                        af = tl.load(wr + WS_A_F, mask=sm, other=0.0, cache_modifier=".cg")
                        m = tl.load(wr + WS_M_T, mask=sm, other=float("-inf"), cache_modifier=".cg")
                        d = tl.load(wr + WS_D_T, mask=sm, other=0.0, cache_modifier=".cg")
                        sc = _exp(m - mms)
                        fkl = tl.sum(af * sc, 0) / tl.sum(d * sc, 0) + dm + dl
                        m_z = m_s
                        ld_z = ld_s
                        zl = zero
                        if CE_RAW:
                            m = tl.load(wr + WS_M_Z, mask=sm, other=float("-inf"), cache_modifier=".cg")
                            d = tl.load(wr + WS_D_Z, mask=sm, other=0.0, cache_modifier=".cg")
                            mz = tl.max(m, 0)
                            mzs = tl.where(mz == float("-inf"), 0.0, mz)
                            m_z = mz
                            ld_z = tl.log(tl.sum(d * _exp(m - mzs), 0))
                        if HAS_LABELS:
                            zl = tl.sum(tl.load(wr + WS_ZL, mask=sm, other=0.0, cache_modifier=".cg"), 0)
                        tl.store(rp + 1, m_t)
                        tl.store(rp + 10, ld_t)
                        tl.store(rp + 11, ld_z)
                        tl.store(rp + 2, fkl)
                        tl.store(rp + 4, kmin.to(tl.float32, bitcast=True))
                        tl.store(rp + 5, kmax.to(tl.float32, bitcast=True))
                        tl.store(rp + 6, amax.to(tl.float32, bitcast=True))
                        tl.store(rp + 7, m_z)
                        tl.store(rp + 8, zl)
                        if STATS:
                            zv = tl.zeros([SP], tl.float32)
                            cs = tl.load(wr + WS_C_S, mask=sm, other=0.0, cache_modifier=".cg")
                            ct = tl.load(wr + WS_C_T, mask=sm, other=0.0, cache_modifier=".cg")
                            _m, d_s, c_s, _a = _ent_merge(tl.load(wr + WS_M_S, mask=sm, other=float("-inf"),
                                                                  cache_modifier=".cg"),
                                                          tl.load(wr + WS_D_S, mask=sm, other=0.0,
                                                                  cache_modifier=".cg"),
                                                          cs, zv)
                            _m, d_t, c_t, _a = _ent_merge(m, d, ct, zv)
                            bits_s = tl.load(wr + WS_AKL_RI_S, mask=sm, other=0.0, cache_modifier=".cg").to(tl.int32,
                                                                                                  bitcast=True)
                            _m, i_s = _argmax_block(tl.load(wr + WS_RM_S, mask=sm, other=float("-inf"),
                                                            cache_modifier=".cg"), bits_s)
                            _store_stats(st_ptr + x * st_row, d_t, c_t, d_s, c_s, amax, i_s, fkl)
                else:
                    m_t = tl.load(rp + 1, cache_modifier=".cg")
                    ld_t = tl.load(rp + 10, cache_modifier=".cg")
                    kmin = tl.load(rp + 4, cache_modifier=".cg").to(tl.int32, bitcast=True)
                    kmax = tl.load(rp + 5, cache_modifier=".cg").to(tl.int32, bitcast=True)
                acc_row = acc_ptr + x * ACC_ROW
                if k == 1:
                    lo, hi, n_lo, n_hi = _first_bracket(m_t + ld_t, kmin, kmax, mu, V, IB, inv_t, SH)
                else:  # the bracket before round k − 1 (published by its segment 0) + round k − 1's sums
                    lo, hi, n_lo, n_hi = _step(acc_row, k - 2, kmin, mu_fix, IB, SH, NT, NV, ROUNDS)
                if j == 0:  # publish the bracket before round k (read by round k + 1 or the err phase); two
                    # slots by parity: the other programs of round k may still read the one published by k − 1
                    bp = acc_row + ROUNDS * NT + (k % 2) * 4
                    tl.store(bp + 0, lo)
                    tl.store(bp + 1, hi)
                    tl.store(bp + 2, n_lo)
                    tl.store(bp + 3, n_hi)
                if ((n_lo - n_hi) > 1) & ((hi - lo) > 1):  # unresolved: this round's sums over the segment
                    th = _thresholds(lo, hi, kmin, IB, SH, NT, NV)
                    xt = _load(t_ptr + x * t_row, t_col, cols, cm, full)
                    sums = _seg_sums(xt, cols, cm, m_t, ld_t, inv_t, kmin, IB, SH, th, NT, SCALED)
                    tl.atomic_add(acc_row + (k - 1) * NT + tl.arange(0, NT), sums, sem="relaxed")
            tl.atomic_add(cnt_ptr + 1 + x * NPH + k, 1, sem="release")

    # ---- phase ROUNDS + 1: resolve, then the segment's Σ_H |p − q| and Σ |p − q| -----------------------------
    x = r - ROUNDS - 1
    if (x >= 0) & (x < N):
        if tl.load(w_ptr + x) != 0.0:
            _wait(cnt_ptr + 1 + x * NPH + ROUNDS, S)
            rp = rs_ptr + x * RSLOT
            kmin = tl.load(rp + 4, cache_modifier=".cg").to(tl.int32, bitcast=True)
            kmax = tl.load(rp + 5, cache_modifier=".cg").to(tl.int32, bitcast=True)
            amax = tl.load(rp + 6, cache_modifier=".cg").to(tl.int32, bitcast=True)
            lo, hi, n_lo, n_hi = _step(acc_ptr + x * ACC_ROW, ROUNDS - 1, kmin, mu_fix, IB, SH, NT, NV, ROUNDS)
            # the fallback bisection's p uses the teacher lse rounded to one fp32 (one register through its loop;
            # the split form there spills on sm_90): it only moves the head boundary when mu lies within that
            # rounding of a cumulative mass, in rows the rounds left unresolved
            lse_t = tl.load(rp + 1, cache_modifier=".cg") + tl.load(rp + 10, cache_modifier=".cg")
            t_base = t_ptr + x * t_row
            offs = tl.arange(0, BLOCK_V)
            while ((n_lo - n_hi) > 1) & ((hi - lo) > 1):  # rare: finish the bisection over the whole row here
                th = _thresholds(lo, hi, kmin, IB, SH, NT, NV)
                sums = tl.zeros([NT], tl.int64)
                for jj in range(0, S):
                    c2 = jj * BLOCK_V + offs
                    m2 = c2 < V
                    xt2 = tl.load(t_base + c2 * t_col, mask=m2, other=float("-inf")).to(tl.float32)
                    sums += _seg_sums(xt2, c2, m2, lse_t, 0.0, inv_t, kmin, IB, SH, th, NT, SCALED)
                lo, hi, n_lo, n_hi = _narrow(lo, hi, n_lo, n_hi, th, sums, mu_fix)
            # volatile: loaded here, not kept in registers through the loop above
            m_s = tl.load(rp + 0, volatile=True)
            ld_s = tl.load(rp + 9, volatile=True)
            m_t = tl.load(rp + 1, volatile=True)
            ld_t = tl.load(rp + 10, volatile=True)
            xs = _load(s_ptr + x * s_row, s_col, cols, cm, full)
            xt = _load(t_base, t_col, cols, cm, full)
            # the log-normalisers kept split (exact x − max first), as in the rounds and the gradient: p has the
            # rounds' bits and |p − q| no per-row factor error at large logits
            lq, lp = _split_logp(xs, xt, m_s, ld_s, m_t, ld_t, inv_t, SCALED)
            err = tl.where(cm, tl.abs(_exp(lp) - _exp(lq)), 0.0)
            head = (_codes(xt, cols, kmin, IB, SH) >= hi) | (cols == amax)
            wp = ws_ptr + (x * S + j) * WS
            tl.store(wp + WS_P0, tl.sum(tl.where(head, err, 0.0), 0))
            tl.store(wp + WS_P1, tl.sum(err, 0))
        tl.atomic_add(cnt_ptr + 1 + x * NPH + ROUNDS + 1, 1, sem="release")

    # ---- final phase: loss (segment 0) and gradient of segment j of row r − ROUNDS − 2 ----------------------
    x = r - ROUNDS - 2
    if x >= 0:
        w = tl.load(w_ptr + x)
        g_base = g_ptr + x * g_row
        if w == 0.0:
            if j == 0:
                tl.store(loss_ptr + x, 0.0)
            if HAS_GRAD:
                tl.store(g_base + cols * g_col, tl.zeros([BLOCK_V], tl.float32).to(g_ptr.dtype.element_ty), mask=cm)
        else:
            _wait(cnt_ptr + 1 + x * NPH + ROUNDS + 1, S)
            rp = rs_ptr + x * RSLOT
            fkl = tl.load(rp + 2, cache_modifier=".cg")
            rkl = tl.load(rp + 3, cache_modifier=".cg")
            wr = ws_ptr + x * S * WS + segs * WS
            g_h = tl.sum(tl.load(wr + WS_P0, mask=sm, other=0.0, cache_modifier=".cg"), 0)
            g_all = tl.sum(tl.load(wr + WS_P1, mask=sm, other=0.0, cache_modifier=".cg"), 0)
            g_t = g_all - g_h
            den = g_h + g_t
            safe = tl.where(den > 0, den, 1.0)
            w_f = tl.where(den > 0, g_h / safe, 0.0)
            w_r = tl.where(den > 0, g_t / safe, 0.0)
            label = 0
            if HAS_LABELS:
                label = tl.load(lab_ptr + x)
            if j == 0:
                loss = kd_scale * (w_f * fkl + w_r * rkl)
                if HAS_LABELS:
                    ok = (label >= 0) & (label < V)  # a bad label was never read: NaN loss
                    zl = tl.load(rp + 8, cache_modifier=".cg")
                    ce = (tl.load(rp + 7, cache_modifier=".cg") - zl) + tl.load(rp + 11, cache_modifier=".cg")
                    loss += ce_w * tl.where(ok, ce, float("nan"))
                tl.store(loss_ptr + x, loss)
            if HAS_GRAD:
                m_s = tl.load(rp + 0, cache_modifier=".cg")
                m_t = tl.load(rp + 1, cache_modifier=".cg")
                ld_s = tl.load(rp + 9, cache_modifier=".cg")
                ld_t = tl.load(rp + 10, cache_modifier=".cg")
                xs = _load(s_ptr + x * s_row, s_col, cols, cm, full)
                xt = _load(t_ptr + x * t_row, t_col, cols, cm, full)
                lq, lp = _split_logp(xs, xt, m_s, ld_s, m_t, ld_t, inv_t, SCALED)
                q = _exp(lq)
                qg = -w_f * _exp(lp) + w_r * tl.where(q != 0, q * (lq - lp), 0.0)
                g = (qg - q * (w_r * rkl - w_f)) * (kd_coef * w)
                m_z = m_s  # only read when CE_RAW
                ld_z = ld_s
                if CE_RAW:
                    m_z = tl.load(rp + 7, cache_modifier=".cg")
                    ld_z = tl.load(rp + 11, cache_modifier=".cg")
                _ce_store(g, xs, q, m_z, ld_z, label, ce_w * w, g_base, cols, g_col, V, full, HAS_LABELS, CE_RAW)


def launch(args: tuple, n: int, v: int, *, has_grad: bool, has_labels: bool, ce_raw: bool, scaled: bool,
           block_v: int | None = None, num_warps: int | None = None, stats=None) -> None:
    """Launch :func:`_akl_split_kernel` with the two-pass kernel's argument tuple ``args`` (student, teacher,
    grad, labels, weight, loss, V, six strides, inv_t, kd_scale, kd_coef, ce_w, β, α, mu, t): allocates the
    workspaces (ws, rs uninitialised; acc, cnt zeroed) and uses grid (N + ROUNDS + 2) · S. ``stats``: an (N, 4)
    fp32 tensor with unit column stride to write the row statistics into, or None."""
    import torch

    if v > AKL_MAX_V:
        raise ValueError(f"the split AKL kernel handles V <= {AKL_MAX_V}, got {v} (use the two-pass kernel)")
    student = args[0]
    bv = block_v or min(AKL_BLOCK_V, max(16, 1 << (v - 1).bit_length()))
    s_count = -(-v // bv)
    dev = student.device
    nslot = NSLOT if stats is None else NSLOT_STATS
    ws = torch.empty(n, s_count, nslot, dtype=torch.float32, device=dev)
    rs = torch.empty(n, RSLOT.value, dtype=torch.float32, device=dev)
    acc = torch.zeros(n, AKL_ROUNDS * AKL_NT + 8, dtype=torch.int64, device=dev)
    cnt = torch.zeros(1 + n * (AKL_ROUNDS + 2), dtype=torch.int32, device=dev)
    mu = args[17 + HYPER_NAMES.index("mu")]
    _akl_split_kernel[((n + AKL_ROUNDS + 2) * s_count,)](
        *args[:6], ws, rs, acc, cnt, *((args[5], 0) if stats is None else (stats, stats.stride(0))),
        n, v, s_count, max(1, (v - 1).bit_length()), *args[7:17], mu,
        HAS_GRAD=has_grad, HAS_LABELS=has_labels, CE_RAW=ce_raw, BLOCK_V=bv,
        SP=max(2, 1 << (s_count - 1).bit_length()), ROUNDS=AKL_ROUNDS, NT=AKL_NT, NV=AKL_NV, SCALED=scaled,
        SH={torch.bfloat16: 16, torch.float16: 13}.get(args[1].dtype, 0), STATS=stats is not None, WS=nslot,
        num_warps=num_warps or AKL_NUM_WARPS)
