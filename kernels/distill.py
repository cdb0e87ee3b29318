"""Triton kernels for the divergence losses on logits (one kernel for every divergence of the table).

Notation (one row, after temperature): s = z_s / T (student), t = z_t / T (teacher), log q = s − lse_s,
log p = t − lse_t. Every divergence D gives the vector qg = q·∂D/∂q; the gradient with respect to the raw
student logits is then ``w · (kd_scale/T · (qg − q·Σqg) + ce_weight · (softmax(z_s) − onehot(label)))``
(the softmax chain rule), exactly the mechanism of ``fastkd/distill/torch_impl.py``. Terms
``x·(log x − log y)`` are 0 where x == 0, so ``-inf`` logits are legal; the guard is ``x != 0`` (not
``x > 0``) so that a NaN probability (NaN or +inf logit on either side) makes the loss NaN.

``_distill_kernel`` — grid ``(N,)``: one program owns one row and loops over vocabulary blocks:

1. statistics pass (reads s and t): online max / sum-exp of s, t (and of the raw z_s for the
   cross-entropy when T != 1), in fp32; the fkl / rkl losses are accumulated online in the same pass
   (``Σ e^{x−m}(x − y)`` rescaled like the sum-exp), so fkl, rkl and symkl need no further reduction;
2. reduction passes, by divergence: jsd / skl / srkl / tvd / ab need Σqg (and their loss) once the lse's
   are known (one pass over s and t); taid the max / sum-exp of its interpolated logits, formed from the
   max-subtracted s and t (:func:`_taid_logits`; one pass); akl needs its head set H (below), then
   Σ_H |p−q| and Σ_¬H |p−q|;
3. final pass (only with a gradient buffer): reads s and t block by block and writes the gradient once,
   in the buffer's dtype. Each block is read before it is written, so the buffer may alias the student.

AKL head set without sorting: H = {i : Σ_{j: p_j ≥ p_i} p_j ≤ mu} ∪ {argmax p}. The threshold is found by
a bisection on the bit pattern of p (an int32 that orders like the float for p ≥ 0): each pass tests
``AKL_NT`` thresholds at once (mass and count of {p ≥ θ}) and keeps the bracket (lo, hi] with
mass(lo) > mu ≥ mass(hi); it stops when no p lies in [lo, hi) or hi = lo + 1 (exact), at most ~8 passes
over the teacher row, usually 3–5. Tie behaviour: tokens with equal p are in or out of the head together
(the reference's stable sort may split a tied group at the boundary); of tied maxima only the first
index is forced into the head, as in the reference.

Rows with weight == 0 write loss 0 and a zero gradient row without reading the logits. With labels, a
label outside [0, V) is never dereferenced: that row's loss is NaN.

Divergence codes are the table's (``fastkd.core.divergences.CODES``) as ``tl.constexpr`` globals; the
hyperparameters arrive as ``h_<name>`` arguments in ``HYPER_NAMES`` order and the kernel derives what it
needs from them (log mixture weights, ...). The endpoint rules of the table are applied by the launcher
(``DistillParams.code``), so e.g. jsd never sees β ∈ {0, 1}.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.core.divergences import CODES, MIXTURE_CODES
from fastkd.kernels._blocks import (
    LN2,
    LOG2E,
    _argmax_block,
    _argmax_fold,
    _ent_online,
    _exp,
    _log2,
    _online,
    _split_logp,
    _store_stats,
)

# Divergence codes of the table, as compile-time constants of the DIV switch.
FKL = tl.constexpr(CODES["fkl"])
RKL = tl.constexpr(CODES["rkl"])
JSD = tl.constexpr(CODES["jsd"])
SYMKL = tl.constexpr(CODES["symkl"])
SKL = tl.constexpr(CODES["skl"])
SRKL = tl.constexpr(CODES["srkl"])
TVD = tl.constexpr(CODES["tvd"])
AKL = tl.constexpr(CODES["akl"])
TAID = tl.constexpr(CODES["taid"])
AB = tl.constexpr(CODES["ab"])
ZERO = tl.constexpr(CODES["zero"])  # skl / srkl at α = 1: D ≡ 0

DEFAULT_BLOCK_V = 4096
DEFAULT_NUM_WARPS = 8
AKL_NT = 16  # thresholds tested per bisection pass
AKL_BLOCK = 1024  # vocabulary block of the bisection passes (an AKL_NT × AKL_BLOCK tile: 4 contiguous teacher
# elements per thread per iteration at 8 warps, one 8-byte vector load for bf16, instead of 1 scalar load)
P_BITS_HI = tl.constexpr(0x3F800010)  # akl bracket top, just above the bits of 1.0 (csrc/distill.cu: same)


# The table's mixtures: the divergences whose gradient needs Σqg (a reduction over the row before the
# gradient); their D and qg terms come from _mix_terms. MIX_SET has bit c set for each mixture code c, so that
# ``(MIX_SET >> DIV) & 1`` is the compile-time test inside a kernel.
MIX_CODES = MIXTURE_CODES
MIX_SET = tl.constexpr(sum(1 << c for c in MIX_CODES))


@triton.jit
def _constants(h_beta, h_alpha, h_t, DIV: tl.constexpr):
    """Per-divergence constants from the hyperparameters: (c1, c2, w_a, w_b), w_a, w_b the mixture weights."""
    c1 = h_beta * 0.0
    c2 = c1
    w_a = c1
    w_b = c1
    if (DIV == JSD) | (DIV == SYMKL):
        c1 = h_beta
        w_a = h_beta
        w_b = 1.0 - h_beta
    elif DIV == SKL:  # m = αp + (1−α)q
        c1 = h_alpha
        w_a = h_alpha
        w_b = 1.0 - h_alpha
    elif DIV == SRKL:  # m = (1−α)p + αq
        c1 = h_alpha
        w_a = 1.0 - h_alpha
        w_b = h_alpha
    elif DIV == TAID:
        c1 = h_t
    elif DIV == AB:
        c1 = h_alpha
        c2 = h_beta
    return c1, c2, w_a, w_b


@triton.jit
def _taid_logits(s, t, m_s, m_t, c1):
    """taid's interpolated logits u = (1−τ)(s − m_s) + τ(t − m_t), τ = c1, from the row maxima m_s, m_t: the
    softmax of (1−τ)s + τt (shifted by a constant), but the products act on exact differences, not on logits
    rounded at the magnitude of a large constant offset. u = s − m_s at τ = 0, t − m_t at τ = 1."""
    ds = s - m_s
    dt = t - m_t
    return tl.where(c1 == 0.0, ds, tl.where(c1 == 1.0, dt, (1.0 - c1) * ds + c1 * dt))


@triton.jit
def _row_value(fkl, rkl, taid, lse_s, lse_t, c1, zero, DIV: tl.constexpr):
    """(D, S = Σqg, w_f, w_r) of the divergences whose value follows from the row statistics alone (fkl, rkl,
    symkl, taid, zero; zeros for the others): fkl / rkl / taid are the row's merged sums, w_f / w_r the fkl /
    rkl weights of symkl's qg = −w_f·p + w_r·q(log q − log p). Shared by the two-pass and split kernels."""
    dval = zero
    ssum = zero
    w_f = zero
    w_r = zero
    if DIV == FKL:
        dval = fkl
        ssum = zero - 1.0
    elif DIV == RKL:
        dval = rkl
        ssum = rkl
    elif DIV == SYMKL:
        w_f = zero + c1
        w_r = zero + (1.0 - c1)
        dval = w_f * fkl + w_r * rkl
        ssum = -w_f + w_r * rkl
    elif DIV == TAID:
        dval = taid
        ssum = zero - 1.0
    elif DIV == ZERO:
        dval = tl.where((lse_s == lse_s) & (lse_t == lse_t), 0.0, float("nan"))
    return dval, ssum, w_f, w_r


@triton.jit
def _pow_diff(e_base, e_other, diff, c):
    """(e^other − e^base) / c from e_base = e^base, e_other = e^other, other = base + c·diff, without cancellation as
    c·diff → 0: for |c·diff| < 1/2, e^base · expm1(c·diff) / c with Kahan's expm1 (w = e^u: (w − 1)·u / log w, u
    when w == 1); else the direct difference (its terms then differ by a factor ≥ e^{1/2}; 0 for −inf logits, where
    diff is ±inf or NaN)."""
    u = c * diff
    small = tl.abs(u) < 0.5  # False for NaN and ±inf
    us = tl.where(small, u, 0.0)
    w = tl.exp(us)
    em = tl.where(w == 1.0, us, tl.fdiv((w - 1.0) * us, tl.log(w)))  # 2-ulp division: no slow-path call
    return tl.where(small, e_base * em, e_other - e_base) * (1.0 / c)  # one scalar reciprocal, no per-element div


TVD_H = tl.constexpr(2.0**64)  # _tvd_terms' scale of the difference
TVD_H_INV = tl.constexpr(2.0**-64)


@triton.jit
def _tvd_terms(eq, ep, r_h):
    """tvd's per-element terms from exponentials eq, ep ≥ 0 with q = eq·cq and p = ep·cp for row scalars cq, cp
    (:func:`fastkd.kernels._blocks._prob_scale`), r_h = TVD_H·cp/cq (eq = q, ep = p and r_h = TVD_H for q, p
    themselves): (|h|, eq·sign(q − p)) with h = TVD_H·eq − r_h·ep = TVD_H·(q − p)/cq, so Σ|q − p| = Σ|h|·cq/TVD_H.
    Equal sides give h = 0 exactly (r_h is then the power of two TVD_H: no rounding in either product). The sign
    is taken without a compare: h clamped to [−eq, eq] is ±eq wherever q ≠ p (a difference of at least 2^-24 of
    the larger side, scaled by 2^64; r_h·ep ≤ 2^95, no overflow) and 0 at a tie, torch.sign's convention."""
    h = eq * TVD_H - ep * r_h
    return tl.abs(h), tl.minimum(tl.maximum(h, -eq), eq)


# the smallest normal fp32: a mixture m is clamped to it where both sides underflow (the MUFU's exponentials flush
# below it), so that log m stays finite; a log-probability is clamped to LP2_FLOOR (below every log2 of a nonzero
# exponential, 2^-149 the smallest denormal), so that q·(log q − log m) is 0, not 0·(−inf), where q == 0
TINY = tl.constexpr(1.1754943508222875e-38)
LP2_FLOOR = tl.constexpr(-160.0)


@triton.jit
def _mix_terms(lp2, lq2, p, q, c1, c2, w_a, w_b, DIV: tl.constexpr):
    """Elementwise terms (u, v) of the divergences that need a reduction pass (jsd, skl, srkl, tvd, ab), from the
    base-2 log-probabilities lp2, lq2 (:func:`fastkd.kernels._blocks._logp`) and p = 2^lp2, q = 2^lq2. D and qg
    are combinations with the scalar coefficients of :func:`_mix_coefs`: D = Σ (a_u·u + a_v·v), qg = b_u·u + b_v·v,
    so that a pass over the row accumulates Σu and Σv and no coefficient is multiplied per element (log 2, the
    mixture weights and tvd's 1/2 all live in the coefficients).

    m = w_a·p + w_b·q (jsd: β, 1−β; skl: α, 1−α; srkl: 1−α, α), formed from p and q: one log per element and no
    exponential of its own. jsd: u = q·(log2 q − log2 m), v = p·(log2 p − log2 m), the log-probabilities clamped
    at LP2_FLOOR (one max instead of a compare and a select: where q == 0 the term is then 0·finite; a NaN input
    still gives a NaN q or m). skl, srkl: their KL term and the gradient's extra term. ab: c1 = α, c2 = β and the
    powers are taken in the log domain (p^α q^β = e^{α log p + β log q}); u = D's term, v = qg. tvd: u = |q − p|,
    v = q·sign(q − p) (torch.sign: 0 at a tie).
    """
    if DIV == TVD:
        u, v = _tvd_terms(q, p, TVD_H)
        u = u * TVD_H_INV
    elif DIV == AB:  # −1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)); qg = (q^(α+β) − p^α q^β)/α
        # as −1/(α+β) Σ ((p^α q^β − p^(α+β))/β + (p^α q^β − q^(α+β))/α): no cancellation as α or β → 0
        lp = lp2 * LN2
        lq = lq2 * LN2
        s_ab = c1 + c2
        # tl.exp, not _exp, in ab's terms and _pow_diff: with the shorter exponentials ptxas schedules the ab
        # launches into register spills on sm_90 (Triton 3.6)
        e_pq = tl.exp(c1 * lp + c2 * lq)
        t_q = _pow_diff(tl.exp(s_ab * lq), e_pq, lp - lq, c1)  # (p^α q^β − q^(α+β)) / α
        u = -(_pow_diff(tl.exp(s_ab * lp), e_pq, lq - lp, c2) + t_q) * (1.0 / s_ab)
        v = -t_q
    else:
        lm2 = _mix_log2(p, q, w_a, w_b)
        if DIV == JSD:  # β KL(p‖m) + (1−β) KL(q‖m)
            u = q * (tl.maximum(lq2, LP2_FLOOR) - lm2)
            v = p * (tl.maximum(lp2, LP2_FLOOR) - lm2)
        elif DIV == SKL:  # KL(p ‖ αp + (1−α)q); qg = −(1−α)·pq/m
            u = tl.where(p != 0, p * (lp2 - lm2), 0.0)
            v = tl.where(p != 0, tl.math.exp2(lp2 + lq2 - lm2), 0.0)
        else:  # srkl: KL(q ‖ (1−α)p + αq); qg = its term − α·q²/m
            u = tl.where(q != 0, q * (lq2 - lm2), 0.0)
            v = tl.where(q != 0, tl.math.exp2(2.0 * lq2 - lm2), 0.0)
    return u, v


@triton.jit
def _mix_log2(p, q, w_a, w_b):
    """log2 m of the mixture m = w_a·p + w_b·q, m clamped at TINY (a NaN m stays NaN)."""
    mix = w_a * p + w_b * q
    return _log2(tl.where(mix < TINY, TINY, mix))


@triton.jit
def _mix_coefs(c1, DIV: tl.constexpr):
    """(a_u, a_v, b_u, b_v): D = Σ (a_u·u + a_v·v) and qg = b_u·u + b_v·v for :func:`_mix_terms`' (u, v), qg in the
    units of the gradient's coefficient (× :func:`_mix_unit` is the true qg: tvd's terms are twice its)."""
    z = c1 * 0.0
    if DIV == JSD:
        a_u = (1.0 - c1) * LN2
        a_v = c1 * LN2
        b_u = a_u
        b_v = z
    elif DIV == SKL:
        a_u = z + LN2
        a_v = z
        b_u = z
        b_v = c1 - 1.0
    elif DIV == SRKL:
        a_u = z + LN2
        a_v = z
        b_u = z + LN2
        b_v = -c1
    elif DIV == TVD:
        a_u = z + 0.5
        a_v = z
        b_u = z
        b_v = z + 1.0
    else:  # ab
        a_u = z + 1.0
        a_v = z
        b_u = z
        b_v = z + 1.0
    return a_u, a_v, b_u, b_v


@triton.jit
def _mix_unit(DIV: tl.constexpr):
    """The factor of a mixture's qg in :func:`_mix_coefs`' units (the gradient's coefficient takes it): 1/2 for
    tvd, else 1."""
    if DIV == TVD:
        return 0.5
    else:
        return 1.0


@triton.jit
def _mix_grad(lp2, lq2, q, ssum, cw, c1, c2, w_a, w_b, DIV: tl.constexpr):
    """A mixture's gradient block (qg − q·Σqg)·cw (Σqg = ssum in :func:`_mix_coefs`' units, cw with
    :func:`_mix_unit`), from the base-2 log-probabilities and q = 2^lq2. jsd as q·(k·(log2 q − log2 m) − ssum·cw),
    k = b_u·cw: three operations per element after log m (its qg is q times a log difference)."""
    if DIV == JSD:
        _a_u, _a_v, b_u, _b_v = _mix_coefs(c1, DIV)
        lm2 = _mix_log2(tl.math.exp2(lp2), q, w_a, w_b)
        g = q * ((b_u * cw) * (tl.maximum(lq2, LP2_FLOOR) - lm2) - ssum * cw)
    else:
        u, v = _mix_terms(lp2, lq2, tl.math.exp2(lp2), q, c1, c2, w_a, w_b, DIV)
        _a_u, _a_v, b_u, b_v = _mix_coefs(c1, DIV)
        if DIV == SRKL:
            qg = b_u * u + b_v * v
        elif DIV == SKL:  # b_u = 0: u is then not computed (its registers spilled skl's fp16 launches)
            qg = b_v * v
        else:  # tvd, ab: qg = v (b_u = 0, b_v = 1)
            qg = v
        g = (qg - q * ssum) * cw
    return g


@triton.jit
def _grad_qg(lp2, lq2, q, s, t, m_s, m_t, m_u, ld_u, w_f, w_r, c1, DIV: tl.constexpr, BLOCK_V: tl.constexpr):
    """qg = q·∂D/∂q of one block of the gradient pass, the divergences that are not mixtures (both schedules; a
    mixture's gradient is :func:`_mix_grad`'s).

    lp2, lq2: base-2 log-probabilities of teacher and student (:func:`fastkd.kernels._blocks._logp`), q = 2^lq2;
    s, t: the tempered logits and m_s, m_t their row
    maxima, m_u, ld_u taid's log-normaliser (:func:`_taid_logits`); w_f, w_r: the fkl / rkl weights of symkl and
    akl (:func:`_row_value`); c1: :func:`_constants`' (taid's τ)."""
    if DIV == FKL:
        qg = -tl.math.exp2(lp2)
    elif DIV == RKL:
        qg = LN2 * tl.where(q != 0, q * (lq2 - lp2), 0.0)
    elif (DIV == SYMKL) | (DIV == AKL):
        qg = -w_f * tl.math.exp2(lp2) + (w_r * LN2) * tl.where(q != 0, q * (lq2 - lp2), 0.0)
    elif DIV == TAID:
        qg = -tl.exp((_taid_logits(s, t, m_s, m_t, c1) - m_u) - ld_u)  # tl.exp: _exp spills (fp32, CE, T != 1)
    else:  # zero (a mixture's gradient is _mix_grad's)
        qg = tl.zeros([BLOCK_V], tl.float32)
    return qg


@triton.jit
def _distill_kernel(
    s_ptr,  # (N, V) student logits, any float dtype, strides (s_row, s_col)
    t_ptr,  # (N, V) teacher logits, same dtype, strides (t_row, t_col)
    g_ptr,  # (N, V) gradient output (may alias s_ptr), strides (g_row, g_col); unused without HAS_GRAD
    lab_ptr,  # (N,) int64 labels; unused without HAS_LABELS
    w_ptr,  # (N,) fp32 per-token weight (0 = excluded)
    loss_ptr,  # (N,) fp32 per-token loss output
    V,
    s_row, s_col, t_row, t_col, g_row, g_col,
    inv_t,  # 1 / temperature
    kd_scale,  # T² or 1 (loss factor of the divergence)
    kd_coef,  # kd_scale / T (gradient factor of the divergence)
    ce_w,  # cross-entropy weight
    h_beta, h_alpha, h_mu, h_t,  # hyperparameters, fastkd.core.divergences.HYPER_NAMES order
    st_ptr,  # (N, 4) fp32 statistics output, row stride st_row, unit column stride; unused without STATS
    st_row,
    DIV: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE_RAW: tl.constexpr,  # cross-entropy needs the un-tempered lse (T != 1)
    BLOCK_V: tl.constexpr,
    BLOCK_A: tl.constexpr,
    NT: tl.constexpr,
    STATS: tl.constexpr,  # also write the row's statistics (fastkd.core.stats) from pass 1's quantities
):
    row = tl.program_id(0).to(tl.int64)
    s_base = s_ptr + row * s_row
    t_base = t_ptr + row * t_row
    g_base = g_ptr + row * g_row
    offs = tl.arange(0, BLOCK_V)
    w = tl.load(w_ptr + row)
    NEG: tl.constexpr = float("-inf")
    # per-divergence constants from the hyperparameters: c1 (c2) and the mixture weights w_a, w_b
    c1, c2, w_a, w_b = _constants(h_beta, h_alpha, h_t, DIV)
    mu = h_mu

    if w == 0.0:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_base + cols * g_col, tl.zeros([BLOCK_V], tl.float32).to(g_ptr.dtype.element_ty),
                         mask=cols < V)
    else:
        # ---- pass 1: row statistics (+ online fkl / rkl sums) -------------------------------------------
        zero = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
        m_s = zero + NEG
        d_s = zero
        a_r = zero  # Σ e^{s−m_s}(s − t)
        m_t = zero + NEG
        d_t = zero
        a_f = zero  # Σ e^{t−m_t}(t − s)
        m_u = zero + NEG
        d_u = zero
        a_u = zero  # Σ e^{u−m_u}(u − (s − m_s)), u = _taid_logits
        m_z = zero + NEG
        d_z = zero
        amax = zero.to(tl.int32)  # first index of the teacher's max (akl)
        c_s = zero  # STATS: entropy sums Σe^{x−m}(x−m) of s and t, first argmax of the raw logits
        c_t = zero
        rm_s = zero + NEG
        rm_t = zero + NEG
        ri_s = zero.to(tl.int32)
        ri_t = zero.to(tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            cm = cols < V
            xs = tl.load(s_base + cols * s_col, mask=cm, other=NEG).to(tl.float32)
            xt = tl.load(t_base + cols * t_col, mask=cm, other=NEG).to(tl.float32)
            s = xs * inv_t
            t = xt * inv_t
            if DIV == AKL:
                bm = tl.max(t, 0)
                bi = tl.min(tl.where((t == bm) & cm, cols, V), 0)
                amax = tl.where(bm > m_t, bi, amax)
            if STATS:
                c_s = _ent_online(m_s, d_s, c_s, s)
                c_t = _ent_online(m_t, d_t, c_t, t)
                bm_s, bi_s = _argmax_block(xs, cols)
                rm_s, ri_s = _argmax_fold(rm_s, ri_s, bm_s, bi_s)
                bm_t, bi_t = _argmax_block(xt, cols)
                rm_t, ri_t = _argmax_fold(rm_t, ri_t, bm_t, bi_t)
            m_s, d_s, a_r = _online(m_s, d_s, a_r, s, t)
            m_t, d_t, a_f = _online(m_t, d_t, a_f, t, s)
            if CE_RAW:
                m_z, d_z, a_z = _online(m_z, d_z, zero, xs, xs)
        # log-normalisers kept split as max + log(sum): x − max is exact, x − (max + log sum) is not at large |x|
        ld_s = tl.log(d_s)
        ld_t = tl.log(d_t)
        l2_s = ld_s * LOG2E  # base 2, for _logp
        l2_t = ld_t * LOG2E
        lse_s = m_s + ld_s
        lse_t = m_t + ld_t
        fkl = a_f / d_t + (m_s - m_t) + (ld_s - ld_t)  # = a_f/d_t − lse_t + lse_s
        rkl = a_r / d_s + (m_t - m_s) + (ld_t - ld_s)

        # ---- divergence value D and S = Σqg ------------------------------------------------------------
        taid = zero
        ld_u = zero
        if DIV == TAID:  # u needs the row maxima: one more pass. taid = Σ r (log r − log q), log r = u − m_u − ld_u
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                cm = cols < V
                s = tl.load(s_base + cols * s_col, mask=cm, other=NEG).to(tl.float32) * inv_t
                t = tl.load(t_base + cols * t_col, mask=cm, other=NEG).to(tl.float32) * inv_t
                m_u, d_u, a_u = _online(m_u, d_u, a_u, _taid_logits(s, t, m_s, m_t, c1), s - m_s)
            ld_u = tl.log(d_u)
            taid = a_u / d_u - m_u + (ld_s - ld_u)
        dval, ssum, w_f, w_r = _row_value(fkl, rkl, taid, lse_s, lse_t, c1, zero, DIV)
        if DIV == AKL:
            # bisection for the head threshold on the bits of p (see the module docstring)
            offs_a = tl.arange(0, BLOCK_A)
            kk = tl.arange(0, NT) + 1
            lo = zero.to(tl.int32) - 1
            hi = zero.to(tl.int32) + P_BITS_HI
            n_lo = zero.to(tl.int32) + V
            n_hi = zero.to(tl.int32)
            while (hi - lo > 1) & (n_lo > n_hi):
                step = (hi - lo + NT) // (NT + 1)
                th = tl.minimum(lo + step * kk, hi - 1)
                c_acc = tl.zeros([NT], tl.float32)
                n_acc = tl.zeros([NT], tl.int32)
                for start in range(0, V, BLOCK_A):
                    cols = start + offs_a
                    cm = cols < V
                    xt = tl.load(t_base + cols * t_col, mask=cm, other=NEG).to(tl.float32)
                    p = _exp((xt * inv_t - m_t) - ld_t)
                    pb = p.to(tl.int32, bitcast=True)
                    ge = (pb[None, :] >= th[:, None]) & cm[None, :]
                    c_acc += tl.sum(tl.where(ge, p[None, :], 0.0), 1)
                    n_acc += tl.sum(ge.to(tl.int32), 1)
                fail = c_acc > mu
                lo_new = tl.max(tl.where(fail, th, lo), 0)
                n_lo = tl.min(tl.where(fail, n_acc, n_lo), 0)
                hi_new = tl.min(tl.where(fail, hi, th), 0)
                n_hi = tl.max(tl.where(fail, n_hi, n_acc), 0)
                lo = lo_new
                hi = hi_new
            g_h = zero
            g_all = zero
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                cm = cols < V
                xs = tl.load(s_base + cols * s_col, mask=cm, other=NEG).to(tl.float32)
                xt = tl.load(t_base + cols * t_col, mask=cm, other=NEG).to(tl.float32)
                p = _exp((xt * inv_t - m_t) - ld_t)
                q = _exp((xs * inv_t - m_s) - ld_s)
                err = tl.where(cm, tl.abs(p - q), 0.0)
                head = (p.to(tl.int32, bitcast=True) >= hi) | (cols == amax)
                g_h += tl.sum(tl.where(head, err, 0.0), 0)
                g_all += tl.sum(err, 0)
            g_t = g_all - g_h
            den = g_h + g_t
            safe = tl.where(den > 0, den, 1.0)
            w_f = tl.where(den > 0, g_h / safe, 0.0)
            w_r = tl.where(den > 0, g_t / safe, 0.0)
            dval = w_f * fkl + w_r * rkl
            ssum = -w_f + w_r * rkl
        elif (MIX_SET >> DIV) & 1:  # a mixture: one pass for D and Σqg
            dval = zero
            ssum = zero
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                cm = cols < V
                xs = tl.load(s_base + cols * s_col, mask=cm, other=NEG).to(tl.float32)
                xt = tl.load(t_base + cols * t_col, mask=cm, other=NEG).to(tl.float32)
                lq2, lp2 = _split_logp(xs, xt, m_s, l2_s, m_t, l2_t, inv_t, True)
                u, v = _mix_terms(lp2, lq2, tl.math.exp2(lp2), tl.math.exp2(lq2), c1, c2, w_a, w_b, DIV)
                # padding columns (−inf on both sides) must add nothing: ab's e^{α·(−inf) + β·(−inf)} is NaN
                # when α, β have opposite signs
                dval += tl.sum(tl.where(cm, u, 0.0), 0)  # Σu, Σv: the coefficients once per row
                ssum += tl.sum(tl.where(cm, v, 0.0), 0)
            a_u, a_v, b_u, b_v = _mix_coefs(c1, DIV)
            dval, ssum = a_u * dval + a_v * ssum, b_u * dval + b_v * ssum  # ssum in _mix_coefs' units

        loss = kd_scale * dval
        label = 0
        if HAS_LABELS:
            label = tl.load(lab_ptr + row)
            ok = (label >= 0) & (label < V)  # never read outside the row: a bad label gives a NaN loss
            zl = tl.load(s_base + tl.where(ok, label, 0) * s_col, mask=ok, other=float("nan")).to(tl.float32)
            if CE_RAW:
                ld_z = tl.log(d_z)
            else:
                m_z = m_s
                ld_z = ld_s
            loss += ce_w * ((m_z - zl) + ld_z)
        tl.store(loss_ptr + row, loss)
        if STATS:
            _store_stats(st_ptr + row * st_row, d_t, c_t, d_s, c_s, ri_t, ri_s, fkl)

        # ---- final pass: the gradient, written once ----------------------------------------------------
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                cm = cols < V
                xs = tl.load(s_base + cols * s_col, mask=cm, other=NEG).to(tl.float32)
                xt = tl.load(t_base + cols * t_col, mask=cm, other=NEG).to(tl.float32)
                s = xs * inv_t
                t = xt * inv_t
                lq2, lp2 = _split_logp(xs, xt, m_s, l2_s, m_t, l2_t, inv_t, True)
                q = tl.math.exp2(lq2)
                if (MIX_SET >> DIV) & 1:
                    g = _mix_grad(lp2, lq2, q, ssum, kd_coef * _mix_unit(DIV), c1, c2, w_a, w_b, DIV)
                else:
                    qg = _grad_qg(lp2, lq2, q, s, t, m_s, m_t, m_u, ld_u, w_f, w_r, c1, DIV, BLOCK_V)
                    g = kd_coef * (qg - q * ssum)
                if HAS_LABELS:
                    if CE_RAW:
                        sm = _exp((xs - m_z) - ld_z)
                    else:
                        sm = q
                    g += ce_w * (sm - tl.where(cols == label, 1.0, 0.0))
                g = g * w
                tl.store(g_base + cols * g_col, g.to(g_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _scale_grad_kernel(
    g_ptr,  # (N, V) gradient, scaled in place, strides (g_row, g_col)
    go_ptr,  # grad_output: one value (go_stride = 0) or (N,) per row
    V, g_row, g_col, go_stride,
    BLOCK: tl.constexpr,
):
    """grid (N,): program i multiplies row i by grad_output[i·go_stride]; a factor of exactly 1.0 returns
    without touching the row (the usual case: backward then costs one scalar load per row, no host sync).
    Full blocks are loaded and stored without a mask (vector accesses), only the tail block is masked."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(go_ptr + row * go_stride).to(tl.float32)
    if f != 1.0:
        base = g_ptr + row * g_row
        offs = tl.arange(0, BLOCK)
        v_full = V - V % BLOCK
        for start in range(0, v_full, BLOCK):
            cols = start + offs
            x = tl.load(base + cols * g_col).to(tl.float32)
            tl.store(base + cols * g_col, (x * f).to(g_ptr.dtype.element_ty))
        if v_full < V:
            cols = v_full + offs
            cm = cols < V
            x = tl.load(base + cols * g_col, mask=cm, other=0.0).to(tl.float32)
            tl.store(base + cols * g_col, (x * f).to(g_ptr.dtype.element_ty), mask=cm)


def autotune_configs() -> list[triton.Config]:
    """Configs tried when FASTKD_AUTOTUNE=1 (BLOCK_V × num_warps)."""
    return [triton.Config({"BLOCK_V": bv}, num_warps=nw)
            for bv, nw in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]


_distill_kernel_autotuned = triton.autotune(
    configs=autotune_configs(),
    key=["V", "DIV", "HAS_GRAD", "HAS_LABELS", "CE_RAW"],
)(_distill_kernel)
