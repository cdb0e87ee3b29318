"""Counters of the GPU cost model (bench/model.py): aten ops through a ``TorchDispatchMode`` and Triton kernels
through an instrumented interpreter, with the roofline of published H100 / H200 figures. Rules: see
bench/model.py's docstring (everything here is a model, not a measurement).
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


@dataclass(frozen=True)
class GPU:
    """Published datasheet figures (leads, not measurements): NVIDIA's H100 / H200 / A100 datasheets and
    the CUDA C Programming Guide's arithmetic-throughput table (lanes per SM per clock, by pipe)."""

    name: str
    hbm_bw: float  # bytes/s
    tensor_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    fp32_flops: float  # non-tensor fp32 FLOP/s
    l2_bytes: float
    sms: int
    mem_bytes: float
    clock_hz: float = 1.98e9  # boost clock
    fma_lanes: int = 128  # fp32 add/mul/fma per SM-clock (A100: 64)
    alu_lanes: int = 64  # integer add/logic/shift/compare/select/min-max per SM-clock
    xu_lanes: int = 16  # MUFU (ex2, lg2, rcp, rsqrt, sin/cos) and type conversions per SM-clock
    issue_lanes: int = 128  # 4 sub-partitions × one warp-instruction per clock
    l1_bytes: float = 256 * 1024  # L1 + shared memory per SM
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048


GPUS = {
    "h100": GPU("H100 SXM", 3.35e12, 989e12, 67e12, 50e6, 132, 80e9),
    "h200": GPU("H200", 4.8e12, 989e12, 67e12, 50e6, 132, 141e9),
    "h100-pcie": GPU("H100 PCIe", 2.0e12, 756e12, 51e12, 50e6, 114, 80e9, clock_hz=1.755e9),
    "a100": GPU("A100 SXM4 80GB", 2.039e12, 312e12, 19.5e12, 40e6, 108, 80e9, clock_hz=1.41e9, fma_lanes=64,
                l1_bytes=192 * 1024),
}
# The two calibrated efficiencies (bench/model.py --calibrate fits them on bench/data/published.csv; see the
# model's docstring): achieved / datasheet HBM bandwidth, achieved / dense tensor-core peak of a large GEMM.
HBM_EFFICIENCY = 0.90
GEMM_EFFICIENCY = 0.80
ASSUMED_REGS = 64  # registers per thread for the occupancy estimate when a launch has no sm_90 compile record
SAMPLE_ROWS = 2
# Triton releases the sm_90 compile records can come from: the installed one (None) and the project's Triton
# floor in a side folder that shadows the venv's (Makefile: .venv/triton-min). A launch tagged with a release
# finds its record under ``sass_key(...) + "|triton=" + release``.
TRITON_FLOOR = "3.6.0"
TRITON_DIRS = {TRITON_FLOOR: Path(__file__).resolve().parents[1] / ".venv" / "triton-min"}


# ----------------------------------------------------------------------------------------------------------
# PyTorch ops: a dispatch mode that counts bytes, FLOPs and live memory
# ----------------------------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read/write ``t`` once: stored elements (stride-0 dims count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


_FREE_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
             "lift_fresh", "detach", "alias", "set_", "resize_", "record_stream")
_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "matmul")


def op_flops(name: str, args: tuple, out: list[torch.Tensor]) -> float:
    """FLOPs of one aten op: 2·M·N·K for matmuls (+ M·N for addmm's add), else one per element."""
    ts = _tensors(args)
    name = name.rstrip("_") if name.rstrip("_") in _MATMULS else name  # in-place addmm_ / baddbmm_
    if name in ("mm", "_scaled_mm") and len(ts) >= 2:
        (m, k), n = ts[0].shape, ts[1].shape[1]
        return 2.0 * m * n * k
    if name == "addmm" and len(ts) >= 3:
        (m, k), n = ts[1].shape, ts[2].shape[1]
        return 2.0 * m * n * k + m * n
    if name in ("bmm", "baddbmm") and len(ts) >= 2:
        a, b = ts[-2], ts[-1]
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    biggest = max([t.numel() for t in ts + out] or [0])
    return float(biggest)


@dataclass
class OpCost:
    """One op or kernel launch: HBM bytes, FLOPs (matmuls: tensor-core peak when bf16/fp16, else fp32 peak)
    and its compute: ``pipe_ms`` (Triton kernels with an sm_90 compile record: SASS warp-instructions per pipe
    at the pipe's lanes per SM-clock) or, without one, ``alu_ops`` (the interpreter's element operations, one
    lane-instruction each, transcendentals weighted 8), each at its own ceiling (:meth:`ms`)."""

    name: str
    bytes: float
    flops: float
    tensor_core: bool
    rule: str = ""
    launches: int = 1
    alu_ops: float = 0.0
    pipe_ms: float | None = None
    spill_bytes: float = 0.0  # local-memory (spill) traffic counted in ``bytes`` (it misses L1 and L2)
    sass_instr: float = 0.0  # lane-instructions issued (SASS), for instructions per element
    sass_pipes: dict[str, float] = field(default_factory=dict)  # lane-instructions per pipe (fma, alu, xu, issue)

    def ms(self, gpu: GPU) -> float:
        """max(bytes / (HBM_EFFICIENCY · bandwidth), FLOPs / (GEMM_EFFICIENCY · tensor peak, or fp32 peak),
        compute): a roofline with the two calibrated efficiencies."""
        peak = gpu.tensor_flops * GEMM_EFFICIENCY if self.tensor_core else gpu.fp32_flops
        compute = self.pipe_ms / 1e3 if self.pipe_ms is not None else self.alu_ops / (gpu.fp32_flops / 2)
        return 1e3 * max(self.bytes / (gpu.hbm_bw * HBM_EFFICIENCY), self.flops / peak, compute)


SOFTMAX_SMEM_BYTES = 48 * 1024  # PyTorch keeps a softmax row in shared memory below sharedMemPerBlock
SOFTMAX_BLOCKS_PER_SM = 2  # its row kernels: one block of up to 1024 threads per row, 2048 threads per SM


def softmax_extra_bytes(name: str, ins: list[torch.Tensor], gpu: GPU) -> tuple[float, str]:
    """Re-reads of PyTorch's CUDA softmax kernels over the last dimension (aten/src/ATen/native/cuda/
    SoftMax.cu), which the inputs + outputs count leaves out: a row too long for shared memory is read three
    times forward (max, sum of exponentials, write) and its grad_output twice backward (row sum, write). The
    re-reads hit L2 only when the rows in flight (SMs × blocks per SM × row bytes) fit in L2, else they are
    HBM traffic. Returns (extra bytes, rule)."""
    forward = name in ("_softmax", "_log_softmax")
    if not ins or not (forward or name in ("_softmax_backward_data", "_log_softmax_backward_data")):
        return 0.0, ""
    x = ins[0]
    row = x.shape[-1] * x.element_size() if x.dim() else 0
    if row < SOFTMAX_SMEM_BYTES:
        return 0.0, f"{name}: row {row / 1e3:.0f} KB in shared memory: read once"
    in_flight = gpu.sms * SOFTMAX_BLOCKS_PER_SM * row
    passes = 2 if forward else 1
    if in_flight <= gpu.l2_bytes:
        return 0.0, f"{name}: {passes} re-reads in L2 ({in_flight / 1e6:.0f} MB in flight)"
    return passes * float(tensor_bytes(x)), (f"{name}: {passes} re-reads from HBM ({in_flight / 1e6:.0f} MB "
                                             f"in flight > L2)")


class TorchCounter(TorchDispatchMode):
    """Counts every aten op's bytes (inputs + outputs) and FLOPs, and the peak of live op outputs.

    ``hook(func, args, kwargs, out)`` may return a list of :class:`OpCost` that replaces the op's own cost
    (used for fastkd's custom ops, whose kernels are counted by replay).
    """

    def __init__(self, hook: Callable[..., list[OpCost] | None] | None = None, gpu: GPU | None = None):
        super().__init__()
        self.gpu = gpu or GPUS["h200"]
        self.ops: list[OpCost] = []
        self.live = 0
        self.peak = 0
        self.hook = hook
        self.suspended = 0

    def _alloc(self, t: torch.Tensor) -> None:
        nbytes = t.untyped_storage().nbytes() if t.device.type != "meta" else tensor_bytes(t)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _run_custom(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A fastkd custom op run through its Python body with this mode active, so that the aten ops of its
        torch side are counted (its Triton launches are counted by the TritonCounter)."""
        from torch._library.custom_ops import OPDEFS

        with self:
            return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return True if args[0].dtype == torch.bool else 1 if not args[0].dtype.is_floating_point else 1.0
        if func.namespace == "fastkd" and self.hook is None:
            out = self._run_custom(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if self.suspended:
            return out
        name = func.__name__.split(".")[0]
        outs = _tensors(out)
        schema = func._schema
        aliased = any(r.alias_info is not None for r in schema.returns)
        if not aliased and not func.is_view:
            for t in outs:
                self._alloc(t)
        if func.namespace == "fastkd" and self.hook is None:
            return out  # already run by the opening lines with this mode re-entered (see _run_custom)
        custom = self.hook(func, args, kwargs, out) if self.hook is not None else None
        if custom is not None:
            self.ops.extend(custom)
            return out
        if func.is_view or name in _FREE_OPS:
            return out
        ins = _tensors((args, kwargs))
        if name in ("copy_", "_copy_from"):
            nbytes = tensor_bytes(ins[1]) + tensor_bytes(ins[0])
        else:
            in_ids = {id(t) for t in outs}
            if name.endswith("_") or "out" in kwargs:  # in-place / out=: its inputs read, its output written
                nbytes = sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in outs)
                if name in ("zero_", "fill_"):
                    nbytes = sum(tensor_bytes(t) for t in outs)
            else:
                nbytes = sum(tensor_bytes(t) for t in ins if id(t) not in in_ids) + sum(tensor_bytes(t)
                                                                                      for t in outs)
        if name in ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "fill", "scalar_tensor"):
            nbytes = sum(tensor_bytes(t) for t in outs)
        rule = ""
        if name in ("nll_loss_forward", "nll_loss2d_forward"):  # gathers one log-probability per row
            nbytes = ins[0].shape[0] * ins[0].element_size() + tensor_bytes(ins[1]) + sum(tensor_bytes(t) for t in outs)
        elif name in ("nll_loss_backward", "nll_loss2d_backward"):  # writes the (N, V) gradient, reads no row
            nbytes = sum(tensor_bytes(t) for t in outs) + tensor_bytes(ins[2]) + tensor_bytes(ins[0])
        extra, rule = softmax_extra_bytes(name, ins, self.gpu)
        nbytes += extra
        # tensor cores when the multiplied pair (not addmm's addend) is bf16/fp16
        operands = ins[1:3] if name.rstrip("_") in ("addmm", "baddbmm") else ins[:2]
        tc = name.rstrip("_") in _MATMULS and all(t.dtype in (torch.bfloat16, torch.float16) for t in operands)
        self.ops.append(OpCost(f"aten.{name}", float(nbytes), op_flops(name, args, outs), tc, rule))
        return out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: the interpreter's loads and stores, per program
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LaunchStats:
    """One kernel launch as run (programs_run of programs_total programs along grid axis 0 × the rest)."""

    kernel: str
    num_warps: int
    rows_total: int
    rows_run: int
    load_bytes: float = 0.0
    # the same loads as a warp's SASS counts them (bench/aot.py: 32 lanes × width per LDG, predicated-off and
    # replicated lanes included): a block of n elements costs max(n, 32·num_warps) × element size over the
    # program's warps (a scalar or an (S,) vector is loaded by every warp)
    warp_load_bytes: float = 0.0
    vec_load_bytes: float = 0.0  # those of blocks with at least one element per lane (n >= 32·num_warps)
    store_bytes: float = 0.0
    unique_load_bytes: float = 0.0
    max_program_bytes: float = 0.0
    programs: int = 0
    alu_ops: float = 0.0
    replayed: bool = False  # launched by a custom-op replay (costed by the op's hook, not on its own)
    # bytes re-read by a later program, by reuse distance (programs between the two reads): {distance: bytes}
    cross_reread: dict[int, float] = field(default_factory=dict)

    sass_key: str = ""  # how its sm_90 compile record is found (sass_key())
    spec: dict | None = None  # the launch's arguments as bench/aot.py --sass-specs compiles them

    def record(self) -> dict | None:
        """Its sm_90 compile record (registers, stack, SASS counts), None when there is none or it is stale
        (its ``source`` fingerprint is not the launch's: :func:`source_fingerprint`)."""
        rec = sass_records().get(self.sass_key) if self.sass_key else None
        if rec is not None and self.spec is not None and rec.get("source") != source_fingerprint(
                self.spec["module"], self.spec.get("triton") or installed_triton()):
            rec = None
        if rec is not None and rec.get("sass") and "ldg_vec" not in rec["sass"]["loop"]:
            rec = None  # made before the SASS counts split the vector loads out
        if rec is None and self.spec is not None:
            MISSING[self.sass_key] = self.spec
        return rec

    def cost(self, gpu: GPU, extra: float = 1.0) -> OpCost:
        """HBM bytes of the whole launch (all its rows, × ``extra``) under the L2 rule of bench/model.py's
        docstring, and its compute and spill traffic from the compile record when there is one."""
        scale = extra * self.rows_total / max(1, self.rows_run)
        threads = 32 * self.num_warps
        rec = self.record()
        regs = rec["regs"] if rec and rec.get("regs") else ASSUMED_REGS
        occ = occupancy(gpu, self.num_warps, regs, rec.get("shared", 0) if rec else 0)
        progs_total = self.programs * scale
        resident = min(progs_total, gpu.sms * occ)
        in_flight = resident * self.max_program_bytes
        reread = self.load_bytes - self.unique_load_bytes
        # Cross-program re-reads (a later program reading what an earlier one read, Δ programs apart, programs
        # starting in grid / ticket order): between the two reads the GPU runs at most resident + Δ programs,
        # so the re-read hits L2 when (resident + Δ) × the program's distinct bytes <= L2 (Δ = 0: the rule below).
        cross_hit = sum(b for dist, b in self.cross_reread.items()
                        if (resident + dist) * self.max_program_bytes <= gpu.l2_bytes)
        cross = (f"; cross-program re-reads {cross_hit / max(1.0, sum(self.cross_reread.values())):.0%} in L2 "
                 f"(max distance {max(self.cross_reread)} progs)") if self.cross_reread else ""
        if reread <= 0:
            loads, rule = self.load_bytes, "no re-reads"
        elif in_flight <= gpu.l2_bytes:
            loads = self.unique_load_bytes
            rule = (f"re-reads once: {resident:.0f} progs x {self.max_program_bytes / 1e3:.0f} KB = "
                    f"{in_flight / 1e6:.0f} MB <= L2 {gpu.l2_bytes / 1e6:.0f} MB")
        else:
            loads = self.load_bytes
            rule = (f"re-reads from HBM: {resident:.0f} progs x {self.max_program_bytes / 1e3:.0f} KB = "
                    f"{in_flight / 1e6:.0f} MB > L2 {gpu.l2_bytes / 1e6:.0f} MB")
        nbytes = (loads - cross_hit + self.store_bytes) * scale
        if rec is None or not rec.get("sass"):
            return OpCost(f"triton.{self.kernel}", nbytes, 0.0, False, f"{self.kernel}: {rule}{cross}; no sm_90 "
                          "record: interpreter ALU ops", alu_ops=self.alu_ops * scale)
        sass = rec["sass"]
        loop, once = sass["loop"], sass.get("once_path", sass["once"])
        # warp executions of the loop code: the launch's global-load bytes that the straight-line code (once per
        # warp) does not load, over the bytes one warp's pass through the loop code loads (every loop is taken
        # to stream its data, loading in each iteration; a loop that loads nothing runs once per warp)
        # the straight-line code runs once per warp, or as often as its loads say when a warp loads less than
        # the path does (a program that skips phases, e.g. the first and last units of a ticketed schedule)
        # (both in the SASS's own bytes, warp_load_bytes: a scalar or small vector that every warp loads counts
        # once per warp, as the path's ldg counts it)
        warps = self.programs * self.num_warps
        straight = min(warps, self.warp_load_bytes / once["ldg"]) if once["ldg"] else warps
        rest = max(0.0, self.warp_load_bytes - straight * once["ldg"])
        # a loop whose iterations take different branches (akl's search rounds: the segment's sums only while
        # the row is unresolved) runs its longest path as often as its streamed (vector) loads say; the small
        # loads every iteration makes (scalars, slots) would count a heavy iteration for each light one
        if loop.get("ldg_vec"):
            execs = max(0.0, self.vec_load_bytes - straight * once.get("ldg_vec", 0)) / loop["ldg_vec"]
        elif loop["ldg"]:
            execs = rest / loop["ldg"]
        else:
            execs = warps if sass.get("loops") else 0.0

        def count(k: str) -> float:
            return (execs * loop[k] + straight * once[k]) * scale

        instr = {p: count(p) for p in ("fma", "alu", "xu", "issue")}
        lanes = pipe_lanes(gpu)
        cycles = max(32 * instr[p] / lanes[p] for p in lanes) / gpu.sms
        pipe_ms = 1e3 * cycles / gpu.clock_hz
        bound = max(lanes, key=lambda p: 32 * instr[p] / lanes[p])
        local = count("ldl") + count("stl")
        footprint = rec.get("stack", 0) * threads * occ  # local memory per SM
        spill = 0.0
        if local and footprint > gpu.l1_bytes and footprint * gpu.sms > gpu.l2_bytes:
            spill = local  # every spill store and reload goes to HBM
        srule = (f"; local memory {rec.get('stack', 0)} B/thread x {threads * occ} threads = "
                 f"{footprint / 1e6:.1f} MB/SM: {'HBM' if spill else 'cached'}") if local else ""
        return OpCost(f"triton.{self.kernel}", nbytes + spill, 0.0, False,
                      f"{self.kernel}: {rule}{cross}; sm_90 {regs} regs, {occ} progs/SM, {bound}-bound "
                      f"SASS{srule}", pipe_ms=pipe_ms, spill_bytes=spill, sass_instr=32 * instr["issue"],
                      sass_pipes={p: 32 * n for p, n in instr.items()})


def pipe_lanes(gpu: GPU) -> dict[str, int]:
    """Lanes per SM-clock of each pipe the SASS counts are split into."""
    return {"fma": gpu.fma_lanes, "alu": gpu.alu_lanes, "xu": gpu.xu_lanes, "issue": gpu.issue_lanes}


def occupancy(gpu: GPU, num_warps: int, regs: int, shared: int = 0) -> int:
    """Resident programs per SM: threads, registers (allocated per warp in units of 256) and shared memory."""
    threads = 32 * num_warps
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = gpu.regs_per_sm // (per_warp * num_warps)
    by_smem = int(gpu.l1_bytes - 1024) // shared if shared else 32
    return max(1, min(32, gpu.max_threads_per_sm // threads, by_regs, by_smem))


SASS_PATH = Path(__file__).resolve().parent / "data" / "sass_sm90.json"
MISSING: dict[str, dict] = {}  # launches costed without a compile record: {sass_key: spec} (bench/aot.py)


@functools.lru_cache(maxsize=1)
def sass_records() -> dict[str, dict]:
    """bench/data/sass_sm90.json: {sass_key: compile record} written by ``bench/aot.py --sass-specs``."""
    if not SASS_PATH.exists():
        return {}
    return json.loads(SASS_PATH.read_text())


def installed_triton() -> str:
    import triton

    return triton.__version__


# the version of bench/aot.py's SASS counting rule, part of every record's fingerprint: a record counted by an
# older rule is compiled and counted again (2: the divergent slow paths behind BRA.DIV are not counted)
SASS_RULE = 2


@functools.cache
def source_fingerprint(module: str, release: str) -> str:
    """What a compile record was made from, so that an edited kernel is never costed from an old compile:
    sha256 (16 hex digits) of the kernel module's source file — for fastkd's kernels every file of the kernels
    folder, since they share ``@triton.jit`` helpers — the Triton ``release`` that compiles it and the counting
    rule (:data:`SASS_RULE`). bench/aot.py
    stores it in each record (``source``); a record whose fingerprint is not the launch's counts as missing and
    is compiled again."""
    import hashlib
    import importlib.util

    origin = Path(importlib.util.find_spec(module).origin)
    files = sorted(origin.parent.glob("*.py")) if module.startswith("fastkd.kernels.") else [origin]
    h = hashlib.sha256(f"{release}|sass rule {SASS_RULE}".encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def sass_key(kernel: str, num_warps: int, constexprs: dict[str, Any]) -> str:
    """How a launch finds its sm_90 compile record (bench/aot.py --sass): kernel, warps and its upper-case
    constexpr arguments (the compile-time choices: block sizes, flags, divergence codes)."""

    def fmt(v: Any) -> str:
        v = getattr(v, "value", v)  # tl.constexpr
        return repr(v) if isinstance(v, (bool, int, float, str, type(None))) else str(v)

    items = ",".join(f"{k}={fmt(v)}" for k, v in sorted(constexprs.items()) if k.isupper())
    return f"{kernel}|{num_warps}|{items}"


def launch_spec(fn: Any, num_warps: int, raw: dict[str, Any], constexprs: list[str]) -> dict:
    """A launch as bench/aot.py --sass-specs re-creates it for the sm_90 compile: the kernel (module, name),
    num_warps, and per argument its constexpr value, tensor dtype or scalar value."""

    def arg(k: str, v: Any) -> list:
        if k in constexprs:
            v = getattr(v, "value", v)
            return ["constexpr", v if isinstance(v, (bool, int, float, str, type(None))) else str(v)]
        if isinstance(v, torch.Tensor):
            return ["tensor", str(v.dtype).removeprefix("torch.")]
        if isinstance(v, (bool, int, float, type(None))):
            return [type(v).__name__, v]
        return ["str", str(v)]

    return {"module": fn.__module__, "name": fn.__name__, "num_warps": num_warps,
            "args": {k: arg(k, v) for k, v in raw.items()}}


def _is_fake(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def _stand_in(a: Any, rows: int) -> Any:
    """A CPU tensor standing in for a meta-tensor kernel argument: the first ``rows`` rows (same strides) when
    the tensor is large, else the whole shape; floats are ones (a factor of 1 leaves in-place scaling kernels
    on their fast path, as grad_output = 1 does on the GPU), integers zeros."""
    if not isinstance(a, torch.Tensor) or not _is_fake(a):
        return a
    shape = list(a.shape)
    if a.dim() and shape[0] > rows and tensor_bytes(a) > (1 << 24):
        shape[0] = rows
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(shape, a.stride()) if s > 0)
    base = (torch.ones(span, dtype=a.dtype) if a.dtype.is_floating_point else torch.zeros(span, dtype=a.dtype))
    return base.as_strided(shape, a.stride())


def _cvt(I: Any, v: Any) -> Any:
    """The interpreter's argument conversion, plus Python floats as fp32 scalars (as a compiled launch
    specialises them; the stock interpreter leaves them Python floats, which breaks ``x.to(...)``)."""
    if isinstance(v, float):
        return I.tl.tensor(I.TensorHandle(np.array([v], dtype=np.float32), I.tl.float32), I.tl.float32)
    return I._implicit_cvt(v)


_SFU = ("exp", "exp2", "log", "log2", "sqrt", "sin", "cos")  # numpy ufuncs of the interpreter's unary ops
_SFU_WEIGHT = 8


class TritonCounter:
    """Instruments the Triton interpreter: every launch inside the context is recorded as LaunchStats.

    ``max_rows`` limits a launch to its first programs along grid axis 0 (the caller scales the counts).
    Loads and stores count active lanes × element size; distinct addresses are tracked per program.
    """

    def __init__(self, max_rows: int | None = None, triton: str | None = None):
        self.max_rows = max_rows
        self.triton = triton  # the Triton release whose sm_90 compile costs the launches (None: the installed one)
        self.launches: list[LaunchStats] = []
        self._loads: list[tuple[np.ndarray, int]] | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[TritonCounter]:
        from triton.runtime import interpreter as I

        builder = I.InterpreterBuilder
        old_load, old_store, old_call = builder.create_masked_load, builder.create_masked_store, I.GridExecutor.__call__
        counter = self

        # the cache/eviction arguments after `other` (`value` for stores) differ between Triton releases
        def load(b, ptrs, mask, other, *policy):
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            addrs = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()
            counter._record_load(np.asarray(addrs).ravel(), size, np.size(ptrs.data))
            return old_load(b, ptrs, mask, other, *policy)

        def store(b, ptrs, value, mask, *policy):
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            n = int(np.count_nonzero(mask.data)) if mask is not None else ptrs.data.size
            counter.launches[-1].store_bytes += n * size
            return old_store(b, ptrs, value, mask, *policy)

        def call(executor, *args, **kwargs):
            with _disable_current_modes():  # the interpreter's own torch calls are not the model's traffic
                if any(_is_fake(t) for t in _tensors((args, kwargs))):
                    rows = counter.max_rows or SAMPLE_ROWS
                    args = tuple(_stand_in(a, rows) for a in args)
                    kwargs = {k: _stand_in(v, rows) for k, v in kwargs.items()}
                    old_max, counter.max_rows = counter.max_rows, rows
                    try:
                        return counter._run(I, executor, args, kwargs)
                    finally:
                        counter.max_rows = old_max
                return counter._run(I, executor, args, kwargs)

        ops_old = {name: getattr(builder, name) for name in ("binary_op", "unary_op", "ternary_op", "create_fma")}

        def counted(name: str, fn: Callable) -> Callable:
            def op(b, *args):
                out = fn(b, *args)
                if counter.launches:
                    w = _SFU_WEIGHT if name == "unary_op" and getattr(args[-1], "__name__", "") in _SFU else 1
                    counter.launches[-1].alu_ops += w * np.size(out.data)
                return out

            return op

        builder.create_masked_load, builder.create_masked_store = load, store
        for name, fn in ops_old.items():
            setattr(builder, name, counted(name, fn))
        I.GridExecutor.__call__ = call
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = old_load, old_store
            for name, fn in ops_old.items():
                setattr(builder, name, fn)
            I.GridExecutor.__call__ = old_call

    def _record_load(self, addrs: np.ndarray, size: int, lanes: int) -> None:
        st = self.launches[-1]
        st.load_bytes += addrs.size * size
        st.warp_load_bytes += max(lanes, 32 * st.num_warps) * size
        if lanes >= 32 * st.num_warps:
            st.vec_load_bytes += lanes * size
        if self._loads is not None:
            self._loads.append((addrs, size))

    @staticmethod
    def _cross(seen: dict, size: int, u: np.ndarray, prog: int, st: LaunchStats) -> None:
        """Record the distinct addresses ``u`` read by program ``prog``: those an earlier program read count as
        cross-program re-reads at distance prog − (last reader); then ``prog`` becomes their last reader."""
        addrs, last = seen.get(size, (np.empty(0, np.int64), np.empty(0, np.int64)))
        u = u.astype(np.int64)
        idx = np.searchsorted(addrs, u)
        found = idx < addrs.size
        found[found] = addrs[idx[found]] == u[found]
        if found.any():
            dist, cnt = np.unique(prog - last[idx[found]], return_counts=True)
            for d, c in zip(dist.tolist(), cnt.tolist()):
                st.cross_reread[d] = st.cross_reread.get(d, 0.0) + c * size
        last = last.copy()
        last[idx[found]] = prog
        new = u[~found]
        if new.size:
            addrs = np.concatenate([addrs, new])
            last = np.concatenate([last, np.full(new.size, prog, np.int64)])
            order = np.argsort(addrs, kind="stable")
            addrs, last = addrs[order], last[order]
        seen[size] = (addrs, last)

    def _run(self, I: Any, ex: Any, args_dev: tuple, kwargs: dict) -> None:
        """GridExecutor.__call__ with per-program accounting and an optional row limit (same semantics)."""
        import inspect

        num_warps = int(kwargs.get("num_warps") or 4)
        spec = inspect.getfullargspec(ex.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
        args_hst, kwargs_hst = ex._init_args_hst(args_dev, kwargs)
        for hook in ex.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        scope = I._patch_lang(ex.fn)
        try:
            raw = inspect.getcallargs(ex.fn, *args_hst, **kwargs_hst)
            args = {k: v if k in ex.constexprs else _cvt(I, v) for k, v in raw.items()}
            grid = ex.grid(args) if callable(ex.grid) else ex.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            rows = grid[0] if self.max_rows is None else min(grid[0], self.max_rows)
            st = LaunchStats(getattr(ex.fn, "__name__", "kernel"), num_warps, grid[0], rows)
            st.sass_key = sass_key(st.kernel, num_warps, {k: raw[k] for k in ex.constexprs})
            st.spec = launch_spec(ex.fn, num_warps, raw, ex.constexprs)
            if self.triton is not None:
                st.sass_key += f"|triton={self.triton}"
                st.spec["triton"] = self.triton
            self.launches.append(st)
            I.interpreter_builder.set_grid_dim(*grid)
            seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # element size -> (sorted addrs, last program)
            for x in range(rows):
                for y in range(grid[1]):
                    for z in range(grid[2]):
                        I.interpreter_builder.set_grid_idx(x, y, z)
                        self._loads = []
                        ex.fn(**args)
                        uniq = 0
                        for size in {s for _, s in self._loads}:
                            u = np.unique(np.concatenate([a for a, s in self._loads if s == size]))
                            uniq += u.size * size
                            self._cross(seen, size, u, st.programs, st)
                        st.unique_load_bytes += uniq
                        st.max_program_bytes = max(st.max_program_bytes, uniq)
                        st.programs += 1
                        self._loads = None
        finally:
            scope.restore()
        ex._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)
