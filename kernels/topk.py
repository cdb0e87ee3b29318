"""Triton streaming top-k + per-temperature log-normaliser / log tail mass over the rows of a (N, V) fp32 chunk.

``_topk_kernel`` — grid (N,); program i reads row i of ``z`` once, in BLOCK_V tiles, and keeps in registers:

- the row's running top-K, unsorted (values and ids in KP = next power of two ≥ K lanes; an empty slot holds
  id −1). A tile whose maximum does not beat the running K-th value is skipped after one reduction (the
  common case once the set has filled on a long row). Otherwise its entries that beat the K-th value enter one
  at a time, largest first, each replacing the current K-th value (a dynamic loop: ~3 tile reductions per
  entry that enters; about K + K·ln(V/BLOCK_V) entries per row on random-order logits: ~750 at K = 128,
  V = 128k, instead of K selection rounds over nearly every tile). After the last tile the K slots are sorted
  once (K small rounds);
- with J > 0 temperatures τ_j (``inv_tau`` (J,) fp32 = 1/τ_j, τ_j > 0): the tail's online log-sum-exp, one
  running maximum m of the tail's z (max_i z_i/τ = m/τ for τ > 0) and J sums s_j = Σ_tail exp((z_i − m)/τ_j).
  Every entry of the row either ends in the final top-K or leaves the candidates exactly once — an entry of a
  skipped tile, an entry of a merged tile that did not enter, or a K-th value evicted by a larger entry — and
  is added to the tail sums at that moment. So the tail is a sum of positive terms, never total − head
  (which cancels when the tail is tiny: a 1e-30 tail mass stays exact in log space).

Outputs per row: values (K,) descending and ids (K,) like ``torch.topk``; and for each τ_j
``lse_j = log(Σ_head exp(z/τ_j) + Σ_tail exp(z/τ_j))`` (the log-normaliser) and
``tail_j = log Σ_tail exp(z/τ_j) − lse_j`` (the log tail mass, −inf when the tail is empty or all −inf).

Semantics (the same as the torch path of :func:`fastkd.cache.extract.extract_topk`): values equal
``torch.topk``'s exactly; on exactly tied values the ids may differ from torch's (an entry equal to the K-th
value does not enter: the earlier column is kept), which changes neither the values nor lse / tail. −inf
logits are ordinary entries: a row with fewer than K finite entries returns −inf values for the rest (with ids
of some of its −inf columns, each id once) and tail = −inf; a row with no finite entry has lse = −inf. NaN and
+inf logits are not supported (the LM-head logits are finite, or −inf where a bias masks a column).

Default on CUDA tensors in the teacher-cache extraction (``extract_topk(topk_backend="auto")``); tested
against torch and float64 under the interpreter and compiled for sm_90 (bench/aot.py); not timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 128  # the final sort is unrolled K times; the set lives in registers
MAX_TEMPERATURES = 8  # J: one exp per entry per temperature


@triton.jit
def _tail_add(m, s, jl, inv_tau_ptr, x, keep, J: tl.constexpr):
    """Add exp(x_i / τ_j) of the ``keep`` entries of x to the tail sums s (JP,) kept relative to the running
    maximum m (z units); returns the new (m, s). m = −inf means no finite tail entry yet (s is then 0)."""
    xm = tl.where(keep, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(xm))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # guards −inf − (−inf)
    for j in tl.static_range(J):
        it = tl.load(inv_tau_ptr + j)
        add = tl.sum(tl.exp((xm - shift) * it))
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp((m - shift) * it))
        s = tl.where(jl == j, s * alpha + add, s)
    return m_new, s


@triton.jit
def _tail_add1(m, s, jl, inv_tau_ptr, v, J: tl.constexpr):
    """:func:`_tail_add` for one value v (−inf adds nothing)."""
    m_new = tl.maximum(m, v)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    for j in tl.static_range(J):
        it = tl.load(inv_tau_ptr + j)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp((m - shift) * it))
        s = tl.where(jl == j, s * alpha + tl.exp((v - shift) * it), s)
    return m_new, s


@triton.jit
def _topk_kernel(z_ptr, stride_z, V, vals_ptr, ids_ptr, inv_tau_ptr, lse_ptr, tails_ptr,
                 K: tl.constexpr, KP: tl.constexpr, J: tl.constexpr, JP: tl.constexpr, BLOCK_V: tl.constexpr):
    # z_ptr (N, V) fp32 row stride stride_z; vals_ptr (N, K) fp32; ids_ptr (N, K) int64;
    # inv_tau_ptr (J,) fp32; lse_ptr / tails_ptr (N, J) fp32 (unused when J == 0)
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, KP)
    kmask = lanes < K
    cols = tl.arange(0, BLOCK_V)
    jl = tl.arange(0, JP)
    neg_inf = float("-inf")
    # the running top-K, unsorted; an empty slot has id −1 and value −inf
    run_v = tl.full([KP], neg_inf, tl.float32)
    run_i = tl.full([KP], -1, tl.int32)
    # the tail's running maximum and per-temperature sums (see _tail_add)
    m = tl.max(tl.full([KP], neg_inf, tl.float32))
    s = tl.zeros([JP], tl.float32)
    n_empty = tl.sum(kmask.to(tl.int32))
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inb = offs < V
        x = tl.load(z_ptr + row * stride_z + offs, mask=inb, other=neg_inf).to(tl.float32)
        kth = tl.min(tl.where(kmask, run_v, float("inf")))  # −inf while a slot is empty
        avail = inb  # tile entries not (yet) taken into the running set
        if (tl.max(x) > kth) | (n_empty > 0):
            # insert the tile's entries that beat the K-th value one at a time, largest first (the lowest
            # column on ties; an entry equal to the K-th value stays out: the earlier one is kept); the
            # evicted K-th value leaves to the tail. Empty slots take any entry, −inf included.
            mx = tl.max(tl.where(avail, x, neg_inf))
            go = (tl.max(avail.to(tl.int32)) > 0) & ((n_empty > 0) | (mx > kth))
            while go:
                ix = tl.min(tl.where(avail & (x == mx), cols, BLOCK_V))
                first_empty = tl.min(tl.where(kmask & (run_i < 0), lanes, KP))
                kth_lane = tl.min(tl.where(kmask & (run_v == kth), lanes, KP))
                victim = tl.where(n_empty > 0, first_empty, kth_lane)
                if J > 0:
                    m, s = _tail_add1(m, s, jl, inv_tau_ptr, tl.where(n_empty > 0, neg_inf, kth), J)
                run_v = tl.where(lanes == victim, mx, run_v)
                run_i = tl.where(lanes == victim, (start + ix).to(tl.int32), run_i)
                avail = avail & (cols != ix)
                n_empty = tl.sum((kmask & (run_i < 0)).to(tl.int32))
                kth = tl.min(tl.where(kmask, run_v, float("inf")))
                mx = tl.max(tl.where(avail, x, neg_inf))
                go = (tl.max(avail.to(tl.int32)) > 0) & ((n_empty > 0) | (mx > kth))
        if J > 0:  # what is left of the tile is ≤ the K-th value: tail
            m, s = _tail_add(m, s, jl, inv_tau_ptr, x, avail, J)
    # sort the running set descending (K rounds once per row; ties: the lower lane first)
    out_v = tl.full([KP], neg_inf, tl.float32)
    out_i = tl.full([KP], -1, tl.int32)
    left = kmask & (run_i >= 0)
    for r in tl.static_range(K):
        mr = tl.max(tl.where(left, run_v, neg_inf))
        ir = tl.min(tl.where(left & (run_v == mr), lanes, KP))
        out_v = tl.where(lanes == r, mr, out_v)
        out_i = tl.where(lanes == r, tl.sum(tl.where(lanes == ir, run_i, 0)), out_i)
        left = left & (lanes != ir)
    run_v = out_v
    run_i = out_i
    tl.store(vals_ptr + row * K + lanes, run_v, mask=lanes < K)
    tl.store(ids_ptr + row * K + lanes, run_i.to(tl.int64), mask=lanes < K)
    if J > 0:
        head = tl.where(lanes < K, run_v, neg_inf)
        hm = tl.max(head)
        h_shift = tl.where(hm == neg_inf, 0.0, hm)
        t_shift = tl.where(m == neg_inf, 0.0, m)
        for j in tl.static_range(J):
            it = tl.load(inv_tau_ptr + j)
            head_lse = h_shift * it + tl.log(tl.sum(tl.exp((head - h_shift) * it)))
            tail_lse = t_shift * it + tl.log(tl.sum(tl.where(jl == j, s, 0.0)))
            hi = tl.maximum(head_lse, tail_lse)
            lo = tl.minimum(head_lse, tail_lse)
            # logaddexp; hi = −inf only when the row has no finite entry
            lse = tl.where(hi == neg_inf, neg_inf, hi + tl.log(1.0 + tl.exp(lo - hi)))
            tl.store(lse_ptr + row * J + j, lse)
            tl.store(tails_ptr + row * J + j, tail_lse - lse)


def _check(z: torch.Tensor, k: int) -> torch.Tensor:
    if z.dim() != 2 or z.dtype != torch.float32:
        raise ValueError(f"z must be a 2-D float32 tensor, got {tuple(z.shape)} {z.dtype}")
    v = z.shape[1]
    if not 1 <= k <= min(v, MAX_K):
        raise ValueError(f"k must be in [1, min(V, {MAX_K})] = [1, {min(v, MAX_K)}], got {k}")
    return z if z.stride(1) == 1 else z.contiguous()


def topk_rows(z: torch.Tensor, k: int, block_v: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``z`` (N, V) fp32 (CUDA, or CPU under TRITON_INTERPRET=1) → (values (N, k) fp32
    descending, ids (N, k) int64). ``k`` ≤ 128 (the final sort is unrolled k times)."""
    vals, ids, _, _ = topk_lse_rows(z, k, (), block_v=block_v)
    return vals, ids


def topk_lse_rows(z: torch.Tensor, k: int, temperatures: tuple[float, ...] | list[float], block_v: int = 1024,
                  inv_tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``z`` (N, V) fp32 plus, at each temperature τ_j (J ≤ 8, τ_j > 0), the
    log-normaliser lse (N, J) = logsumexp(z / τ_j) and the log tail mass tails (N, J) =
    log Σ_{i ∉ top-k} softmax(z / τ_j)_i, in one read of z. Returns (values (N, k) fp32 descending,
    ids (N, k) int64, lse (N, J) fp32, tails (N, J) fp32); see the module docstring for ties and −inf.
    ``inv_tau``: (J,) fp32 on z's device = 1/τ_j, built once by a caller that launches per chunk (made here
    it is a host → device copy at every call)."""
    z = _check(z, k)
    temps = [float(t) for t in temperatures]
    if len(temps) > MAX_TEMPERATURES or any(not 0.0 < t < float("inf") for t in temps):
        raise ValueError(f"temperatures must be at most {MAX_TEMPERATURES} positive finite numbers, got {temps}")
    n, v = z.shape
    j = len(temps)
    dev = z.device
    vals = torch.empty(n, k, dtype=torch.float32, device=dev)
    ids = torch.empty(n, k, dtype=torch.int64, device=dev)
    lse = torch.empty(n, j, dtype=torch.float32, device=dev)
    tails = torch.empty(n, j, dtype=torch.float32, device=dev)
    if inv_tau is None:
        inv_tau = torch.tensor([1.0 / t for t in temps] or [1.0], dtype=torch.float32, device=dev)
    if n:
        bv = min(triton.next_power_of_2(v), block_v)
        # 8 warps: one program streams one row and a chunk has only ~c programs (c = 256 rows by default), so
        # more loads in flight per program; sm_90 ptxas at BLOCK_V=1024: 40-64 registers, no spills for
        # K = 8, 32, 64, 128 (J = 1) and K = 128, J = 8 (bench/aot.py)
        _topk_kernel[(n,)](z, z.stride(0), v, vals, ids, inv_tau, lse, tails, K=k, KP=triton.next_power_of_2(k),
                           J=j, JP=triton.next_power_of_2(max(j, 1)), BLOCK_V=bv, num_warps=8)
    return vals, ids, lse, tails
