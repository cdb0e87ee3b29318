"""``triton`` backend of the sparse distillation losses (kernels in ``fastkd.kernels.sparse_split`` and
``fastkd.kernels.sparse``).

Registers op ``"sparse"`` on backend ``"triton"`` with the contract of :mod:`fastkd.sparse.op`. Two schedules
(:func:`schedule` picks one and says why): "split", the default, one launch that cuts rows into segments
and runs the K-level math in-kernel, so that each logit is read once from HBM (the gradient's re-read hits
L2; see that module); "row", the fallback (forced by ``CONFIG["schedule"] = "row"``):
the stats kernel streams each row once (lse, tail lse, gather at the ids), the shared K-level math
(:func:`fastkd.sparse.torch_impl.sparse_terms`, O(N·K)) turns them into the loss and the gradient
coefficients, and the gradient kernel writes each row once (a second read of the row). Imports cleanly
without Triton (the backend is then registered with the import error as its reason). Default launch:
``BLOCK_V=4096``, ``num_warps=8``; :data:`CONFIG` can be changed (tests use small blocks so that several
vocabulary tiles are exercised).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fastkd.core.registry import import_kernels, register
from fastkd.sparse.torch_impl import sparse_stats, sparse_terms

if TYPE_CHECKING:
    from fastkd.core.params import SparseParams

(triton, K_, KS), _IMPORT_ERROR = import_kernels("triton", "fastkd.kernels.sparse", "fastkd.kernels.sparse_split")

# "schedule": None = automatic (:func:`schedule`), "split" or "row" to force one; "lag_units": the split
# kernel's distance in units (tickets) from a row's terms unit to its gradient units (kernels/sparse_split.py)
CONFIG: dict[str, int | str | None] = {"block_v": 4096, "num_warps": 8, "schedule": None, "lag_units": 512}
SCHEDULES = ("split", "row")
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sparse_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: SparseParams,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend entry point (op ``sparse``); shapes as in ``torch_sparse.sparse_forward``. With ``stats``
    (N, 4) fp32 the stats kernel also writes the student's entropy and argmax (STATS constexpr: the loss-only
    kernel is unchanged otherwise) and :func:`~fastkd.sparse.torch_impl.sparse_stats` fills the buffer."""
    n, v = student.shape
    k = ids.shape[1]
    if student.stride(1) != 1:
        student = student.contiguous()
    ids = ids.contiguous()
    if schedule(p, stats)[0] == "split":
        return _split_forward(student, ids, t_logp, t_tail, weight, grad, p, stats)
    dev = student.device
    shift = torch.empty(n, dtype=torch.float32, device=dev)  # the row max: lse, lse_tail and s_ids are relative to it
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    has_tail = p.mode == "topk_tail"
    lse_tail = torch.empty(n, dtype=torch.float32, device=dev) if has_tail else lse
    s_ids = torch.empty(n, k, dtype=torch.float32, device=dev)
    block_v = min(CONFIG["block_v"], triton.next_power_of_2(max(v, 16)))
    block_k = triton.next_power_of_2(max(k, 2))
    # both kernels walk each row's ids in ascending order (a (N, K) sort here, O(N·K log K)): the tail's
    # membership test compares each id with the one tile it falls in, and the gradient's id fix-up sums a
    # repeated id's slots as a run of equal neighbours
    ids_sorted, perm = ids.sort(dim=1)
    # each id costs one BLOCK_V-wide compare: a smaller tile keeps that near one lane-op per logit at K = 64
    stats_block = max(16, min(block_v, max(1024, 65536 // block_k))) if has_tail else block_v
    stats_warps = max(1, min(CONFIG["num_warps"], stats_block // 256))  # >= 8 logits per thread
    inv_t = 1.0 / p.temperature
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=dev)
    h_s = torch.empty(n, dtype=torch.float32, device=dev) if stats is not None else lse
    arg_s = torch.empty(n, dtype=torch.int64, device=dev) if stats is not None else ids
    K_._sparse_stats_kernel[(n,)](
        student,
        ids,
        ids_sorted,
        shift,
        lse,
        lse_tail,
        s_ids,
        h_s,
        arg_s,
        v,
        k,
        student.stride(0),
        ids.stride(0),
        inv_t,
        HAS_TAIL=has_tail,
        STATS=stats is not None,
        BLOCK_V=stats_block,
        BLOCK_K=block_k,
        num_warps=stats_warps,
    )
    loss, c, a, lb, b = sparse_terms(s_ids, lse, lse_tail if has_tail else None, t_logp, t_tail, weight, p)
    if stats is not None:
        sparse_stats(stats, h_s, arg_s, ids, s_ids, lse, lse_tail if has_tail else None, t_logp, t_tail, weight)
    if grad is not None:
        dense = not (p.mode == "topk" and p.effective != "fkl")
        K_._sparse_grad_kernel[(n,)](
            student,
            grad,
            ids_sorted,
            perm,
            s_ids,
            c.contiguous(),
            shift,
            lse,
            a.contiguous(),
            lb.contiguous(),
            b.contiguous(),
            weight,
            v,
            k,
            student.stride(0),
            grad.stride(0),
            inv_t,
            DENSE=dense,
            BLOCK_V=block_v,
            BLOCK_K=block_k,
            num_warps=CONFIG["num_warps"],
        )
    return loss


def schedule(p: SparseParams, stats: torch.Tensor | None = None) -> tuple[str, str]:
    """(schedule, reason): "split" (:mod:`fastkd.kernels.sparse_split`, one launch, each logit read once from
    HBM: the gradient's re-read hits L2) unless ``CONFIG["schedule"] = "row"`` forces the row-per-program
    kernels of :mod:`fastkd.kernels.sparse`. Both schedules compute the statistics (``stats``, kept in the
    signature for callers) in their own pass, so the schedule never depends on ``return_stats``."""
    forced = CONFIG.get("schedule")
    if forced is not None and forced not in SCHEDULES:
        raise ValueError(f"CONFIG['schedule'] must be None or one of {SCHEDULES}, got {forced!r}")
    if forced == "row":
        return "row", "forced by CONFIG['schedule'] = 'row'"
    return "split", "each logit read once from HBM (the gradient's re-read within the L2 window)"


def _split_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: SparseParams,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """The split-row schedule: one launch, grid ((N + lag) · S), S = ceil(V / BLOCK_V) (see the kernel module).
    With ``stats`` the kernel's STATS outputs (student entropy / argmax, s at the ids, lse's; workspace
    (N, S, 3) fp32) feed :func:`~fastkd.sparse.torch_impl.sparse_stats`.

    student (N, V) with unit column stride, ids (N, K) int64 contiguous; other arguments as
    :func:`sparse_forward`. Workspace: (N, S, 2) + (N, 3) + (N, K) fp32 and (1 + 2N) int32 counters.
    """
    n, v = student.shape
    k = ids.shape[1]
    dev = student.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return loss
    has_tail = p.mode == "topk_tail"
    block_v = min(int(CONFIG["block_v"]), triton.next_power_of_2(max(v, 16)))
    block_k = triton.next_power_of_2(max(k, 2))
    # phase-0 tiles: each tail id costs one SUB_V-wide compare (≈ one lane-op per logit at K = 64)
    sub_v = max(16, min(block_v, max(1024, 65536 // block_k))) if has_tail else block_v
    s_count = -(-v // block_v)
    ids_sorted, perm = ids.sort(dim=1)
    f32 = dict(dtype=torch.float32, device=dev)
    ws = torch.empty(n, s_count, KS.NSLOT, **f32)
    row = torch.empty(n, 3, **f32)
    fix = torch.empty(n, k, **f32)
    cnt = torch.zeros(1 + 2 * n, dtype=torch.int32, device=dev)
    t_logp = t_logp.to(torch.float32).contiguous()
    weight = weight.to(torch.float32).contiguous()
    tt = t_tail.to(torch.float32).contiguous() if has_tail else weight  # dummy pointer without a tail
    g = grad if grad is not None else student  # dummy pointer without a gradient
    st = stats is not None  # STATS outputs, or dummy pointers (never touched) without statistics
    sws = torch.empty(n, s_count, KS.NSTAT, **f32) if st else ws
    h_s, lse, lse_t = (torch.empty(n, **f32) for _ in range(3)) if st else (loss, loss, loss)
    arg_s = torch.empty(n, dtype=torch.int64, device=dev) if st else ids
    s_ids = torch.empty(n, k, **f32) if st else fix
    eff = "fkl" if p.mode == "sampled" else p.effective
    beta = float(p.beta)
    log_b, log_1b = (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)
    # rows from a row's terms to its gradient: ~lag_units tickets, so that the gradient units find the terms
    # published instead of spinning on them (at most N: then every terms unit runs before any gradient unit)
    lag = max(1, min(n, -(-int(CONFIG["lag_units"]) // s_count))) if grad is not None else 1
    KS._sparse_split_kernel[((n + lag) * s_count,)](
        student, g, ids_sorted, perm, t_logp, tt, weight, loss, ws, row, fix, cnt,
        sws, h_s, arg_s, s_ids, lse, lse_t,
        n, v, k, s_count, lag, student.stride(0), g.stride(0),
        1.0 / p.temperature, p.kd_scale, p.kd_scale / p.temperature, beta, log_b, log_1b,
        MODE=KS.MODE_CODES[p.mode], DIV=KS.DIV_CODES[eff], DENSE=not (p.mode == "topk" and eff != "fkl"),
        HAS_GRAD=grad is not None, SCALED=p.temperature != 1.0, BLOCK_V=block_v, SUB_V=sub_v, BLOCK_K=block_k,
        SP=triton.next_power_of_2(max(s_count, 2)), STATS=st, num_warps=int(CONFIG["num_warps"]),
    )
    if st:
        sparse_stats(stats, h_s, arg_s, ids, s_ids, lse, lse_t if has_tail else None, t_logp, tt if has_tail else None,
                     weight)
    return loss


IMPL = register("sparse", "triton", sparse_forward, requires="triton", tensors=("student",),
                dtypes=_SUPPORTED_DTYPES, dtype_inputs=("student",), import_error=_IMPORT_ERROR)
_reasons = IMPL.not_supported_reasons
