"""The ``@triton.jit`` building blocks every kernel family shares, and the workspace layout of the split-row
distill kernels: one place, imported by the kernel files (none of them imports helpers from another).

Conventions (those of :mod:`fastkd.kernels.distill`): blocks are 1-D fp32 vectors, masked lanes hold −inf on
every side, so a term ``e^{x−m}·(...)`` is skipped where ``e^{x−m} = 0`` (``0·(−inf)`` would be NaN) and a NaN
input still propagates. Log-normalisers stay split as (max, log Σe^{x−max}): a logit minus the max is exact in
fp32, a logit minus the rounded lse is not at large |logits|.

Contents: e^x and log x on the MUFU (:func:`_exp`, :func:`_exp_shift`, :func:`_log2`); bf16 unpacking
(:func:`_unpack`); log-add-exp (:func:`_lae`); online and per-block
(max, sum-exp) folds (:func:`_online`, :func:`_lse_block`); entropy partials and their merges (:func:`_ent_block`,
:func:`_ent_online`, :func:`_ent_merge`); the first-index argmax (:func:`_argmax_block`, :func:`_argmax_fold`); the
statistics store (:func:`_store_stats`); the split kernels' segment load (:func:`_load_seg`), log-probabilities from
the split log-normalisers (:func:`_logp`, :func:`_split_logp`), workspace reads and merges (:func:`_slots`,
:func:`_merge`), gradient store with cross-entropy (:func:`_ce_store`) and spin-wait (:func:`_wait`); the split
launchers' arithmetic (:func:`ticket_magic`, :func:`split_defaults`).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

NEG = tl.constexpr(float("-inf"))
INT_MAX = tl.constexpr(2147483647)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e^x = 2^(x·log2 e)
LN2 = tl.constexpr(0.6931471805599453)  # log(2): log x = log2(x)·log 2
# compiled for a GPU (not the interpreter, which runs no libdevice): log on the MUFU (:func:`_log`); fixed at
# import, like the interpreter choice itself
MUFU_LOG = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))

# ---- workspace of the split-row distill kernels (distill_split, distill_akl): fp32 slots per unit -----------
# A unit is (row, segment); phase 0 writes the segment's statistics, later phases the partial sums; the
# readers merge the S segments of a row slot by slot. Integers are stored as their int32 bits.
WS_M_S = tl.constexpr(0)  # max of s (tempered student logits)
WS_D_S = tl.constexpr(1)  # Σ e^{s − max}
WS_A_R = tl.constexpr(2)  # Σ e^{s − max}(s − t): the rkl sum (0 when the divergence does not use it)
WS_M_T = tl.constexpr(3)  # max of t (tempered teacher logits)
WS_D_T = tl.constexpr(4)  # Σ e^{t − max}
WS_A_F = tl.constexpr(5)  # Σ e^{t − max}(t − s): the fkl sum
WS_M_U = tl.constexpr(6)  # distill_split, taid: max of the interpolated logits u
WS_D_U = tl.constexpr(7)  # distill_split, taid: Σ e^{u − max}
WS_A_U = tl.constexpr(8)  # distill_split, taid: Σ e^{u − max}(u − s)
WS_KMIN = tl.constexpr(6)  # distill_akl: the segment's smallest teacher key
WS_KMAX = tl.constexpr(7)  # distill_akl: its largest teacher key
WS_IMAX = tl.constexpr(8)  # distill_akl: first index of the teacher's max
WS_M_Z = tl.constexpr(9)  # max of the raw student logits (cross-entropy at T != 1)
WS_D_Z = tl.constexpr(10)  # Σ e^{z − max}
WS_ZL = tl.constexpr(11)  # the label's raw logit, in the segment that holds it (0 elsewhere)
WS_P0 = tl.constexpr(12)  # partial sums of a later phase: distill_split the segment's D, akl Σ_H |p − q|
WS_P1 = tl.constexpr(13)  # distill_split the segment's Σqg, akl Σ |p − q|
NSLOT = 16  # slots per unit (padded)
# with STATS (return_stats); the workspace stride is the kernels' constexpr WS, so launches without stats keep
# the NSLOT layout
WS_C_S = tl.constexpr(14)  # entropy sum Σ e^{s − max}(s − max)
WS_C_T = tl.constexpr(15)  # Σ e^{t − max}(t − max)
WS_RM_S = tl.constexpr(16)  # max of the raw student logits (the top-1 index is tracked on raw logits)
WS_RM_T = tl.constexpr(17)  # distill_split: max of the raw teacher logits
WS_RI_S = tl.constexpr(18)  # distill_split: first index of the student's raw max
WS_RI_T = tl.constexpr(19)  # distill_split: first index of the teacher's raw max
WS_AKL_RI_S = tl.constexpr(17)  # distill_akl: first index of the student's raw max (the teacher's is WS_IMAX)
NSLOT_STATS = 20
# distill_split's row summary (N, NRS) fp32: the merged log-normalisers, written by segment 0 of the mid phase (it
# merges them anyway) so that the final phase of a mixture reads 4 scalars instead of merging the S segments again
RS_M_S = tl.constexpr(0)  # max of s
RS_L2_S = tl.constexpr(1)  # log2 Σ e^{s − max}
RS_M_T = tl.constexpr(2)  # max of t
RS_L2_T = tl.constexpr(3)  # log2 Σ e^{t − max}
NRS = tl.constexpr(4)


@triton.jit
def _exp(x):
    """e^x as 2^(x·log2 e): one multiply and one MUFU.EX2 on sm_90 (``tl.exp`` is the same multiply and
    ex2.approx plus a denormal-range fix-up of ~3 instructions); there, results below 2^-126 flush to 0, an
    absolute error under 1.2e-38."""
    return tl.math.exp2(x * LOG2E)


@triton.jit
def _log2(x):
    """log2 x on the MUFU (``lg2.approx.ftz``, where ``tl.log`` is the libdevice polynomial, ~15 FMA-pipe
    instructions on sm_90). Its error: 2 ulp, and an absolute 2^-22 for x in [0.5, 2] (CUDA's ``__log2f``), below
    one ulp of a log-probability under −2; inputs below 2^-126 flush to −inf (the callers clamp or never pass them).
    In the interpreter: ``tl.log2``."""
    if MUFU_LOG:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _exp_row(x, ms):
    """2^{fma(x, log2 e, −c)} of a block against a finite shift ms, c = ms·log2 e rounded: one FFMA and one
    MUFU.EX2 per element, where ``_exp(x − ms)`` takes a subtraction, a multiply and the EX2. The FFMA rounds the
    exponent once, relative to its own size, as (x − ms)·log2 e does; it is e^{x − ms}·2^δ, δ = ms·log2 e − c
    (:func:`_shift_scale` is 2^{−δ}). −inf gives 0, NaN stays NaN. In the interpreter ``_exp(x − ms)`` (δ = 0):
    older releases' interpreters round an fma's product before the add, which at large |x| loses the exponent."""
    if MUFU_LOG:
        return tl.math.exp2(tl.fma(x, LOG2E, -(ms * LOG2E)))
    else:
        return _exp(x - ms)


@triton.jit
def _shift_scale(ms):
    """2^{−δ}, δ = ms·log2 e − round(ms·log2 e) (exact by an FMA): e^{x − ms} = :func:`_exp_row` (x, ms) · this."""
    if MUFU_LOG:
        return tl.math.exp2(-tl.fma(ms, LOG2E, -(ms * LOG2E)))
    else:
        return ms * 0.0 + 1.0


@triton.jit
def _exp_shift(x, ms):
    """e^{x − ms} of a block as (:func:`_exp_row`, :func:`_shift_scale`): the block's exponentials times a scalar,
    so that sums of the block are multiplied once."""
    return _exp_row(x, ms), _shift_scale(ms)


@triton.jit
def _lae(a, b):
    """log(e^a + e^b), −inf when both are −inf."""
    m = tl.maximum(a, b)
    ms = tl.where(m == float("-inf"), 0.0, m)
    return ms + tl.log(_exp(a - ms) + _exp(b - ms))


@triton.jit
def _online(m, d, a, x, y):
    """Fold block x into running (max m, Σe^{x−m} d, Σe^{x−m}(x−y) a), skipping terms with e^{x−m} = 0."""
    m_new = tl.maximum(m, tl.max(x, 0))
    ms = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = _exp(m - ms)
    e, f = _exp_shift(x, ms)
    d = d * scale + tl.sum(e, 0) * f
    a = a * scale + tl.sum(tl.where(e != 0, e * (x - y), 0.0), 0) * f
    return m_new, d, a


@triton.jit
def _lse_block(x):
    """(max, Σe^{x−max}) of one block (the statistics without the divergence sum, when it is not needed)."""
    m = tl.max(x, 0)
    ms = tl.where(m == float("-inf"), 0.0, m)
    e, f = _exp_shift(x, ms)
    return m, tl.sum(e, 0) * f


# ---- per-token statistics (fastkd.core.stats) ---------------------------------------------------------------
# Entropy partials of a block x (tempered logits, −inf allowed): m = max x, d = Σe^{x−m}, c = Σe^{x−m}(x−m), so
# that H(softmax(x)) = log d − c/d; blocks merge by rescaling with e^{m_j − m*}: c_j + d_j (m_j − m*). The top-1
# index is tracked on the *raw* logits (dividing by T can round distinct values into a tie) as (max, first index).


@triton.jit
def _ent_block(x, y):
    """Entropy partials of one block: (m, d, c, a) with a = Σe^{x−m}(x − y) (y = the other side: Σp(t−s) for kl).

    x, y: (BLOCK,) fp32, masked lanes −inf in both. Terms with e^{x−m} = 0 are skipped (0·(−inf) = 0)."""
    m = tl.max(x, 0)
    ms = tl.where(m == float("-inf"), 0.0, m)
    e, f = _exp_shift(x, ms)
    keep = e != 0
    return (m, tl.sum(e, 0) * f, tl.sum(tl.where(keep, e * (x - ms), 0.0), 0) * f,
            tl.sum(tl.where(keep, e * (x - y), 0.0), 0) * f)


@triton.jit
def _ent_online(m, d, c, x):
    """The running c of :func:`_online`'s (m, d) after folding in block x: pass the *old* (m, d) of the same
    ``_online`` call (its max / exp are then the same expressions, shared by the compiler); returns the new c."""
    m_new = tl.maximum(m, tl.max(x, 0))
    ms = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = _exp(m - ms)
    e, f = _exp_shift(x, ms)
    return scale * (c + tl.where(d != 0, d * (m - ms), 0.0)) + tl.sum(tl.where(e != 0, e * (x - ms), 0.0), 0) * f


@triton.jit
def _ent_merge(m, d, c, a):
    """Merge per-segment partials given as (SP,) vectors (absent segments: m = −inf, d = c = a = 0) → (m, d, c, a)."""
    mm = tl.max(m, 0)
    ms = tl.where(mm == float("-inf"), 0.0, mm)
    f = _exp(m - ms)
    c = tl.sum(f * (c + tl.where(d != 0, d * (m - ms), 0.0)), 0)
    return mm, tl.sum(f * d, 0), c, tl.sum(f * a, 0)


@triton.jit
def _argmax_block(x, cols):
    """(max, first column index of the max) of a raw-logit block; masked lanes −inf and after the valid ones.
    Also merges (SP,) vectors of per-segment (max, index) when ``cols`` holds the indices (segments in order)."""
    m = tl.max(x, 0)
    return m, tl.min(tl.where(x == m, cols, INT_MAX), 0).to(tl.int32)


@triton.jit
def _argmax_fold(m, i, bm, bi):
    """Running (max, first index) of earlier columns ⊕ a later block's: ties keep the earlier index."""
    return tl.maximum(m, bm), tl.where(bm > m, bi, i)


@triton.jit
def _store_stats(st_row_ptr, d_t, c_t, d_s, c_s, i_t, i_s, kl):
    """Write one row's [teacher_entropy, student_entropy, top1_agree, kl] (STATS_KEYS order) from merged
    partials: H = log d − c/d; top1_agree = (i_s == i_t)."""
    tl.store(st_row_ptr + 0, tl.log(d_t) - c_t / d_t)
    tl.store(st_row_ptr + 1, tl.log(d_s) - c_s / d_s)
    tl.store(st_row_ptr + 2, tl.where(i_s == i_t, 1.0, 0.0))
    tl.store(st_row_ptr + 3, kl)


# ---- split-row schedules: launch arithmetic (plain Python, shared by the launchers) ---------------------------


def ticket_magic(s_count: int) -> tuple[int, int]:
    """(M, k) with ⌊u·M / 2^k⌋ = ⌊u / S⌋ for every int32 ticket u (Granlund–Montgomery): k = 31 + ⌈log2 S⌉,
    M = ⌈2^k / S⌉ ≤ 2^32, so u·M < 2^63 and the error u·(M·S − 2^k) < 2^k keeps the floor exact. The kernels
    take the ticket's row as ``(u·M) >> k``: an integer division compiles to a called subroutine whose stack
    frame ptxas reports as spill bytes."""
    k = 31 + max(0, (s_count - 1).bit_length())
    return -(-(1 << k) // s_count), k


def split_defaults(cfg: tuple[int, int], alt: tuple[int, int] | None, heavy: bool, itemsize: int) -> tuple[int, int]:
    """Default (BLOCK_V, num_warps) of a split-row launch from its plain 2-byte configuration ``cfg``: a
    ``heavy`` launch (STATS or CE_RAW: ~1.5× the registers, which would leave one program per SM) takes ``alt``,
    or half of a block above 4096; 4-byte logits start from ``alt`` where there is one and take half of a block
    above 2048 (a segment then holds the bytes of the 2-byte one, so the L2 window holds for either)."""
    bv, nw = cfg
    if heavy:
        bv, nw = alt or ((bv // 2 if bv > 4096 else bv), nw)
    elif itemsize >= 4 and alt:
        bv, nw = alt
    if itemsize >= 4 and bv > 2048:
        bv //= 2
    return bv, nw


# ---- split-row schedules: segments, workspace, gradient store, waits -----------------------------------------


@triton.jit
def _unpack(x):
    """A loaded block as fp32. bf16 compiled for a GPU: one integer instruction per value, two values per 32-bit
    word (``shl`` 16 for the low half, ``and`` 0xffff0000 for the high one: a bf16 is the top half of its fp32),
    where the conversion unpacks each half into its own register first (PRMT + shift: two per value). Exact,
    NaN payloads and −0 included. In the interpreter (which runs no inline assembly): ``.to(tl.float32)``."""
    if MUFU_LOG and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def _load_seg(base, col_stride, start, offs, V, FULL_OK, other):
    """One segment of a row as fp32 (:func:`_unpack`): unmasked when it is a full block (vector loads), masked for
    the tail."""
    cols = start + offs
    if FULL_OK:
        x = _unpack(tl.load(base + cols * col_stride))
    else:
        x = _unpack(tl.load(base + cols * col_stride, mask=cols < V, other=other))
    return x


@triton.jit
def _logp(x, m, l2d, inv_t, SCALED: tl.constexpr):
    """Base-2 log-probabilities of one block of raw logits x from the split log-normaliser of the tempered logits,
    max m and l2d = log2 Σe^{x/T − m}: ``(x/T − m)·log2 e − l2d``, the exact difference first, then one FFMA (the
    natural ``(x/T − m) − ld`` takes two roundings and a multiply more before its exp2). p = 2^(result); a natural
    log-probability is the result × log 2, which the callers fold into their scalar coefficients."""
    if SCALED:
        return tl.fma(x * inv_t - m, LOG2E, -l2d)
    else:
        return tl.fma(x - m, LOG2E, -l2d)


@triton.jit
def _logp_shift(m, l2d):
    """δ of :func:`_logp_row`: c − (m·log2 e + l2d) for c = m·log2 e + l2d as fp32 computes it (|δ| ≤ half an ulp
    of c, ~5e-4 at |m| ~ 1e4). On a GPU the FMA gives m·log2 e − c exactly before one rounding at the size of
    l2d; in the interpreter (Triton 3.6's rounds an fma's product) the differences of a rounded product, exact
    by Sterbenz's lemma (the interpreter's y then subtracts δ from :func:`_logp`)."""
    if MUFU_LOG:
        c = m * LOG2E + l2d
        d = -(tl.fma(m, LOG2E, -c) + l2d)
    else:
        hi = m * LOG2E
        d = ((hi + l2d) - hi) - l2d
    return d


@triton.jit
def _logp_row(x, m, l2d, inv_t, SCALED: tl.constexpr):
    """(y, δ): the base-2 log-probabilities of :func:`_logp` as y + δ, δ = :func:`_logp_shift` a row scalar. On a
    GPU y = fma(x/T, log2 e, −c), c = m·log2 e + l2d rounded: one FFMA per element where :func:`_logp` takes the
    subtraction x/T − m first; its rounding is relative to y (the product is exact inside the FMA), and c's is δ,
    which the callers fold into their row scalars (2^y = 2^{−δ}·p). In the interpreter y = :func:`_logp` − δ (the
    same folds then run on CPU)."""
    d = _logp_shift(m, l2d)
    if MUFU_LOG:
        xs = x
        if SCALED:
            xs = x * inv_t
        y = tl.fma(xs, LOG2E, -(m * LOG2E + l2d))
    else:
        y = _logp(x, m, l2d, inv_t, SCALED) - d
    return y, d


@triton.jit
def _prob_scale(m, l2d):
    """(ms, k) with softmax = :func:`_exp_row` (x, ms) · k for a block of tempered logits x of a row with max m
    and l2d = log2 Σe^{x − m}: the normaliser folded into the scalar k. The probabilities of a block then cost
    one FFMA and one EX2 per element (k multiplies later, often into a row scalar), where :func:`_logp` takes a
    subtraction more."""
    ms = tl.where(m == float("-inf"), 0.0, m)
    return ms, _shift_scale(ms) * tl.math.exp2(-l2d)


@triton.jit
def _split_logp(xs, xt, m_s, l2_s, m_t, l2_t, inv_t, SCALED: tl.constexpr):
    """(log2 q, log2 p) of one block of raw student / teacher logits xs, xt (:func:`_logp` of each side)."""
    return _logp(xs, m_s, l2_s, inv_t, SCALED), _logp(xt, m_t, l2_t, inv_t, SCALED)


@triton.jit
def _slots(ws_row, k, segs, sm, WS: tl.constexpr, other):
    """Slot k of every segment of a row, (SP,) fp32 (``other`` for the padding segments)."""
    return tl.load(ws_row + segs * WS + k, mask=sm, other=other, cache_modifier=".cg")


@triton.jit
def _merge(ws_row, k_m, k_d, k_a, segs, sm, WS: tl.constexpr):
    """Merge the per-segment (max, Σe^{x−max}, Σe^{x−max}(x−y)) of slots k_m, k_d, k_a → (max, log2 D, A/D)
    (log2 D: what :func:`_logp` takes; the natural log D is it × log 2).

    The log-normaliser stays split as max + log D: a logit minus the max is exact in fp32, their sum is not at
    large |logits| (``x − lse`` would lose the low bits of a constant offset)."""
    m = _slots(ws_row, k_m, segs, sm, WS, float("-inf"))
    d = _slots(ws_row, k_d, segs, sm, WS, 0.0)
    a = _slots(ws_row, k_a, segs, sm, WS, 0.0)
    mm = tl.max(m, 0)
    ms = tl.where(mm == float("-inf"), 0.0, mm)
    sc = _exp(m - ms)
    dd = tl.sum(d * sc, 0)
    aa = tl.sum(a * sc, 0)
    return mm, _log2(dd), aa / dd


@triton.jit
def _ce_store(g, xs, q, m_z, l2_z, label, ce_cw, g_base, cols, g_col, V, full, HAS_LABELS: tl.constexpr,
              CE_RAW: tl.constexpr):
    """Store one block of the gradient (split-row kernels): add the cross-entropy term ce_cw·(softmax(z) −
    onehot(label)) — softmax of the raw logits xs (log-normaliser kept split as max m_z and l2_z = log2 of the
    sum, :func:`_logp`: nothing is lost to a large logit offset) when CE_RAW, else the tempered q — cast to the
    output dtype, unmasked for a full block, masked (cols < V) for the tail block."""
    if HAS_LABELS:
        if CE_RAW:
            sm_z = tl.math.exp2(_logp(xs, m_z, l2_z, 1.0, False))
        else:
            sm_z = q
        g += ce_cw * (sm_z - tl.where(cols == label, 1.0, 0.0))
    g = g.to(g_base.dtype.element_ty)
    if full:
        tl.store(g_base + cols * g_col, g)
    else:
        tl.store(g_base + cols * g_col, g, mask=cols < V)


@triton.jit
def _wait(cnt, target):
    """Spin until ``*cnt >= target`` (acquire): the published workspace entries are then visible."""
    c = tl.atomic_add(cnt, 0, sem="acquire")
    while c < target:
        c = tl.atomic_add(cnt, 0, sem="acquire")
