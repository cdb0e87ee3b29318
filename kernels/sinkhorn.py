"""Triton kernels of the batched log-domain Sinkhorn solver (fp32).

Updates (see fastkd.ot.sinkhorn): f_i = −ε LSE_j(log b_j + (g_j − C_ij)/ε),
g_j = −ε LSE_i(log a_i + (f_i − C_ij)/ε).

* :func:`_sinkhorn_small_kernel` — grid (B,): one program solves one problem with n, m ≤ BLOCK; the cost
  tile, log-marginals and potentials stay in registers for ``n_steps`` iterations (one launch), then it
  writes f, g and the row-marginal error ‖P1 − a‖₁.
* :func:`_sinkhorn_half_step_kernel` — grid (B, cdiv(R, BLOCK_R)): one program computes
  out[b, r] = −ε LSE_c(logw[b, c] + (h[b, c] − C[b, r, c])/ε) for BLOCK_R rows, streaming column tiles with
  an online log-sum-exp; C is loaded through strides (so the g update reads the transpose for free) or
  computed on the fly from points, never stored. The host calls it twice per iteration.

METRIC codes: 0 sqeuclidean ‖x−y‖², 1 euclidean, 2 l1, 3 cosine (1 − cos).
"""

from __future__ import annotations

import triton
import triton.language as tl

METRIC_CODES = {"sqeuclidean": 0, "euclidean": 1, "l1": 2, "cosine": 3}


@triton.jit
def _cost_tile(x_ptr, y_ptr, pid_b, offs_r, offs_c, mask_r, mask_c, D,
               sxb, sxn, sxd, syb, syn, syd,
               METRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # x: (B, R, D) rows, y: (B, Cn, D) columns → cost (BLOCK_R, BLOCK_C) fp32
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    xx = tl.zeros((BLOCK_R,), dtype=tl.float32)
    yy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    xb = x_ptr + pid_b * sxb
    yb = y_ptr + pid_b * syb
    for k in range(0, D):
        xv = tl.load(xb + offs_r * sxn + k * sxd, mask=mask_r, other=0.0).to(tl.float32)
        yv = tl.load(yb + offs_c * syn + k * syd, mask=mask_c, other=0.0).to(tl.float32)
        if METRIC == 2:
            acc += tl.abs(xv[:, None] - yv[None, :])
        elif METRIC == 3:
            acc += xv[:, None] * yv[None, :]
            xx += xv * xv
            yy += yv * yv
        else:
            diff = xv[:, None] - yv[None, :]
            acc += diff * diff
    if METRIC == 1:
        acc = tl.sqrt(acc)
    if METRIC == 3:
        # a zero vector gets similarity 0 (cost 1), as fastkd.ot.sinkhorn.pairwise_cost defines it
        tiny = 1.1754943508222875e-38
        acc = 1.0 - acc / (tl.maximum(tl.sqrt(xx), tiny)[:, None] * tl.maximum(tl.sqrt(yy), tiny)[None, :])
    return acc


@triton.jit
def _sinkhorn_half_step_kernel(
    out_ptr,  # (B, R) fp32 output potential
    h_ptr,  # (B, Cn) fp32 other potential, contiguous
    logw_ptr,  # (B, Cn) fp32 log of the other marginal, contiguous
    cost_ptr,  # (B, R, Cn) via strides (s_cb, s_cr, s_cc), or unused
    x_ptr, y_ptr,  # points (B, R, D), (B, Cn, D) via strides, or unused
    R, Cn, D,
    s_cb, s_cr, s_cc, sxb, sxn, sxd, syb, syn, syd,
    eps,
    HAS_COST: tl.constexpr, METRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, Cn, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < Cn
        h = tl.load(h_ptr + pid_b * Cn + offs_c, mask=mask_c, other=0.0)
        lw = tl.load(logw_ptr + pid_b * Cn + offs_c, mask=mask_c, other=float("-inf"))
        if HAS_COST:
            ptrs = cost_ptr + pid_b * s_cb + offs_r[:, None].to(tl.int64) * s_cr + offs_c[None, :] * s_cc
            c = tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        else:
            c = _cost_tile(x_ptr, y_ptr, pid_b, offs_r, offs_c, mask_r, mask_c, D,
                           sxb, sxn, sxd, syb, syn, syd, METRIC, BLOCK_R, BLOCK_C)
        z = lw[None, :] + (h[None, :] - c) / eps
        z = tl.where(mask_c[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m_i = m_new
    tl.store(out_ptr + pid_b * R + offs_r, -eps * (m_i + tl.log(l_i)), mask=mask_r)


@triton.jit
def _lse_rows(z):
    mx = tl.max(z, axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(z - mx[:, None]), axis=1))


@triton.jit
def _lse_cols(z):
    mx = tl.max(z, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(z - mx[None, :]), axis=0))


@triton.jit
def _sinkhorn_small_kernel(
    f_ptr,  # (B, N) fp32 in/out
    g_ptr,  # (B, M) fp32 in/out
    err_ptr,  # (B,) fp32 out: ‖P1 − a‖₁ after the last iteration
    loga_ptr, logb_ptr,  # (B, N), (B, M) fp32 contiguous
    cost_ptr,  # (B, N, M) via strides, or unused
    x_ptr, y_ptr,  # (B, N, D), (B, M, D) via strides, or unused
    N, M, D,
    s_cb, s_cr, s_cc, sxb, sxn, sxd, syb, syn, syd,
    eps, n_steps,
    HAS_COST: tl.constexpr, METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    valid = mask_n[:, None] & mask_m[None, :]
    if HAS_COST:
        ptrs = cost_ptr + pid_b * s_cb + offs_n[:, None] * s_cr + offs_m[None, :] * s_cc
        c = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    else:
        c = _cost_tile(x_ptr, y_ptr, pid_b, offs_n, offs_m, mask_n, mask_m, D,
                       sxb, sxn, sxd, syb, syn, syd, METRIC, BLOCK_N, BLOCK_M)
    cs = c / eps
    loga = tl.load(loga_ptr + pid_b * N + offs_n, mask=mask_n, other=float("-inf"))
    logb = tl.load(logb_ptr + pid_b * M + offs_m, mask=mask_m, other=float("-inf"))
    f = tl.load(f_ptr + pid_b * N + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + pid_b * M + offs_m, mask=mask_m, other=0.0)
    for _ in range(0, n_steps):
        z = tl.where(valid, logb[None, :] + g[None, :] / eps - cs, float("-inf"))
        f = tl.where(mask_n, -eps * _lse_rows(z), 0.0)
        z = tl.where(valid, loga[:, None] + f[:, None] / eps - cs, float("-inf"))
        g = tl.where(mask_m, -eps * _lse_cols(z), 0.0)
    z = tl.where(valid, logb[None, :] + g[None, :] / eps - cs, float("-inf"))
    f_next = -eps * _lse_rows(z)
    a = tl.exp(loga)
    r = tl.where(mask_n & (a > 0), tl.abs(a * (tl.exp((f - f_next) / eps) - 1.0)), 0.0)
    tl.store(f_ptr + pid_b * N + offs_n, f, mask=mask_n)
    tl.store(g_ptr + pid_b * M + offs_m, g, mask=mask_m)
    tl.store(err_ptr + pid_b, tl.sum(r, axis=0))


def half_step(out, h, logw, cost, x, y, eps: float, metric: str, transpose: bool,
              block_r: int = 32, block_c: int = 64, num_warps: int = 4) -> None:
    """out (B, R) ← −ε LSE_c(logw + (h − C)/ε); C = cost (B, n, m), its transpose, or C(x, y) from points."""
    bsz, rows = out.shape
    cols = h.shape[1]
    if cost is not None:
        s_cb, s_cr, s_cc = cost.stride(0), *((cost.stride(2), cost.stride(1)) if transpose
                                             else (cost.stride(1), cost.stride(2)))
        px = py = cost
        d, sx, sy = 1, (0, 0, 0), (0, 0, 0)
    else:
        px, py = (y, x) if transpose else (x, y)
        s_cb = s_cr = s_cc = 0
        d, sx, sy = px.shape[2], px.stride(), py.stride()
    grid = (bsz, triton.cdiv(rows, block_r))
    _sinkhorn_half_step_kernel[grid](
        out, h, logw, cost if cost is not None else out, px, py, rows, cols, d,
        s_cb, s_cr, s_cc, *sx, *sy, float(eps),
        HAS_COST=cost is not None, METRIC=METRIC_CODES[metric], BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps,
    )


def small_solve(f, g, err, log_a, log_b, cost, x, y, eps: float, metric: str, n_steps: int) -> None:
    """Run ``n_steps`` iterations for every problem in one launch (n, m ≤ 128), updating f, g, err."""
    bsz, n = f.shape
    m = g.shape[1]
    block_n, block_m = max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(m))
    if cost is not None:
        sc, d, sx, sy, px, py = cost.stride(), 1, (0, 0, 0), (0, 0, 0), cost, cost
    else:
        sc, d, sx, sy, px, py = (0, 0, 0), x.shape[2], x.stride(), y.stride(), x, y
    _sinkhorn_small_kernel[(bsz,)](
        f, g, err, log_a, log_b, cost if cost is not None else f, px, py, n, m, d,
        *sc, *sx, *sy, float(eps), int(n_steps),
        HAS_COST=cost is not None, METRIC=METRIC_CODES[metric], BLOCK_N=block_n, BLOCK_M=block_m,
        num_warps=4 if block_n * block_m < 4096 else 8,  # a 64 x 64 tile spills at 4 warps with Triton 3.6
    )
