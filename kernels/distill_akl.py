"""Split-row Triton schedule of the AKL loss: each logit read once from HBM, the head set found without sorting.

Same mathematics and conventions as :mod:`fastkd.kernels.distill` (the two-pass kernel, kept as the fallback) and
the same ticket-ordered split-row schedule as :mod:`fastkd.kernels.distill_split` (read that docstring first);
this module changes how the head set H of AKL is searched.

The order. The reference sorts p descending with a *stable* sort: equal p are ranked by index. p is strictly
increasing in the raw teacher logit x, so the order is that of the order-preserving int32 ``key(x)`` (−0 counted
as +0; for bf16 / fp16 inputs shifted right by the 16 / 13 low bits that a widened value leaves 0, so that
consecutive input values have consecutive keys), ties by index. With ``S(K) = {i : key_i ≥ K}`` and ``M(K)`` its
mass Σ p, the head is ``H = S(hi) ∪ {the first n indices of G} ∪ {argmax}`` where ``G = S(lo) \\ S(hi)`` for a
bracket of keys with ``M(lo) > mu ≥ M(hi)`` that is *resolved*: either ``hi = lo + 1`` (G is one key: its elements
share one p*, and ``n = ⌊(mu − M(hi)) / p*⌋`` clamped to [0, |G| − 1] are the ones whose running sum stays ≤ mu)
or ``|G| ≤ 1`` (then n = 0: the lone element of G is the first whose running sum exceeds mu). A tied group at the
boundary is thus split by counting, without searching inside it; a rank among G is the number of G elements in
the earlier segments (their per-segment counts are in the rounds' workspace) plus an exclusive cumulative sum in
the segment. ``x ≥ v(K)`` ⟺ ``key(x) ≥ K`` for ``v = _kval(K)``, so a threshold is one fp32 compare.

The search. A bracket starts as (kmin, kmax + 1) (M(kmin) = 1 > mu; S(kmax + 1) empty) and is narrowed by rounds of
two kinds. While it spans more than ``AKL_NB`` keys, a threshold round tests ``AKL_NT`` thresholds at once, each
giving the segment's fp32 (mass, count) of S(K): one compare, one fused multiply-add and one add per element and
threshold. The thresholds lie strictly inside the bracket: slot 0 is the hint below, ``AKL_NV`` slots are uniform in
the logit *value* between the bracket's inner ends (they shrink a smooth distribution's bracket ~NV + 1 times per
round) and the rest uniform in the key (a guaranteed shrink when the values cluster). Within NB keys, a histogram
round counts each key of the bracket (``tl.histogram`` of key − lo, keys ≥ hi in the last bin: a few integer
instructions per element, no exponential), two 16-bit counts per workspace slot; the merge weighs a key's count by
its one p (every element of a key has the same logit, so the same p) and the round resolves the bracket. bf16
N(0, 2²) rows at mu = 0.5 resolve in one threshold and one histogram round. The first round's hint is the key of
``x_b = T·(lse_t + log((1−mu)/V) − 1)``: the first excluded element has p ≥ (1−mu)/V (the ≥ 1−mu of mass from it on
lies on ≤ V elements), so M there exceeds mu. ``mu ≥ 1`` is every token (fkl): the bracket starts resolved at S(kmin).

Exactness. A segment's sums are fp32 tree sums of the same per-element p in every round (and every threshold), so
M is monotone in K across thresholds and rounds (rounding is monotone and the terms are ≥ 0; a histogram round's
suffix sums M(hi) + Σ c_k·p_k are made non-increasing by a running maximum); the S per-segment
sums are added in one fixed order by every reader (deterministic, no atomics on the sums), and counts are exact
(fp32 integers, V ≤ 2^24). H equals the float64 reference's unless mu lies within ~1e-6 relative of a cumulative
head mass.

The schedule (``LAG = AKL_ROUNDS + 2`` phases after the statistics; unit = (row r, segment j), ticket-ordered):

* phase 0, row r: segment statistics (max / sum-exp and the fkl, rkl sums of s and t, min / max key and the first
  index of the max, the cross-entropy's raw lse and label logit) → workspace ``ws[r, j]``;
* phases 1..R (round i = k − 1), row r − k: wait for phase k − 1 of that row; merge (round 0: the S segment
  statistics, segment 0 then writes the row summary ``rs[r]``; later rounds: ``rs[r]``); the bracket before round
  i (round 0: the first bracket; later: the one published before round i − 1 narrowed by round i − 1's sums),
  published by segment 0 in one of two slots by parity; if unresolved, read the teacher segment and store its NT
  (mass, count) pairs in ``sw[r, i, j]``;
* phase R + 1, row r − R − 1: the bracket after the R rounds; if still unresolved (rare: values clustered so that
  R rounds do not isolate one key), finish the search over the whole row in this program (same thresholds, every
  program of the row identically); the tie count n; then read s and t of the segment and write
  ``A_j = Σ_{j, H} |p − q|`` and ``G_j = Σ_j |p − q|``;
* phase R + 2 (final), row r − R − 2: ``g_H = Σ_j A_j``, ``g_T = Σ_j G_j − g_H`` (fixed order), the loss
  (segment 0) and the gradient of the segment (as the two-pass kernel's akl branch).

Bytes (the L2 argument of ``distill_split``, the rule of ``bench/costcount.py``). A unit's distinct bytes are its
phase-0 s + t segments, R teacher segments, the phase R + 1 and final s + t segments (+ the gradient written)
and the round sums; a segment's last re-read comes LAG · S tickets after its first read: with BLOCK_V = 4096 bf16
and V = 131072 (S = 32) that is (R + 2)·32 = 192 tickets, and the window stays in L2 (the model's L2 rule checks it
per launch). Rounds of a resolved row read nothing.

``STATS`` (return_stats): phase 0 also writes the segment's entropy sums and the student's raw max and
first index (``NSLOT_STATS``; the shared helpers and slot names of :mod:`fastkd.kernels._blocks`), and segment 0
of round 0, which merges the row anyway, writes ``[teacher_entropy, student_entropy, top1_agree, kl]``; no other
phase changes, so loss and gradient are bitwise those of the launch without stats.

Work per logit: phase 0 ≈ 2 exps and the keys, each executed threshold round one exp and 3·NT instructions (plus the
NT block reductions), a histogram round the key and the histogram's ~15 integer instructions, the err phase 2 exps
(and the tie rank's cumulative sum when the boundary group is split), the final phase 2 exps. The round counts of
sample rows and the cost model's figures are in docs/DESIGN.md / bench/RESULTS.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.core.divergences import HYPER_NAMES
from fastkd.kernels._blocks import (
    LN2,
    LOG2E,
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
    _load_seg,
    _logp,
    _online,
    _split_logp,
    _store_stats,
    _wait,
    split_defaults,
    ticket_magic,
)

AKL_LAUNCH = (4096, 8)  # default (BLOCK_V, num_warps) of 2-byte logits: 16 elements per thread, no spills (DESIGN)
AKL_HEAVY = (2048, 8)  # the raw-logit cross-entropy's (CE at T != 1): no spills
AKL_ROUNDS = 4  # search rounds done as phases (unresolved rows finish in the err phase)
AKL_NT = 16  # thresholds per round
AKL_NV = 12  # of which uniform in the logit value while the bracket spans more than NB keys (slot 0: the hint)
AKL_NB = 64  # keys of a histogram round: a bracket of at most NB keys is counted per key (two 16-bit counts per
# slot of the round's 2·NT; so NB <= 4·NT and BLOCK_V < 2^16) and resolved by that one round
AKL_MAX_V = 1 << 24  # counts are fp32 sums of ones: exact up to 2^24
AKL_MAX_FALLBACK = 72  # bound of the whole-row bisection's passes (each halves the key span or counts an end)
RSLOT = tl.constexpr(12)  # fp32 slots per row in rs: maxima m_s, m_t, m_z (0, 1, 7) and log-sums ld_s, ld_t, ld_z
# (9, 10, 11) of the log-normalisers kept split (x − m exact at large logits), fkl, rkl (2, 3), keys (4–6), zl (8)
BSLOT = tl.constexpr(8)  # int64 slots of a published bracket: lo, hi, tag lo, tag hi, C(lo), C(hi), M(hi) bits
NEG = tl.constexpr(float("-inf"))
TAG_NONE = tl.constexpr(-1)  # S(kmax + 1): empty
TAG_ALL = tl.constexpr(-2)  # S(kmin): every column
TAG_ROW = tl.constexpr(-3)  # found by the whole-row search (no per-segment counts stored)
TAG_UNC = tl.constexpr(-4)  # a key of a round that summed no counts (C placeholder: +inf for lo, 0 for hi)


@triton.jit
def _key(x, SH: tl.constexpr):
    """Order-preserving int32 of fp32 x (−0 and +0 equal), shifted right by SH: the low SH bits of a bf16 (16) or
    fp16 (13) value widened to fp32 are constant, so the shifted keys are consecutive for consecutive values."""
    b = x.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    return tl.where(x == 0.0, 0, k >> SH)


@triton.jit
def _kval(k, SH: tl.constexpr):
    """The input value of key ``k`` (int32): for an input x (a widened bf16 / fp16 / fp32), ``x ≥ _kval(K)`` ⟺
    ``key(x) ≥ K``; key(−inf) gives −inf, keys past +inf a NaN (nothing is ≥ it), key −1 (no input) −0."""
    b = k << SH
    b = tl.where(k < 0, (b | ((1 << SH) - 1)) ^ 0x7FFFFFFF, b)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _hint(m_t, ld_t, mu, V, inv_t, SH: tl.constexpr):
    """Key of x_b = T·(lse_t + log((1 − mu)/V) − 1): M(key(x_b)) > mu (module docstring); the first round's slot 0."""
    x_b = (m_t + ld_t + tl.log(tl.maximum(1.0 - mu, 1e-30) / V) - 1.0) / inv_t
    return _key(tl.maximum(x_b, -3.0e38), SH).to(tl.int64)


@triton.jit
def _is_narrow(lo, hi, NB: tl.constexpr):
    """A bracket whose keys lo..hi (ends included) fit in one histogram round's NB bins."""
    return (hi - lo + 1) <= NB


@triton.jit
def _thresholds(lo, hi, base, SH: tl.constexpr, NT: tl.constexpr, NV: tl.constexpr):
    """NT keys (int64) of a threshold round on a bracket (lo, hi) wider than NB keys, strictly inside it: slot 0 =
    ``base`` (clamped), NV slots uniform in the value between the bracket's inner ends (when finite) and the rest
    uniform in the key (module docstring)."""
    i = tl.arange(0, NT)
    span = hi - lo - 1  # keys strictly inside
    b = tl.minimum(tl.maximum(base, lo + 1), hi - 1)
    x_lo = _kval(b.to(tl.int32), SH)
    x_hi = _kval((hi - 1).to(tl.int32), SH)
    value = (tl.abs(x_lo) < float("inf")) & (tl.abs(x_hi) < float("inf"))
    kv = _key(x_lo + (x_hi - x_lo) * (i.to(tl.float32) * (1.0 / (NV + 1))), SH).to(tl.int64)
    NK: tl.constexpr = NT - NV - 1
    ik = tl.where(value, i - NV, i).to(tl.float32)  # key slots: NV + 1.. (value) or 1.. (not), numbered from 1
    frac = ik * tl.where(value, 1.0 / (NK + 1), 1.0 / NT)
    ke = lo + 1 + (span.to(tl.float32) * frac).to(tl.int64)
    th = tl.where(i == 0, b, tl.where(tl.where(value, i <= NV, i < 0), kv, ke))  # (a where: the interpreter
    # cannot and a scalar bool with a vector)
    return tl.minimum(tl.maximum(th, lo + 1), hi - 1)


@triton.jit
def _slot_sums(xc, p, v, ar, i, mass, cnt, COUNT: tl.constexpr):
    """Slot i of :func:`_seg_sums`: the segment's mass (and with ``COUNT`` count) of {xc ≥ v[i]}."""
    m = (xc >= tl.sum(tl.where(ar == i, v, 0.0), 0)).to(tl.float32)
    mass = tl.where(ar == i, tl.sum(m * p, 0), mass)
    if COUNT:
        cnt = tl.where(ar == i, tl.sum(m, 0), cnt)
    return mass, cnt


@triton.jit
def _seg_sums(xc, p, th, SH: tl.constexpr, NT: tl.constexpr, COUNT: tl.constexpr):
    """fp32 mass and (``COUNT``) count of S(K) over one segment for the NT keys of ``th``: xc the teacher logits
    (NaN on masked columns, so never counted), p their probabilities (0 there)."""
    v = _kval(th.to(tl.int32), SH)
    ar = tl.arange(0, NT)
    mass = tl.zeros([NT], tl.float32)
    cnt = tl.zeros([NT], tl.float32)
    for i in tl.static_range(NT):
        mass, cnt = _slot_sums(xc, p, v, ar, i, mass, cnt, COUNT)
    return mass, cnt


@triton.jit
def _seg_hist(xt, cm, lo, hi, SH: tl.constexpr, NB: tl.constexpr):
    """A histogram round over one segment: the count of each key lo..hi − 1 and, in bin hi − lo, of S(hi) (the
    bracket spans at most NB keys), packed two 16-bit counts per int32 (bins 2c, 2c + 1 in slot c). No
    probabilities: the merge weighs a key's count by its one p."""
    key = _key(xt, SH)
    lo32 = lo.to(tl.int32)
    top = (hi - lo).to(tl.int32)
    b = tl.where(key >= hi.to(tl.int32), top, key - lo32)  # key − lo only below hi: < NB, no overflow
    h = tl.histogram(b, NB, mask=cm & (key >= lo32))
    ev, od = tl.split(tl.reshape(h, (NB // 2, 2)))
    return ev | (od << 16)


@triton.jit
def _fmax(a, b):
    return tl.maximum(a, b)


@triton.jit
def _bins(sw_round, segs, rows, NT: tl.constexpr, NB: tl.constexpr):
    """The per-segment bin counts of a histogram round (its packed slots at ``sw_round``; segments ``segs``,
    loaded where ``rows``): (even bins, odd bins), each (SP, NB // 2) int32."""
    pk = tl.load(sw_round + segs[:, None] * (2 * NT) + tl.arange(0, NB // 2)[None, :], mask=rows[:, None], other=0.0,
                 cache_modifier=".cg").to(tl.int32, bitcast=True)
    return pk & 0xFFFF, (pk >> 16) & 0xFFFF


@triton.jit
def _hist_sums(sw_round, lo, hi, mhi, m_t, ld_t, inv_t, S, SCALED: tl.constexpr, SH: tl.constexpr,
               NB: tl.constexpr, NT: tl.constexpr, SP: tl.constexpr):
    """Row sums of a histogram round (its S segments' packed counts at ``sw_round``, added in one order):
    count C(K) and mass M(K) = M(hi) + Σ_{K ≤ k < hi} c_k·p_k of S(K) for K = lo + b, b < NB, made
    non-increasing in K (as the threshold rounds' sums are) by a running maximum."""
    segs = tl.arange(0, SP)
    ev, od = _bins(sw_round, segs, segs < S, NT, NB)
    h = tl.reshape(tl.join(tl.sum(ev, 0), tl.sum(od, 0)), (NB,))
    ar = tl.arange(0, NB)
    cnt = tl.cumsum(h, 0, reverse=True).to(tl.float32)  # bins b.. : the suffix S(lo + b), exact integers
    p = tl.math.exp2(_logp(_kval((lo + ar).to(tl.int32), SH), m_t, ld_t * LOG2E, inv_t, SCALED))
    w = tl.where(ar < (hi - lo), h.to(tl.float32) * p, 0.0)  # bin hi − lo is S(hi): its mass is M(hi)
    # a scan's suffixes are sums of different shapes: the running maximum from the top makes M non-increasing
    mass = tl.associative_scan(mhi + tl.cumsum(w, 0, reverse=True), 0, _fmax, reverse=True)
    return mass, cnt


@triton.jit
def _narrow(lo, hi, tlo, thi, clo, chi, mhi, th, nk, tags, counted, mass, cnt, mu):
    """The bracket after testing the first ``nk`` keys of ``th`` (tags ``tags``; ``counted``: their counts are
    sums, else unknown) with row sums (mass, cnt): the largest failing key (M > mu; the bracket's own lo always
    fails, its hi passes) becomes lo, the smallest passing one hi, each with its tag and sums (a tested key
    equal to an end takes over its tag: a histogram round counts both ends)."""
    ok = tl.arange(0, th.shape[0]) < nk
    fail = ((mass > mu) | (th == lo)) & (th != hi)
    lo_n = tl.max(tl.where(ok & fail, th, lo), 0)
    hi_n = tl.min(tl.where(ok & (~fail), th, hi), 0)
    s_lo = ok & fail & (th == lo_n)
    s_hi = ok & (~fail) & (th == hi_n)
    up = tl.max(s_lo.to(tl.int32), 0) > 0
    down = tl.max(s_hi.to(tl.int32), 0) > 0
    tag_lo = tl.min(tl.where(s_lo, tags, 2147483647), 0)
    tag_hi = tl.min(tl.where(s_hi, tags, 2147483647), 0)
    tlo = tl.where(up, tl.where(counted, tag_lo, TAG_UNC), tlo)
    clo = tl.where(up, tl.where(counted, tl.max(tl.where(s_lo, cnt, -1.0), 0), 3.0e38), clo)
    thi = tl.where(down, tl.where(counted, tag_hi, TAG_UNC), thi)
    chi = tl.where(down, tl.where(counted, tl.max(tl.where(s_hi, cnt, -1.0), 0), 0.0), chi)
    mhi = tl.where(down, tl.max(tl.where(s_hi, mass, -1.0), 0), mhi)
    return lo_n, hi_n, tlo, thi, clo, chi, mhi


@triton.jit
def _open(lo, hi, tlo, thi, clo, chi):
    """An unresolved bracket: more than one element between its ends, and more than one key or an end whose
    counts no round summed (a value round of 2-byte logits counts nothing)."""
    return (((hi - lo) > 1) | (tlo == TAG_UNC) | (thi == TAG_UNC)) & ((clo - chi) > 1.0)


@triton.jit
def _publish(bp, lo, hi, tlo, thi, clo, chi, mhi):
    tl.store(bp + 0, lo)
    tl.store(bp + 1, hi)
    tl.store(bp + 2, tlo.to(tl.int64))
    tl.store(bp + 3, thi.to(tl.int64))
    tl.store(bp + 4, clo.to(tl.int32, bitcast=True).to(tl.int64))
    tl.store(bp + 5, chi.to(tl.int64))
    tl.store(bp + 6, mhi.to(tl.int32, bitcast=True).to(tl.int64))


@triton.jit
def _step(br_row, sw_row, i, kb, mu, S, m_t, ld_t, inv_t, SCALED: tl.constexpr, SH: tl.constexpr,
          NT: tl.constexpr, NV: tl.constexpr, NB: tl.constexpr, SP: tl.constexpr, ROUNDS: tl.constexpr):
    """The bracket after round i (0-based): the one published before it (slot i % 2), narrowed by its sums
    (merged over the S segments in one order; every program of the row computes the same): a histogram round's
    per-key sums resolve it; a threshold round's narrow it."""
    bp = br_row + (i % 2) * BSLOT
    lo = tl.load(bp + 0, cache_modifier=".cg")
    hi = tl.load(bp + 1, cache_modifier=".cg")
    tlo = tl.load(bp + 2, cache_modifier=".cg").to(tl.int32)
    thi = tl.load(bp + 3, cache_modifier=".cg").to(tl.int32)
    clo = tl.load(bp + 4, cache_modifier=".cg").to(tl.int32).to(tl.float32, bitcast=True)
    chi = tl.load(bp + 5, cache_modifier=".cg").to(tl.float32)
    mhi = tl.load(bp + 6, cache_modifier=".cg").to(tl.int32).to(tl.float32, bitcast=True)
    if _open(lo, hi, tlo, thi, clo, chi):
        if _is_narrow(lo, hi, NB):
            ab = tl.arange(0, NB)
            hmass, hcnt = _hist_sums(sw_row + i * S * 2 * NT, lo, hi, mhi, m_t, ld_t, inv_t, S, SCALED, SH, NB, NT,
                                     SP)  # (names of their own: a variable keeps one shape through an if)
            lo, hi, tlo, thi, clo, chi, mhi = _narrow(lo, hi, tlo, thi, clo, chi, mhi, lo + ab.to(tl.int64),
                                                      (hi - lo + 1).to(tl.int32), ROUNDS * NT + i * NB + ab, True,
                                                      hmass, hcnt, mu)
        else:
            th = _thresholds(lo, hi, tl.where(i == 0, kb, lo + 1), SH, NT, NV)
            segs = tl.arange(0, SP)
            ar = tl.arange(0, NT)
            tile = sw_row + i * S * 2 * NT + segs[:, None] * (2 * NT) + ar[None, :]
            m2 = (segs < S)[:, None]
            mass = tl.sum(tl.load(tile, mask=m2, other=0.0, cache_modifier=".cg"), 0)
            cnt = tl.sum(tl.load(tile + NT, mask=m2, other=0.0, cache_modifier=".cg"), 0)
            lo, hi, tlo, thi, clo, chi, mhi = _narrow(lo, hi, tlo, thi, clo, chi, mhi, th, NT, i * NT + ar,
                                                      SH == 0, mass, cnt, mu)
    return lo, hi, tlo, thi, clo, chi, mhi


@triton.jit
def _seg_count(sw_row, tag, segs, upto, S, V, BLOCK_V: tl.constexpr, NT: tl.constexpr, NB: tl.constexpr,
               ROUNDS: tl.constexpr):
    """Per-segment counts of S(K) for the key of ``tag`` in segments ``segs`` < ``upto`` ((SP,) fp32): a threshold
    round's slot (tag i·NT + slot), or bin b of histogram round i (tag ROUNDS·NT + i·NB + b: the segment's bins
    b.. added)."""
    valid = tl.minimum(V - segs * BLOCK_V, BLOCK_V).to(tl.float32)
    sel = (segs < upto) & (segs < S)
    HT0: tl.constexpr = ROUNDS * NT
    t = tl.maximum(tag, 0)
    ok = sel & ((segs * 0 + tag) >= 0)  # a vector compare: the interpreter widens a bool vector & bool scalar
    hist = (segs * 0 + t) >= HT0  # (SP,), the same in every slot
    ti = tl.where(hist, 0, t)
    c = tl.load(sw_row + (ti // NT) * S * 2 * NT + segs * (2 * NT) + NT + ti % NT, mask=ok & (~hist), other=0.0,
                cache_modifier=".cg")
    th = tl.maximum(t - HT0, 0)  # a histogram tag's round and bin (a scalar)
    ev, od = _bins(sw_row + (th // NB) * S * 2 * NT, segs, ok & hist, NT, NB)
    hb = tl.arange(0, NB // 2)
    b = th % NB
    ch = tl.sum(tl.where((2 * hb >= b)[None, :], ev, 0) + tl.where((2 * hb + 1 >= b)[None, :], od, 0), 1)
    c = tl.where(hist, ch.to(tl.float32), c)
    return tl.where(sel, tl.where(tag == TAG_ALL, valid, c), 0.0)



@triton.jit(do_not_specialize=["S"])  # Triton 3.6's compile of S == 1 (one segment) spilled 40–68 B
def _akl_split_kernel(
    s_ptr, t_ptr, g_ptr, lab_ptr, w_ptr, loss_ptr,  # as _distill_kernel
    ws_ptr,  # (N, S, WS) fp32 workspace (no initialisation needed)
    rs_ptr,  # (N, RSLOT) fp32 row summaries (no initialisation needed)
    sw_ptr,  # (N, ROUNDS, S, 2·NT) fp32 round sums (mass, then count, of each threshold; no initialisation)
    br_ptr,  # (N, 2, BSLOT) int64: the bracket before round i in slot i % 2, written by its segment 0
    cnt_ptr,  # (1 + N·(ROUNDS + 2),) int32, zeroed: [0] ticket, [1 + r·(ROUNDS + 2) + phase] units done
    st_ptr, st_row,  # (N, 4) fp32 statistics output (unit column stride); unused without STATS
    N, V, S,
    s_magic, s_shift,  # ticket_magic(S): the ticket's row u // S as a multiply and a shift
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
    NB: tl.constexpr,  # keys of a histogram round (AKL_NB)
    MAX_FALLBACK: tl.constexpr,
    SCALED: tl.constexpr,
    SH: tl.constexpr,  # key shift: 16 for bf16, 13 for fp16, 0 for fp32 (see _key)
    STATS: tl.constexpr,  # also write the row statistics (fastkd.core.stats), by segment 0 of round 0
    WS: tl.constexpr,  # workspace slots per unit: NSLOT, or NSLOT_STATS with STATS
):
    NPH: tl.constexpr = ROUNDS + 2
    tl.static_assert((NB <= 4 * NT) & (BLOCK_V < 65536))  # a histogram round's packed 16-bit counts
    SWROW: tl.constexpr = ROUNDS * 2 * NT  # per segment and row: S·SWROW floats per row
    u = tl.atomic_add(cnt_ptr, 1).to(tl.int64)  # ticket (distill_split's docstring: why not the program id)
    r = (u * s_magic) >> s_shift  # divmod by a multiply and a shift (distill_split: no called subroutine)
    j = u - r * S
    start = j * BLOCK_V
    offs = tl.arange(0, BLOCK_V)
    cols = start.to(tl.int32) + offs  # column indices in int32 (V < 2^31) for compares: half the registers of
    # int64 through every phase; the loads and the gradient store form their int64 addresses from start + offs
    cm = cols < V
    full = start + BLOCK_V <= V
    segs = tl.arange(0, SP)
    sm = segs < S
    zero = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    mu = zero + h_mu  # a tensor in the interpreter too (a Python float there)

    # ---- phase 0: statistics of segment j of row r ---------------------------------------------------------
    if r < N:
        if tl.load(w_ptr + r) != 0.0:
            xs = _load_seg(s_ptr + r * s_row, s_col, start, offs, V, full, NEG)
            xt = _load_seg(t_ptr + r * t_row, t_col, start, offs, V, full, NEG)
            s = xs
            t = xt
            if SCALED:
                s = xs * inv_t
                t = xt * inv_t
            # the key range and the first index of the max from the values (key is monotone, and equal keys are
            # equal values): one min / max per element instead of the key's integer work
            vmax = tl.max(xt, 0)  # (masked columns are −inf; the same reduction as m_t's when T = 1)
            vmin = tl.min(tl.where(cm, xt, float("inf")), 0)
            kmin = _key(vmin, SH)
            kmax = _key(vmax, SH)
            imax = tl.min(tl.where(cm & (xt == vmax), cols, V), 0).to(tl.int32)
            m_s, d_s, a_r = _online(zero + NEG, zero, zero, s, t)
            m_t, d_t, a_f = _online(zero + NEG, zero, zero, t, s)
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

    # ---- phases 1..ROUNDS: search round i = k − 1 of row r − k ---------------------------------------------
    for k in range(1, ROUNDS + 1):
        i = k - 1
        x = r - k
        if (x >= 0) & (x < N):
            if tl.load(w_ptr + x) != 0.0:
                _wait(cnt_ptr + 1 + x * NPH + k - 1, S)
                rp = rs_ptr + x * RSLOT
                if i == 0:  # merge the segment statistics; segment 0 publishes the row summary
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
                br_row = br_ptr + x * 2 * BSLOT
                sw_row = sw_ptr + x * S * SWROW
                kb = _hint(m_t, ld_t, mu, V, inv_t, SH)
                if i == 0:  # the first bracket: (kmin, kmax + 1), or S(kmin) itself when mu >= 1
                    lo = kmin.to(tl.int64)
                    hi = kmax.to(tl.int64) + 1
                    tlo = (zero * 0).to(tl.int32) + TAG_ALL
                    thi = (zero * 0).to(tl.int32) + TAG_NONE
                    clo = zero + V
                    chi = zero
                    mhi = zero
                    if mu >= 1.0:
                        lo = lo - 1
                        hi = lo + 1
                        thi = tlo
                        chi = clo
                        mhi = zero + 1.0
                else:  # the bracket before round i − 1 (published by its segment 0) + round i − 1's sums
                    lo, hi, tlo, thi, clo, chi, mhi = _step(br_row, sw_row, i - 1, kb, mu, S, m_t, ld_t, inv_t, SCALED,
                                                            SH, NT, NV, NB, SP, ROUNDS)
                if j == 0:  # publish the bracket before round i (read by round i + 1 or the err phase); two
                    # slots by parity: the other programs of round i may still read the one published by i − 1
                    _publish(br_row + (i % 2) * BSLOT, lo, hi, tlo, thi, clo, chi, mhi)
                if _open(lo, hi, tlo, thi, clo, chi):  # unresolved: this round's sums over the segment
                    xt = _load_seg(t_ptr + x * t_row, t_col, start, offs, V, full, NEG)
                    sp = sw_row + j * 2 * NT + i * S * 2 * NT
                    if _is_narrow(lo, hi, NB):  # at most NB keys: counted per key, resolved by this round
                        tl.store(sp + tl.arange(0, NB // 2), _seg_hist(xt, cm, lo, hi, SH, NB).to(tl.float32,
                                                                                                 bitcast=True))
                    else:
                        th = _thresholds(lo, hi, tl.where(i == 0, kb, lo + 1), SH, NT, NV)
                        p = tl.where(cm, tl.math.exp2(_logp(xt, m_t, ld_t * LOG2E, inv_t, SCALED)), 0.0)
                        mass, cnt = _seg_sums(tl.where(cm, xt, float("nan")), p, th, SH, NT, SH == 0)
                        tl.store(sp + tl.arange(0, NT), mass)
                        tl.store(sp + NT + tl.arange(0, NT), cnt)
            tl.atomic_add(cnt_ptr + 1 + x * NPH + k, 1, sem="release")

    # ---- phase ROUNDS + 1: resolve, then the segment's Σ_H |p − q| and Σ |p − q| -----------------------------
    x = r - ROUNDS - 1
    if (x >= 0) & (x < N):
        if tl.load(w_ptr + x) != 0.0:
            _wait(cnt_ptr + 1 + x * NPH + ROUNDS, S)
            rp = rs_ptr + x * RSLOT
            m_t = tl.load(rp + 1, cache_modifier=".cg")
            ld_t = tl.load(rp + 10, cache_modifier=".cg")
            amax = tl.load(rp + 6, cache_modifier=".cg").to(tl.int32, bitcast=True)
            br_row = br_ptr + x * 2 * BSLOT
            sw_row = sw_ptr + x * S * SWROW
            kb = _hint(m_t, ld_t, mu, V, inv_t, SH)
            lo, hi, tlo, thi, clo, chi, mhi = _step(br_row, sw_row, ROUNDS - 1, kb, mu, S, m_t, ld_t, inv_t, SCALED, SH,
                                                    NT, NV, NB, SP, ROUNDS)
            t_base = t_ptr + x * t_row
            it = 0
            while _open(lo, hi, tlo, thi, clo, chi) & (it < MAX_FALLBACK):  # rare: bisect over the whole row
                # one key per pass (a light loop body): the middle of the bracket, or an end still to be counted
                kk = tl.where((hi - lo) > 1, lo + ((hi - lo) >> 1), tl.where(tlo == TAG_UNC, lo, hi))
                vk = _kval(kk.to(tl.int32), SH)
                mass1 = zero
                cnt1 = zero
                for jj in range(0, S):
                    m2 = (jj * BLOCK_V + offs) < V
                    xt2 = _load_seg(t_base, t_col, start + (jj - j) * BLOCK_V, offs, V, False, NEG)  # segment jj
                    p2 = tl.where(m2, tl.math.exp2(_logp(xt2, m_t, ld_t * LOG2E, inv_t, SCALED)), 0.0)
                    in2 = (m2 & (xt2 >= vk)).to(tl.float32)
                    mass1 += tl.sum(in2 * p2, 0)
                    cnt1 += tl.sum(in2, 0)
                pair = tl.arange(0, 2)
                th = tl.zeros([2], tl.int64) + kk
                tags = tl.zeros([2], tl.int32) + TAG_ROW
                lo, hi, tlo, thi, clo, chi, mhi = _narrow(lo, hi, tlo, thi, clo, chi, mhi, th, 1, tags, True,
                                                          mass1 + 0.0 * pair, cnt1 + 0.0 * pair, mu)
                it += 1
            # the tie count: the first n elements (by index) of G = S(lo) \ S(hi) are in the head (one key)
            p_star = tl.math.exp2(_logp(_kval(lo.to(tl.int32), SH), m_t, ld_t * LOG2E, inv_t, SCALED))
            c_g = clo - chi
            n_f = tl.where(p_star > 0, tl.floor((mu - mhi) / tl.where(p_star > 0, p_star, 1.0)), c_g)
            n = tl.where(((hi - lo) == 1) & (c_g >= 2.0), tl.minimum(tl.maximum(n_f, 0.0), c_g - 1.0), 0.0)
            n = n.to(tl.int32)
            m_s = tl.load(rp + 0, volatile=True)  # volatile: loaded here, not kept in registers through the loop
            ld_s = tl.load(rp + 9, volatile=True)
            xs = _load_seg(s_ptr + x * s_row, s_col, start, offs, V, full, NEG)
            xt = _load_seg(t_base, t_col, start, offs, V, full, NEG)
            # the log-normalisers kept split (exact x − max first), as in the rounds and the gradient: p has the
            # rounds' bits and |p − q| no per-row factor error at large logits
            lq2, lp2 = _split_logp(xs, xt, m_s, ld_s * LOG2E, m_t, ld_t * LOG2E, inv_t, SCALED)
            err = tl.where(cm, tl.abs(tl.math.exp2(lp2) - tl.math.exp2(lq2)), 0.0)
            v_hi = _kval(hi.to(tl.int32), SH)
            # the head's sum in parts, so that no predicate lives across a branch: S(hi), the argmax where it is
            # not in S(hi) (hi above the top key kmax) and not the first element of a split G (the first index of
            # kmax is G's first element when G is kmax's group), and the first n elements of a split G
            a_head = tl.sum(tl.where(xt >= v_hi, err, 0.0), 0)
            if (hi > tl.load(rp + 5, cache_modifier=".cg").to(tl.int32, bitcast=True)) & (n == 0):
                a_head += tl.sum(tl.where(cols == amax, err, 0.0), 0)
            if n > 0:  # rank = G elements before this one in the row, counted in fp32 (exact below 2^24)
                # n > 0 only when G is one key, lo: its elements are those equal to v(lo) (a 2-byte value widens
                # to its key's value; ±0 share key 0 and compare equal)
                v_lo = _kval(lo.to(tl.int32), SH)
                gf = tl.where(cm & (xt == v_lo), 1.0, 0.0)
                if it == 0:  # the per-segment counts of lo and hi are in the rounds' workspace
                    pre = tl.sum(_seg_count(sw_row, tlo, segs, j, S, V, BLOCK_V, NT, NB, ROUNDS)
                                 - _seg_count(sw_row, thi, segs, j, S, V, BLOCK_V, NT, NB, ROUNDS), 0)
                else:  # the whole-row search: count the earlier segments' G elements
                    pre = zero
                    for jj in range(0, j):
                        m2 = (jj * BLOCK_V + offs) < V
                        xt2 = _load_seg(t_base, t_col, start + (jj - j) * BLOCK_V, offs, V, False, NEG)
                        pre += tl.sum(tl.where(m2 & (xt2 == v_lo), 1.0, 0.0), 0)  # (a full segment)
                first = (pre + tl.cumsum(gf, 0) - gf) < n.to(tl.float32)
                a_head += tl.sum(tl.where(first, gf * err, 0.0), 0)
            wp = ws_ptr + (x * S + j) * WS
            tl.store(wp + WS_P0, a_head)
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
                tl.store(g_base + (start + offs) * g_col, tl.zeros([BLOCK_V], tl.float32).to(g_ptr.dtype.element_ty),
                         mask=cm)
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
                xs = _load_seg(s_ptr + x * s_row, s_col, start, offs, V, full, NEG)
                xt = _load_seg(t_ptr + x * t_row, t_col, start, offs, V, full, NEG)
                lq2, lp2 = _split_logp(xs, xt, m_s, ld_s * LOG2E, m_t, ld_t * LOG2E, inv_t, SCALED)
                q = tl.math.exp2(lq2)
                qg = -w_f * tl.math.exp2(lp2) + (w_r * LN2) * tl.where(q != 0, q * (lq2 - lp2), 0.0)
                g = (qg - q * (w_r * rkl - w_f)) * (kd_coef * w)
                m_z = m_s  # only read when CE_RAW
                ld_z = ld_s
                if CE_RAW:
                    m_z = tl.load(rp + 7, cache_modifier=".cg")
                    ld_z = tl.load(rp + 11, cache_modifier=".cg")
                _ce_store(g, xs, q, m_z, ld_z * LOG2E, label, ce_w * w, g_base, start + offs, g_col, V, full,
                          HAS_LABELS, CE_RAW)


def default_launch(itemsize: int = 2, ce_raw: bool = False) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the split AKL kernel: ``AKL_LAUNCH``, or ``AKL_HEAVY`` with the raw-logit
    cross-entropy (CE at T != 1: at (4096, 8) fp16 spilled 240 B once the histogram round came in; (4096, 16)
    caps registers at 128 and spilled 32–48 B); STATS keeps the plain block (no spills there); 4-byte logits halve
    a block above 2048 (:func:`fastkd.kernels._blocks.split_defaults`)."""
    return split_defaults(AKL_HEAVY if ce_raw else AKL_LAUNCH, None, False, itemsize)


def launch(args: tuple, n: int, v: int, *, has_grad: bool, has_labels: bool, ce_raw: bool, scaled: bool,
           block_v: int | None = None, num_warps: int | None = None, stats=None) -> None:
    """Launch :func:`_akl_split_kernel` with the two-pass kernel's argument tuple ``args`` (student, teacher,
    grad, labels, weight, loss, V, six strides, inv_t, kd_scale, kd_coef, ce_w, β, α, mu, t): allocates the
    workspaces (ws, rs, sw, br uninitialised; cnt zeroed) and uses grid (N + ROUNDS + 2) · S. ``stats``: an (N, 4)
    fp32 tensor with unit column stride to write the row statistics into, or None."""
    import torch

    if v > AKL_MAX_V:
        raise ValueError(f"the split AKL kernel handles V <= {AKL_MAX_V}, got {v} (use the two-pass kernel)")
    student, teacher = args[0], args[1]
    bv_d, nw_d = default_launch(max(student.element_size(), teacher.element_size()), ce_raw)
    bv = block_v or bv_d  # not shrunk to a short row: Triton 3.6 spilled 24–68 B at (1024, 8) (V = 1000)
    if bv >= 1 << 16:  # a histogram round packs two 16-bit counts per slot
        raise ValueError(f"block_v must be < 65536 for the split AKL kernel, got {bv}")
    s_count = -(-v // bv)
    dev = student.device
    nslot = NSLOT if stats is None else NSLOT_STATS
    ws = torch.empty(n, s_count, nslot, dtype=torch.float32, device=dev)
    rs = torch.empty(n, RSLOT.value, dtype=torch.float32, device=dev)
    sw = torch.empty(n, AKL_ROUNDS, s_count, 2 * AKL_NT, dtype=torch.float32, device=dev)
    br = torch.empty(n, 2, BSLOT.value, dtype=torch.int64, device=dev)
    cnt = torch.zeros(1 + n * (AKL_ROUNDS + 2), dtype=torch.int32, device=dev)
    mu = args[17 + HYPER_NAMES.index("mu")]
    _akl_split_kernel[((n + AKL_ROUNDS + 2) * s_count,)](
        *args[:6], ws, rs, sw, br, cnt, *((args[5], 0) if stats is None else (stats, stats.stride(0))),
        n, v, s_count, *ticket_magic(s_count), *args[7:17], mu,
        HAS_GRAD=has_grad, HAS_LABELS=has_labels, CE_RAW=ce_raw, BLOCK_V=bv,
        SP=max(16, 1 << (s_count - 1).bit_length()), ROUNDS=AKL_ROUNDS, NT=AKL_NT, NV=AKL_NV, NB=AKL_NB,
        MAX_FALLBACK=AKL_MAX_FALLBACK, SCALED=scaled,
        SH={torch.bfloat16: 16, torch.float16: 13}.get(teacher.dtype, 0), STATS=stats is not None, WS=nslot,
        num_warps=num_warps or nw_d)
