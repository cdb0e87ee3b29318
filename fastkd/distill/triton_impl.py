"""``triton`` backend of the divergence losses on logits (kernels in ``fastkd.kernels.distill_split`` and
``fastkd.kernels.distill``).

Schedule (:func:`schedule` returns it with the reason): the split-row kernel (each logit read once from HBM,
its re-reads bounded to hit L2; see that module's docstring) for every divergence but akl; the two-pass
kernel, one program per row, for akl (its head search re-reads the teacher row), under ``FASTKD_AUTOTUNE=1``
and when forced by ``override_config(schedule="two_pass")``.

Registers op ``"distill"`` on backend ``"triton"`` with the contract of :mod:`fastkd.distill.op`.
Imports cleanly without Triton: the backend is then registered with the import error as its reason.

Launch configuration: a fixed default (``BLOCK_V=4096``, ``num_warps=8``); :func:`override_config`
changes it (tests use small blocks so that several vocabulary blocks are exercised); the divergence code
(after the table's endpoint rules) and the hyperparameters come from :class:`DistillParams` unchanged, so a
new divergence needs no edit here; with
``FASTKD_AUTOTUNE=1`` the kernel is autotuned over a few (BLOCK_V, num_warps) pairs instead (not when the
gradient aliases the student: tuning re-runs the kernel, which would read its own output).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from fastkd.core.params import DistillParams
from fastkd.core.registry import import_kernels, register

(K, KA, KS), _IMPORT_ERROR = import_kernels("fastkd.kernels.distill", "fastkd.kernels.distill_akl",
                                           "fastkd.kernels.distill_split")

_CONFIG: dict[str, int | str | None] = {"block_v": None, "num_warps": None, "schedule": None}
SCHEDULES = ("split", "two_pass")
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def override_config(block_v: int | None = None, num_warps: int | None = None,
                    schedule: str | None = None) -> Iterator[None]:
    """Temporarily launch with ``BLOCK_V=block_v`` (a power of two), ``num_warps`` and ``schedule`` ("split"
    or "two_pass", forced when possible; None = the default of :func:`schedule`)."""
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    old = dict(_CONFIG)
    _CONFIG.update(block_v=block_v, num_warps=num_warps, schedule=schedule)
    try:
        yield
    finally:
        _CONFIG.update(old)


def _autotune() -> bool:
    return os.environ.get("FASTKD_AUTOTUNE", "0") not in ("", "0")


def distill_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: DistillParams,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend entry point (op ``distill``): see :mod:`fastkd.distill.op`.

    student, teacher: (N, V) fp32/bf16/fp16, rows and columns may be strided; labels: (N,) int64 or None
    (only read when ``p.ce_weight`` > 0); weight: (N,) fp32; grad: (N, V) buffer (may alias ``student``)
    written with ``weight[i] · ∂loss_i/∂student[i]``, or None; stats: (N, 4) fp32 output
    (:mod:`fastkd.core.stats`, written by the program that finishes each kept row, under the kernels'
    ``STATS`` constexpr: without it the compiled code is unchanged), or None. Returns the per-token loss
    (N,) fp32. One kernel launch.
    """
    n, v = student.shape
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    if n == 0:
        return loss
    has_labels = bool(p.ce_weight) and labels is not None
    weight = weight.to(torch.float32).contiguous()
    lab = labels.to(torch.int64).contiguous() if has_labels else weight  # dummy pointer when unused
    g = grad if grad is not None else student  # dummy pointer when HAS_GRAD is False
    inv_t = 1.0 / p.temperature
    st = stats
    if st is not None and st.stride(1) != 1:
        st = torch.empty(n, 4, dtype=torch.float32, device=student.device)
    ptrs = (student, teacher, g, lab, weight, loss)
    strides = (*student.stride(), *teacher.stride(), *g.stride())
    scalars = (inv_t, p.kd_scale, p.kd_scale * inv_t, p.ce_weight, *p.hyper_values())
    args = (*ptrs, v, *strides, *scalars)  # the two-pass kernel's argument order (also KA.launch's)
    st_args = (loss, 0) if st is None else (st, st.stride(0))  # loss: a dummy pointer without stats
    flags = dict(DIV=p.code, HAS_GRAD=grad is not None, HAS_LABELS=has_labels,
                 CE_RAW=has_labels and p.temperature != 1.0, NT=K.AKL_NT, STATS=st is not None)
    aliased = grad is not None and grad.data_ptr() == student.data_ptr()
    block_v = _CONFIG["block_v"] or min(K.DEFAULT_BLOCK_V, max(16, 1 << (v - 1).bit_length()))
    num_warps = _CONFIG["num_warps"] or K.DEFAULT_NUM_WARPS
    sched, _why = schedule(p, aliased, v)
    if sched == "akl_split":
        KA.launch(args, n, v, has_grad=grad is not None, has_labels=has_labels, ce_raw=flags["CE_RAW"],
                  scaled=p.temperature != 1.0, block_v=_CONFIG["block_v"], num_warps=_CONFIG["num_warps"], stats=st)
    elif sched == "split":
        bv, nw = KS.launch_config(p.code, max(student.element_size(), teacher.element_size()),
                                  heavy=flags["STATS"] or flags["CE_RAW"])
        # rows Triton loads as vectors: unit column strides, V and the row strides multiples of 16 elements
        vector_rows = student.stride(1) == teacher.stride(1) == 1 and not any(
            x % 16 for x in (v, student.stride(0), teacher.stride(0)))
        if not vector_rows:
            bv, nw = KS.unaligned_config(p.code, (bv, nw))
        block_v = _CONFIG["block_v"] or min(bv, max(16, 1 << (v - 1).bit_length()))
        s_count = -(-v // block_v)
        lag = KS.lag(p.code)
        nslot = KS.NSLOT if st is None else KS.NSLOT_STATS
        ws = torch.empty(n, s_count, nslot, dtype=torch.float32, device=student.device)
        cnt = torch.zeros(1 + 2 * n, dtype=torch.int32, device=student.device)
        rs = torch.empty(n, KS.NRS.value, dtype=torch.float32, device=student.device)
        KS._distill_split_kernel[((n + lag) * s_count,)](
            *ptrs, ws, cnt, rs, n, v, s_count, *KS.ticket_magic(s_count), *strides, *scalars, *st_args, DIV=p.code,
            HAS_GRAD=flags["HAS_GRAD"], HAS_LABELS=has_labels, CE_RAW=flags["CE_RAW"], BLOCK_V=block_v,
            SP=max(2, 1 << (s_count - 1).bit_length()), LAG=lag, SCALED=p.temperature != 1.0,
            STATS=flags["STATS"], WS=nslot, SUB_V=KS.sub_block(p.code, block_v), num_warps=_CONFIG["num_warps"] or nw)
    elif _autotune() and _CONFIG["block_v"] is None and not aliased:
        K._distill_kernel_autotuned[(n,)](*args, *st_args, **flags, BLOCK_A=K.AKL_BLOCK)
    else:
        K._distill_kernel[(n,)](*args, *st_args, **flags, BLOCK_V=block_v, BLOCK_A=min(block_v, K.AKL_BLOCK),
                                num_warps=num_warps)
    if st is not None and st is not stats:
        stats.copy_(st)
    return loss


def schedule(p: DistillParams, aliased: bool = False, v: int | None = None) -> tuple[str, str]:
    """(schedule, reason) for divergence ``p`` (vocabulary ``v`` when known): "split"
    (:mod:`fastkd.kernels.distill_split`, each logit read once from HBM, re-reads bounded to hit L2), for akl
    "akl_split" (:mod:`fastkd.kernels.distill_akl`, the same schedule with the head search in rounds), unless
    the configuration needs the two-pass kernel (:mod:`fastkd.kernels.distill`); ``override_config(schedule=
    ...)`` forces one where possible."""
    forced = _CONFIG["schedule"]
    if forced == "two_pass":
        return "two_pass", "forced by override_config(schedule='two_pass')"
    if forced is None and _autotune() and _CONFIG["block_v"] is None and not aliased:
        return "two_pass", "FASTKD_AUTOTUNE=1 (the split kernel's counters cannot be re-run by the autotuner)"
    if p.code not in KS.SPLIT_CODES:
        if v is not None and v > KA.AKL_MAX_V:
            return "two_pass", f"akl with V={v} > {KA.AKL_MAX_V} (the split akl search counts in fp32: exact to 2^24)"
        return "akl_split", "akl: each logit read once from HBM, head search in rounds over L2-resident segments"
    return "split", "each logit read once from HBM (re-reads within the L2 window)"


def _limits(student: torch.Tensor | None = None, **_: object) -> list[str]:
    if student is not None and student.dim() == 2 and student.shape[1] >= 2**31:
        return [f"vocabulary of {student.shape[1]} columns exceeds the kernel's int32 column index"]
    return []


IMPL = register("distill", "triton", distill_forward, _limits, requires="triton", tensors=("student", "teacher"),
                dtypes=_SUPPORTED_DTYPES, dtype_inputs=("student", "teacher"), import_error=_IMPORT_ERROR)
_reasons = IMPL.not_supported_reasons
