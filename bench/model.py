"""A GPU cost model measured on CPU and calibrated on published GPU runs: HBM bytes, FLOPs, SASS instructions
and a predicted time per case and provider.

``python bench/model.py [--gpu h100|h200|h100-pcie|a100] [--json] [--cases distill-fkl,...] [--rows R]``;
``python bench/model.py --calibrate`` models the published measurements of ``bench/data/published.csv`` and
prints predicted beside published. Everything here is a MODEL, NOT A MEASUREMENT: no GPU runs. One model for
every case, no per-case constant:

* **PyTorch ops** (naive providers, the fused path's chunk loop, the torch side of the Triton backends):
  every aten op is seen by :class:`TorchCounter` (a ``TorchDispatchMode``) while the provider runs on
  meta tensors at the real sizes, seen as CUDA (the code takes its CUDA branches). Bytes = the input
  tensors' footprints + the outputs' (a broadcast input counts its stored elements once; views cost 0;
  ``copy_`` reads its source and writes its destination; ``nll_loss`` reads one element per row).
  **Multi-pass ops**: PyTorch's softmax / log_softmax (so cross-entropy) read a row longer than shared
  memory (48 KB) three times forward and its grad_output twice backward (aten's SoftMax.cu); the re-reads
  are free only when the rows in flight (SMs × 2 blocks × row bytes) fit in L2 (``softmax_extra_bytes``).
  FLOPs: ``mm``/``addmm``/``bmm`` = 2·M·N·K, every other op one per element. Peak extra memory = the peak
  of live op outputs, like ``torch.cuda.max_memory_allocated`` over the inputs.
* **Triton kernels**: run for real in Triton's CPU interpreter on R sample rows at the real vocabulary,
  loads and stores instrumented (:class:`TritonCounter`): bytes = active lanes × element size. fastkd's
  custom ops are replayed on R random rows, any other launch (Liger, gradient scaling) on its first R
  programs; counts are scaled by (grid rows / R). A custom op with more than R rows is replayed on 2R rows
  as well, and each launch's counts are extrapolated from the two (:func:`extrapolate`): a part per row
  plus a fixed part counted once (the first and last units of a ticketed schedule run only some of a unit's
  phases; scaling one sample by N/R would charge them N/R times).
  **L2 rule**: a program's re-reads of its own data are counted once only if the resident programs (SMs ×
  occupancy) × the program's distinct bytes fit in L2, else every re-read is HBM traffic; a later
  program's re-read hits when (resident + distance) × distinct bytes fit. Separate launches never share L2.
  **Compute from the sm_90 SASS**: every launch is compiled for sm_90 without a GPU (``bench/aot.py
  --sass-specs``, Triton's own compiler, ``ptxas -v``, ``cuobjdump -sass``; records in
  ``bench/data/sass_sm90.json``, compiled on demand; each record carries the fingerprint of the sources and the
  Triton release it was compiled from, and a record whose fingerprint is not the launch's is compiled again:
  ``costcount.source_fingerprint``). Instructions are counted per pipe — fp32 FMA/add/mul
  at 128 lanes per SM-clock (A100: 64), integer / compare / select / min-max at 64, MUFU and conversions at
  16, every instruction one issue slot (128 lanes per SM-clock); the throughput table of the CUDA C
  Programming Guide — along the longest path through each loop iteration (a runtime branch counts its
  heavier side), plus the straight-line code along its longest path from the entry, once per warp (fewer
  when the warps load less than that path: programs that skip phases of a ticketed schedule). The loop
  code runs (the launch's global-load bytes that the straight-line code does not load) / (load bytes of one
  warp's pass) times; a spin-wait (a loop whose loads the interpreter's in-order programs satisfy at once)
  costs nothing, so waiting is not modelled. Compute time = the slowest pipe / (SMs × boost clock).
  **Occupancy** from the compile's registers, threads and shared memory (it sets the resident programs of
  the L2 rule). **Spills**: local-memory loads and stores (LDL/STL, bytes = 32 lanes × width per warp:
  local memory interleaves consecutive 32-bit words across consecutive threads, so a warp's access is fully
  coalesced, and it is cached in L1 and L2 like global memory — NVIDIA's CUDA C Programming Guide, device memory
  accesses / local memory, and Nsight's "Memory Statistics - Local") count as HBM traffic when the stack frames
  of the resident threads overflow L1 and, over all SMs, L2; otherwise they are cached and free. The spill
  volume is the compile's, and it depends on the Triton release (docs/DESIGN.md, the cost model).
  **Compiler of a published row**: each row of bench/data/published.csv names the Triton it ran on (``triton``:
  the release bundled with the PyTorch current on the run's date — Liger's data records no compiler, so this is
  inferred), and its Triton launches are costed from the compile of the closest release available here
  (:func:`published_triton`: the installed one or the project's Triton floor, ``.venv/triton-min``, installed
  by ``make test-triton-min``); records of the floor are stored under ``<key>|triton=<release>``. fastkd's
  own cases are always costed from the installed Triton. The kernel source is the installed Liger's (its
  ``_jsd_kernel`` has changed since the published runs).
  A launch without a record falls back to the interpreter's element operations (``unrecorded_kernels``).
* **Time**: ``predicted_ms = Σ_op max(bytes / (HBM_EFFICIENCY · HBM bandwidth), tensor-core FLOPs /
  (GEMM_EFFICIENCY · dense peak), other FLOPs / fp32 peak, compute)``; no launch latency, no overlap between
  ops. Datasheet figures in :data:`GPUS` (NVIDIA's H100 SXM / PCIe, H200 and A100 datasheets: bandwidth,
  dense bf16 peak, SMs, boost clock, L2). The two efficiencies are the only fitted numbers, one each for
  every case: HBM_EFFICIENCY = 0.90, the achieved fraction of datasheet bandwidth, from the memory-bound
  published rows (Liger kl_div / tvd / cross_entropy, whose predicted/published sit around 1 at 0.90);
  GEMM_EFFICIENCY = 0.80, from the GEMM-bound published rows (the Hugging Face LM-head cross-entropy on A100
  and the torch LM-head JSD on H100 SXM). ``--calibrate`` prints every published row beside its prediction
  and stores them (``bench/data/calibration.json``; tests/tooling/test_model.py holds each within ±30 %).
* ``floor_bytes``: logits cases 3·N·V·2 (read student + teacher, write the gradient once, bf16); fused /
  sparse cases the unavoidable GEMM operands. ``gemm_ms``: the time of the GEMMs the case cannot avoid
  (fused: h·Wᵀ, hₜ·Wₜᵀ, G·W, Gᵀ·h; sparse: the student's three) at the calibrated GEMM efficiency.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit: kernels run in the CPU interpreter
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

from fastkd.bench.costcount import (  # noqa: E402,F401  (re-exported: the model's public pieces)
    ASSUMED_REGS,
    GEMM_EFFICIENCY,
    GPU,
    GPUS,
    HBM_EFFICIENCY,
    MISSING,
    SAMPLE_ROWS,
    TRITON_DIRS,
    LaunchStats,
    OpCost,
    TorchCounter,
    TritonCounter,
    pipe_lanes,
    tensor_bytes,
)

# ----------------------------------------------------------------------------------------------------------
# Replay of fastkd's custom ops on sample rows (their kernels need real data: weights, ids, distributions)
# ----------------------------------------------------------------------------------------------------------


def _same_storage(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.untyped_storage()._cdata == b.untyped_storage()._cdata


def _rest(args: tuple, n: int, rows: int) -> tuple:
    """The trailing custom-op args with any per-row tensor output (the (N, 4) return_stats buffer) replaced by
    a (rows, ...) CPU stand-in of the same dtype."""
    return tuple(torch.zeros(rows, *a.shape[1:], dtype=a.dtype) if isinstance(a, torch.Tensor) and a.dim()
                 and a.shape[0] == n else a for a in args)


def _distill_sample(args: tuple, rows: int, gen: torch.Generator) -> tuple:
    """CPU stand-ins for ``fastkd::distill_rows`` args: logits ~ N(0, 2²), labels in range, weights 1."""
    s, t, labels, w, g = args[:5]
    v = s.shape[1]
    sc = (torch.randn(rows, v, generator=gen) * 2).to(s.dtype)
    tc = (torch.randn(rows, t.shape[1], generator=gen) * 2).to(t.dtype)
    lab = None if labels is None else torch.randint(0, v, (rows,), generator=gen)
    gc = None if g is None else (sc if _same_storage(g, s) else torch.empty(rows, g.shape[1], dtype=g.dtype))
    return (sc, tc, lab, torch.ones(rows, dtype=w.dtype), gc, *_rest(args[5:], s.shape[0], rows))


def _sparse_sample(args: tuple, rows: int, gen: torch.Generator) -> tuple:
    """CPU stand-ins for ``fastkd::sparse_rows`` args: a real top-K of a random teacher (+ its tail mass)."""
    s, ids, lp, tail, w, g = args[:6]
    v, k = s.shape[1], ids.shape[1]
    sc = (torch.randn(rows, v, generator=gen) * 2).to(s.dtype)
    t_lp = torch.log_softmax(torch.randn(rows, v, generator=gen) * 2, dim=-1)
    top, idc = t_lp.topk(k, dim=-1)
    tail_c = None if tail is None else torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6)).to(tail.dtype)
    gc = None if g is None else (sc if _same_storage(g, s) else torch.empty(rows, g.shape[1], dtype=g.dtype))
    return (sc, idc.to(ids.dtype), top.to(lp.dtype), tail_c, torch.ones(rows, dtype=w.dtype), gc,
            *_rest(args[6:], s.shape[0], rows))


SAMPLERS: dict[str, Callable[[tuple, int, torch.Generator], tuple]] = {
    "fastkd::distill_rows": _distill_sample,
    "fastkd::sparse_rows": _sparse_sample,
}


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.dtype, tuple(x.shape[1:]), x.stride()[1:])
    return x if isinstance(x, (int, float, str, bool, type(None))) else type(x).__name__


def extrapolate(one: OpCost, two: OpCost, r: float, gpu: GPU) -> OpCost:
    """The cost of a whole launch from two samples of it, R and 2R rows, each already scaled to the launch's N
    rows (``one`` = A(R)·N/R, ``two`` = A(2R)·N/(2R); ``r`` = R/N). With A(R) = E + R·c (c per row, E the fixed
    part), the launch costs E + N·c = 2·two − one + 2r·(one − two): the fixed part once, not N/R times.
    Bytes, FLOPs, element operations and SASS lane-instructions per pipe are extrapolated; the compute time is
    the slowest pipe of the extrapolated counts; both samples take the L2 rule with the same program footprint
    (:meth:`Model.hook`), so that a re-read is a hit or a miss in both."""

    def lin(a: float, b: float) -> float:
        return max(0.0, 2 * b - a + 2 * r * (a - b))

    pipes = {p: lin(one.sass_pipes.get(p, 0.0), n) for p, n in two.sass_pipes.items()}
    lanes = pipe_lanes(gpu)
    pipe_ms = None
    if two.pipe_ms is not None:
        pipe_ms = 1e3 * max((pipes.get(p, 0.0) / n for p, n in lanes.items()), default=0.0) / gpu.sms / gpu.clock_hz
    return OpCost(two.name, lin(one.bytes, two.bytes), lin(one.flops, two.flops), two.tensor_core,
                  two.rule + "; rows extrapolated from R and 2R sample rows", two.launches,
                  lin(one.alu_ops, two.alu_ops), pipe_ms, lin(one.spill_bytes, two.spill_bytes),
                  lin(one.sass_instr, two.sass_instr), pipes)


@dataclass
class Model:
    """Runs providers on fake CUDA tensors and returns their op costs on ``gpu``."""

    gpu: GPU
    rows: int = SAMPLE_ROWS
    triton: str | None = None  # the Triton release whose sm_90 compiles cost the launches (None: the installed one)
    _cache: dict = field(default_factory=dict)

    def hook(self, func: Any, args: tuple, kwargs: dict, out: Any) -> list[OpCost] | None:
        name = func._schema.name
        if name not in SAMPLERS:
            if func.namespace == "fastkd":
                raise NotImplementedError(f"the cost model has no sampler for custom op {name}")
            return None
        n = args[0].shape[0]
        key = (name, *(_signature(a) for a in args), _same_storage(args[0], args[5 if "sparse" in name else 4]))
        if key not in self._cache:
            # R sample rows, and 2R where the op has more rows than R: a launch's cost is taken to be a part that
            # grows with its rows plus a fixed part (the first and last units of a ticketed schedule, which run
            # only some of a unit's phases), and the two samples separate them (extrapolate())
            self._cache[key] = [self._replay(func, SAMPLERS[name], args, kwargs, r)
                                for r in ((self.rows, 2 * self.rows) if n > self.rows else (self.rows,))]
            if len(self._cache[key]) == 2:  # the L2 rule with one program's footprint for both samples: the larger
                # one's (at R = LAG rows no program of a ticketed schedule runs all its phases: a smaller footprint)
                for a, b in zip(self._cache[key][0][0], self._cache[key][1][0]):
                    a.max_program_bytes = b.max_program_bytes = max(a.max_program_bytes, b.max_program_bytes)
        samples = [[st.cost(self.gpu, n / r) for st in launches]
                   + [OpCost(o.name, o.bytes * n / r, o.flops * n / r, o.tensor_core, o.rule, alu_ops=o.alu_ops * n / r)
                      for o in torch_ops]  # (torch ops carry no SASS)
                   for r, (launches, torch_ops) in zip((self.rows, 2 * self.rows), self._cache[key])]
        if len(samples) == 1:
            return samples[0]
        one, two = samples
        if [o.name for o in one] != [o.name for o in two]:  # the op launched differently at 2R rows
            return two
        return [extrapolate(a, b, self.rows / n, self.gpu) for a, b in zip(one, two, strict=True)]

    def _replay(self, func, sampler, args, kwargs, rows: int) -> tuple[list[LaunchStats], list[OpCost]]:
        gen = torch.Generator().manual_seed(0)
        with _disable_current_modes():
            sample = sampler(args, rows, gen)
            names = list(kwargs)
            kwargs = dict(zip(names, _rest(tuple(kwargs.values()), args[0].shape[0], rows), strict=True))
            counter = self._triton
            first = len(counter.launches)
            with TorchCounter(gpu=self.gpu) as inner:
                func(*sample, **kwargs)
            for st in counter.launches[first:]:
                st.replayed = True
            return counter.launches[first:], inner.ops

    def run(self, build: Callable[[], dict[str, Any]], step: Callable[[dict[str, Any]], Any]) -> tuple[
            list[OpCost], float]:
        """(op costs, peak extra bytes) of ``step(build())`` with every tensor on the meta device, seen as CUDA."""
        self._triton = TritonCounter(triton=self.triton)
        with contextlib.ExitStack() as stack:
            for p in _gpu_patches(self.gpu):
                stack.enter_context(p)
            inputs = build()
            stack.enter_context(self._triton.active())
            counter = stack.enter_context(TorchCounter(self.hook, self.gpu))
            step(inputs)
            peak = counter.peak
        launches = [st.cost(self.gpu) for st in self._triton.launches if not st.replayed]
        return counter.ops + launches, float(peak)


def _gpu_patches(gpu: GPU) -> list[contextlib.AbstractContextManager]:
    """Make meta tensors take the code's CUDA branches: ``Tensor.is_cuda`` is True for them, free memory is
    the GPU's, and ``auto_chunk_rows`` (wherever fastkd imported it) chooses rows as on a CUDA device."""
    free = (int(gpu.mem_bytes * 0.95), int(gpu.mem_bytes))
    base_is_cuda = torch._C.TensorBase.is_cuda
    patches = [_patched(torch.Tensor, "is_cuda", property(lambda t: t.device.type == "meta"
                                                          or base_is_cuda.__get__(t))),
               _patched(torch.cuda, "mem_get_info", lambda *a, **k: free),
               _patched(torch, "equal", _equal_meta),
               _patched(torch, "is_autocast_enabled", _autocast_meta(torch.is_autocast_enabled)),
               _patched(torch, "get_autocast_dtype", _autocast_meta(torch.get_autocast_dtype)),
               _patched(torch, "autocast", _MetaAutocast)]
    import fastkd  # noqa: F401  (loads the families, which import the engine's helpers by name)
    from fastkd.core import lmhead

    cuda = torch.device("cuda")
    for fname in ("chunk_budget_mb", "auto_chunk_rows"):  # device-dependent chunk sizing: as on the GPU
        fn = getattr(lmhead, fname, None)
        if fn is None:
            continue

        def as_cuda(*a: Any, _fn: Callable = fn, **k: Any) -> Any:
            a = tuple(cuda if isinstance(x, torch.device) and x.type == "meta" else x for x in a)
            return _fn(*a, **{key: cuda if isinstance(x, torch.device) and x.type == "meta" else x
                              for key, x in k.items()})

        for mod in [m for k, m in sys.modules.items() if k.startswith("fastkd")]:
            if getattr(mod, fname, None) is fn:
                patches.append(_patched(mod, fname, as_cuda))
    return patches


_torch_equal = torch.equal


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` taking the meta device for CUDA."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cuda" if device_type == "meta" else device_type, *args, **kwargs)


def _autocast_meta(fn: Callable) -> Callable:
    """torch's autocast queries with the meta device answered for CUDA (autocast has no meta device)."""

    def query(*a: Any) -> Any:
        return fn(*("cuda" if x == "meta" else x for x in a))

    return query


def _equal_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, True for meta tensors of the same shape: peers test ``grad_output == 1`` on the host, and
    in the modelled step (the backward of a scalar loss) it is 1."""
    if a.device.type == "meta" or b.device.type == "meta":
        return a.shape == b.shape or a.numel() == b.numel() == 1
    return _torch_equal(a, b)


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ----------------------------------------------------------------------------------------------------------
# Cases (the GPU suite's sizes) and providers
# ----------------------------------------------------------------------------------------------------------


def _rand(*shape: int, dtype: torch.dtype = torch.bfloat16, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _grad_step(loss_fn: Callable[[], torch.Tensor], wrt: list[torch.Tensor]) -> None:
    loss = loss_fn()
    torch.autograd.grad(loss, wrt)


@dataclass(frozen=True)
class Case:
    name: str
    sizes: dict[str, Any]
    build: Callable[[], dict[str, Any]]
    providers: dict[str, Callable[[dict[str, Any]], Any]]
    floor_bytes: float
    gemm: Callable[[dict[str, Any]], Any] | None = None  # the GEMMs the case cannot avoid


def distill_case(div: str, n: int = 8192, v: int = 128256) -> Case:
    from fastkd.bench import bench_distill as BD

    def build() -> dict[str, Any]:
        return {"s": _rand(n, v, grad=True), "t": _rand(n, v)}

    def fastkd_(x: dict[str, Any], stats: bool = False) -> None:
        import fastkd

        def loss() -> torch.Tensor:
            out = fastkd.distill_loss(x["s"], x["t"], div, backend="triton", return_stats=stats)
            return out[0] if stats else out

        _grad_step(loss, [x["s"]])

    def naive(x: dict[str, Any]) -> None:
        _grad_step(lambda: BD.naive_loss(x["s"], x["t"], div), [x["s"]])

    def liger(x: dict[str, Any]) -> None:  # the suite's Liger provider (bench_distill._liger_loss)
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        mod = LigerKLDIVLoss(reduction="batchmean") if div == "fkl" else LigerJSD(beta=0.5)
        _grad_step(lambda: BD._liger_loss(mod, x["s"], x["t"], div), [x["s"]])

    providers = {"fastkd-triton": fastkd_, "fastkd-triton+stats": functools.partial(fastkd_, stats=True),
                 "naive": naive}
    if div in ("fkl", "jsd"):
        providers["liger"] = liger
    return Case(f"distill-{div}", {"N": n, "V": v, "dtype": "bf16"}, build, providers, 3.0 * n * v * 2)


def fused_case(div: str = "fkl", n: int = 8192, hs: int = 2048, ht: int = 4096, v: int = 128256) -> Case:
    from fastkd.bench import bench_fused_linear as BF

    def build() -> dict[str, Any]:
        return {"h": _rand(n, hs, grad=True), "W": _rand(v, hs, grad=True), "ht": _rand(n, ht), "Wt": _rand(v, ht),
                "ht2": _rand(n, ht), "Wt2": _rand(v, ht), "ht3": _rand(n, ht), "Wt3": _rand(v, ht)}

    def fastkd_(x: dict[str, Any], stats: bool = False, teachers: int = 1) -> None:
        import fastkd

        kw: dict[str, Any] = {"teacher_hidden": x["ht"], "teacher_weight": x["Wt"]}
        if teachers > 1:  # a mixture of M teachers: extra memory must not grow with M
            sfx = ["", "2", "3"][:teachers]
            kw = {"teacher_hidden": [x["ht" + k] for k in sfx], "teacher_weight": [x["Wt" + k] for k in sfx],
                  "teacher_weights": torch.full((teachers,), 1.0 / teachers, device=x["h"].device)}

        def loss() -> torch.Tensor:
            out = fastkd.fused_linear_distill_loss(x["h"], x["W"], **kw, divergence=div, backend="triton",
                                                   return_stats=stats)
            return out[0] if stats else out

        _grad_step(loss, [x["h"], x["W"]])

    def naive(x: dict[str, Any]) -> None:
        _grad_step(lambda: BF.naive_loss(x["h"], x["W"], x["ht"], x["Wt"], div), [x["h"], x["W"]])

    def liger(x: dict[str, Any]) -> None:  # Liger's fused linear JSD at β = 0 is forward KL (no fkl class)
        from liger_kernel.transformers import LigerFusedLinearJSD

        mod = LigerFusedLinearJSD(jsd_beta=0.0 if div == "fkl" else 0.5, temperature=1.0)
        _grad_step(lambda: mod(x["h"], x["W"], x["ht"], x["Wt"], None), [x["h"], x["W"]])

    def trl(x: dict[str, Any]) -> None:  # TRL DistillationTrainer's loss; generalized JSD at β = 0 is forward KL
        import trl.kernels.chunked_divergence as CD
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def project_as_on_cuda(tile, hidden_chunk, weight, bias, start, end, dtype):
            # TRL's CUDA branch of its tile projection: a bf16 GEMM written in fp32 (off CUDA it upcasts both)
            torch.mm(hidden_chunk, weight[start:end].to(dtype).t(), out_dtype=torch.float32, out=tile)
            if bias is not None:
                tile.add_(bias[start:end].float())

        def addmm_as_on_cuda(acc, a, b):  # TRL's CUDA branch of its fp32 accumulation
            if a.dtype in (torch.float16, torch.bfloat16):
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                acc.addmm_(a.float(), b.float())

        mask = torch.ones(1, n, dtype=torch.long, device=x["h"].device)
        saved = CD._use_triton, CD._project, CD._addmm_fp32
        # its Triton kernels and GEMMs as on a GPU (off CUDA it takes torch tiles and fp32 GEMMs)
        CD._use_triton, CD._project, CD._addmm_fp32 = (lambda device: True), project_as_on_cuda, addmm_as_on_cuda
        try:
            _grad_step(lambda: _chunked_divergence_loss(x["h"].unsqueeze(0), x["ht"].unsqueeze(0), x["W"], x["Wt"],
                                                        mask, 0.0 if div == "fkl" else 0.5)[0], [x["h"], x["W"]])
        finally:
            CD._use_triton, CD._project, CD._addmm_fp32 = saved

    def gemms(x: dict[str, Any]) -> None:
        g = torch.empty(n, v, device="meta", dtype=torch.bfloat16)
        with torch.no_grad():
            x["h"] @ x["W"].T, x["ht"] @ x["Wt"].T, g @ x["W"], g.T @ x["h"]

    floor = 2.0 * (n * hs + v * hs + n * ht + v * ht + n * hs + v * hs)
    return Case(f"fused-{div}", {"N": n, "Hs": hs, "Ht": ht, "V": v, "dtype": "bf16"}, build,
                {"fastkd-triton": fastkd_, "fastkd-triton+stats": functools.partial(fastkd_, stats=True),
                 "fastkd-triton-2teachers": functools.partial(fastkd_, teachers=2),
                 "fastkd-triton-3teachers": functools.partial(fastkd_, teachers=3), "naive": naive,
                 "liger": liger, "trl": trl}, floor, gemms)


def sparse_case(mode: str = "topk_tail", n: int = 8192, hs: int = 2048, v: int = 128256, k: int = 64) -> Case:
    from fastkd.bench import bench_sparse as BS

    def build() -> dict[str, Any]:
        return {"h": _rand(n, hs, grad=True), "W": _rand(v, hs, grad=True),
                "ids": torch.empty(n, k, device="meta", dtype=torch.int64),
                "lp": torch.empty(n, k, device="meta", dtype=torch.float32)}

    def fastkd_(x: dict[str, Any], stats: bool = False) -> None:
        import fastkd

        def loss() -> torch.Tensor:
            out = fastkd.fused_linear_sparse_distill_loss(x["h"], x["W"], x["ids"], x["lp"], mode=mode,
                                                          backend="triton", return_stats=stats)
            return out[0] if stats else out

        _grad_step(loss, [x["h"], x["W"]])

    def naive(x: dict[str, Any]) -> None:
        _grad_step(lambda: BS.naive_loss(x["h"], x["W"], x["ids"], x["lp"]), [x["h"], x["W"]])

    def gemms(x: dict[str, Any]) -> None:
        g = torch.empty(n, v, device="meta", dtype=torch.bfloat16)
        with torch.no_grad():
            x["h"] @ x["W"].T, g @ x["W"], g.T @ x["h"]

    floor = 2.0 * (n * hs + v * hs + n * hs + v * hs) + n * k * 12
    return Case(f"sparse-{mode}", {"N": n, "H": hs, "V": v, "K": k, "dtype": "bf16"}, build,
                {"fastkd-triton": fastkd_, "fastkd-triton+stats": functools.partial(fastkd_, stats=True),
                 "naive": naive}, floor, gemms)


def onpolicy_case(n: int = 8192, hs: int = 2048, v: int = 128256) -> Case:
    """The sampled-token on-policy loss and the generic log-probs op, fwd+bwd: one id per token."""

    def build() -> dict[str, Any]:
        return {"h": _rand(n, hs, grad=True), "W": _rand(v, hs, grad=True),
                "ids": torch.empty(n, device="meta", dtype=torch.int64),
                "t": torch.empty(n, device="meta", dtype=torch.float32),
                "s": torch.empty(n, device="meta", dtype=torch.float32)}

    def fastkd_(x: dict[str, Any], reduction: str = "mean") -> None:
        import fastkd

        def loss() -> torch.Tensor:
            out = fastkd.on_policy_distill_loss(x["h"], x["W"], x["ids"], x["t"], sampling_logprobs=x["s"],
                                                reduction=reduction)
            return out if reduction != "none" else out.sum()

        _grad_step(loss, [x["h"], x["W"]])

    def logprobs(x: dict[str, Any]) -> None:  # the generic op: its backward runs the logits GEMM again
        import fastkd

        _grad_step(lambda: fastkd.logprobs_from_hidden(x["h"], x["W"], x["ids"]).sum(), [x["h"], x["W"]])

    def naive(x: dict[str, Any]) -> None:
        def loss() -> torch.Tensor:
            lq = torch.log_softmax((x["h"] @ x["W"].T).float(), -1).gather(1, x["ids"][:, None])[:, 0]
            return (-(x["t"] - x["s"]) * torch.exp(lq - x["s"])).mean()

        _grad_step(loss, [x["h"], x["W"]])

    def gemms(x: dict[str, Any]) -> None:
        g = torch.empty(n, v, device="meta", dtype=torch.bfloat16)
        with torch.no_grad():
            x["h"] @ x["W"].T, g @ x["W"], g.T @ x["h"]

    floor = 2.0 * (n * hs + v * hs + n * hs + v * hs) + n * 20
    return Case("onpolicy-advantage", {"N": n, "H": hs, "V": v, "dtype": "bf16"}, build,
                {"fastkd": fastkd_, "fastkd-none": functools.partial(fastkd_, reduction="none"),
                 "fastkd-logprobs_from_hidden": logprobs, "naive": naive}, floor, gemms)


CASES: dict[str, Callable[[], Case]] = {
    **{f"distill-{d}": functools.partial(distill_case, d) for d in ("fkl", "rkl", "tvd", "jsd", "akl", "taid")},
    "onpolicy-advantage": onpolicy_case,
    "fused-fkl": functools.partial(fused_case, "fkl"),
    "fused-jsd": functools.partial(fused_case, "jsd"),
    "sparse-topk_tail": functools.partial(sparse_case, "topk_tail"),
    "sparse-topk": functools.partial(sparse_case, "topk"),  # what bench/gpu_suite.py measures
}


# ----------------------------------------------------------------------------------------------------------
# Calibration: the published GPU measurements of bench/data/published.csv, modelled at their shapes
# ----------------------------------------------------------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data"
PUBLISHED_CSV = DATA / "published.csv"
CALIBRATION_JSON = DATA / "calibration.json"
TOLERANCE = 0.30  # every published case: |predicted / published − 1| <= 30 %


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def published_triton(row: dict[str, Any]) -> str | None:
    """The available Triton release closest to the one a published row was compiled with (its ``triton``
    column): one of :data:`TRITON_DIRS` or the installed release (None)."""
    import triton

    want = _version(row.get("triton") or triton.__version__)
    have = {None: _version(triton.__version__), **{k: _version(k) for k in TRITON_DIRS}}
    return min(have, key=lambda k: (abs(have[k][0] - want[0]), abs(have[k][1] - want[1]), k is not None))


def published_rows() -> list[dict[str, Any]]:
    """bench/data/published.csv: one published measurement per row (source, GPU, date, Liger version, triton —
    the release inferred from the date —, kernel, provider, mode, dtype, N, V, H, published_ms)."""
    import csv

    with open(PUBLISHED_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def case_id(row: dict[str, Any]) -> str:
    h = f" H={row['H']}" if row.get("H") else ""
    return f"{row['kernel']} {row['provider']} {row['mode']} N={row['N']} V={row['V']}{h} {row['dtype']} ({row['gpu']})"


class _LigerJSDPublished(torch.autograd.Function):
    """Liger's JSD as the published runs launched it (0.3.x ``jsd_forward``: one program per row, BLOCK_SIZE =
    min(65536, next_pow2(V)), Triton's default 4 warps, an fp32 (N, V) loss summed by torch), on the
    installed ``_jsd_kernel`` (the published one computed the same loss and gradient with two exponentials
    per element where today's has four); backward returns the stored gradient (grad_output = 1)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        import triton
        from liger_kernel.ops.jsd import _jsd_kernel

        n, v = x.shape
        loss = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x)
        _jsd_kernel[(n,)](X_ptr=x, X_stride=x.stride(-2), Y_ptr=t, Y_stride=t.stride(-2), loss_ptr=loss,
                          loss_stride=loss.stride(-2), dX_ptr=dx, dX_stride=dx.stride(-2),
                          label_ptr=torch.empty(1, device=x.device), beta=0.5, n_non_ignore=n, ignore_index=-100,
                          n_cols=v, BLOCK_SIZE=min(65536, triton.next_power_of_2(v)), HAS_LABEL=False)
        ctx.save_for_backward(dx)
        return (loss.sum() / n).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (dx,) = ctx.saved_tensors
        return dx, None


def _torch_jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """The published fused_linear_jsd "torch" provider's loss (Liger's benchmark script TorchJSD)."""
    import torch.nn.functional as F

    log_p, log_q = log_p.to(torch.float), log_q.to(torch.float)
    m = torch.lerp(torch.exp(log_p), torch.exp(log_q), beta)
    loss = (beta * F.kl_div(torch.log(m), log_p, reduction="batchmean", log_target=True)
            + (1 - beta) * F.kl_div(torch.log(m), log_q, reduction="batchmean", log_target=True))
    return loss.to(torch.bfloat16)


def published_case(row: dict[str, Any]) -> tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], Any]]:
    """(build, step) of one published row as Liger's benchmark script ran it: the logits inputs are made by a
    (log_)softmax outside the timed call, so "full" also runs its backward; every "full" step accumulates the
    gradients into existing ``.grad`` s (the timing loop never clears them)."""
    n, v = int(row["N"]), int(row["V"])
    kernel, provider, full = row["kernel"], row["provider"], row["mode"] == "full"

    def finish(loss: torch.Tensor, x: dict[str, Any], wrt: list[str]) -> None:
        if full:
            grads = torch.autograd.grad(loss, [x[k] for k in wrt])
            for k, g in zip(wrt, grads, strict=True):
                x["acc_" + k].add_(g)

    if kernel in ("kl_div", "jsd", "tvd", "cross_entropy"):
        def build() -> dict[str, Any]:
            x = _rand(n, v, dtype=torch.float32, grad=True)
            inp = {"kl_div": lambda: x.log_softmax(-1), "jsd": lambda: x.log_softmax(-1),
                   "tvd": lambda: x.softmax(-1), "cross_entropy": lambda: x}[kernel]()
            tgt = (torch.empty(n, device="meta", dtype=torch.int64) if kernel == "cross_entropy"
                   else _rand(n, v, dtype=torch.float32))
            return {"x": x, "inp": inp, "tgt": tgt, "acc_x": _rand(n, v, dtype=torch.float32)}

        def step(x: dict[str, Any]) -> None:
            from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss, LigerTVDLoss

            if kernel == "kl_div":
                loss = LigerKLDIVLoss(reduction="batchmean")(x["inp"], x["tgt"])
            elif kernel == "jsd":
                loss = _LigerJSDPublished.apply(x["inp"], x["tgt"])
            elif kernel == "tvd":
                loss = LigerTVDLoss(reduction="batchmean")(x["inp"], x["tgt"])
            else:
                loss = LigerCrossEntropyLoss()(x["inp"], x["tgt"])
            finish(loss, x, ["x"])

        return build, step
    h = int(row["H"])
    if kernel == "fused_linear_cross_entropy" and provider == "huggingface":
        def build() -> dict[str, Any]:
            return {"x": _rand(n, h, grad=True), "W": _rand(v, h, grad=True), "acc_x": _rand(n, h),
                    "acc_W": _rand(v, h), "y": torch.empty(n, device="meta", dtype=torch.int64)}

        def step(x: dict[str, Any]) -> None:
            import torch.nn.functional as F

            finish(F.cross_entropy(F.linear(x["x"], x["W"]), x["y"]), x, ["x", "W"])

        return build, step
    if kernel == "fused_linear_jsd" and provider == "torch":
        def build() -> dict[str, Any]:
            return {"x": _rand(n, h, grad=True), "Ws": _rand(v, h, grad=True), "xt": _rand(n, h),
                    "Wt": _rand(v, h, grad=True), "acc_x": _rand(n, h), "acc_Ws": _rand(v, h), "acc_Wt": _rand(v, h)}

        def step(x: dict[str, Any]) -> None:
            import torch.nn.functional as F

            s = torch.log_softmax(F.linear(x["x"], x["Ws"]) / 1.0, dim=-1)
            t = torch.log_softmax(F.linear(x["xt"], x["Wt"]) / 1.0, dim=-1)
            finish(_torch_jsd(s, t), x, ["x", "Ws", "Wt"])

        return build, step
    raise ValueError(f"published row {case_id(row)}: no model of kernel {kernel!r} / provider {provider!r}")


def bound_of(r: dict[str, Any]) -> str:
    parts = {"HBM": r["mem_ms"], "compute": r["alu_ms"], "GEMM": r["gemm_ms_in"]}
    return max(parts, key=parts.get)


def calibrate_rows(rows: list[dict[str, Any]] | None = None, sample_rows: int = SAMPLE_ROWS) -> list[dict]:
    """Model every published row (at its GPU's figures); one dict per row: published and predicted ms."""
    out = []
    for row in rows if rows is not None else published_rows():
        gpu = GPUS[row["gpu"]]
        build, step = published_case(row)
        compiler = published_triton(row)
        ops, _ = Model(gpu, sample_rows, triton=compiler).run(build, step)
        r = _summarise(ops, gpu)
        pub = float(row["published_ms"])
        out.append({"case": case_id(row), "gpu": gpu.name, "published_ms": pub, "predicted_ms": r["predicted_ms"],
                    "ratio": r["predicted_ms"] / pub, "bound": bound_of(r), "mem_ms": r["mem_ms"],
                    "alu_ms": r["alu_ms"], "gemm_ms": r["gemm_ms_in"], "hbm_gb": r["hbm_bytes"] / 1e9,
                    "spill_gb": r["spill_bytes"] / 1e9, "unrecorded_kernels": r["unrecorded_kernels"],
                    "l2_rule": r["l2_rule"], "source": row["source"], "date": row["date"],
                    "triton_published": row.get("triton"), "triton_compiled": compiler or _installed_triton()})
    return out


def _installed_triton() -> str:
    import triton

    return triton.__version__


def compile_missing() -> bool:
    """Compile the launches that had no sm_90 record (bench/aot.py --sass-specs, in a process without
    TRITON_INTERPRET) into bench/data/sass_sm90.json; True when any were compiled. A launch tagged with another
    Triton release (``spec["triton"]``) is compiled by that release (its side folder first on PYTHONPATH) and
    stored under its tagged key."""
    import tempfile

    from fastkd.bench import costcount

    if not MISSING:
        return False
    groups: dict[str | None, dict[str, dict]] = {}
    for key, spec in MISSING.items():
        release = spec.get("triton")
        plain = key.removesuffix(f"|triton={release}") if release else key
        groups.setdefault(release, {})[plain] = {k: v for k, v in spec.items() if k != "triton"}
    for release, specs in groups.items():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        with tempfile.TemporaryDirectory() as tmp:
            spec_file, out = Path(tmp) / "specs.json", Path(tmp) / "records.json"
            spec_file.write_text(json.dumps(specs))
            cmd = [sys.executable, str(Path(__file__).resolve().with_name("aot.py")), "--sass-specs", str(spec_file)]
            if release is not None:
                side = TRITON_DIRS[release]
                if not (side / "triton").is_dir():
                    raise RuntimeError(f"compile records for Triton {release} need {side} (`make test-triton-min` "
                                       "installs it)")
                env["PYTHONPATH"] = os.pathsep.join([str(side), *filter(None, [env.get("PYTHONPATH")])])
                cmd += ["--sass-out", str(out)]
            print(f"compiling {len(specs)} launch(es) for sm_90 with Triton {release or _installed_triton()} "
                  "(bench/aot.py --sass-specs)", file=sys.stderr, flush=True)
            rc = subprocess.call(cmd, env=env, stdout=sys.stderr)
            if rc != 0:
                raise RuntimeError("bench/aot.py --sass-specs failed (see above)")
            if release is not None:  # merged under the tagged keys
                records = json.loads(costcount.SASS_PATH.read_text()) if costcount.SASS_PATH.exists() else {}
                records.update({f"{k}|triton={release}": {**rec, "triton": release}
                                for k, rec in json.loads(out.read_text()).items()})
                costcount.SASS_PATH.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")
    MISSING.clear()
    costcount.sass_records.cache_clear()
    return True


def within_tolerance(r: dict[str, Any]) -> bool:
    return abs(r["ratio"] - 1) <= TOLERANCE


def calibration_markdown(rows: list[dict[str, Any]]) -> str:
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    worst = max((abs(r["ratio"] - 1) for r in rows), default=0.0)
    lines = [f"### Calibration against published GPU runs (model, not measured) — {day}, commit {_commit()}", "",
             f"`python bench/model.py --calibrate`: {len(rows)} published rows of bench/data/published.csv; HBM "
             f"efficiency {HBM_EFFICIENCY}, GEMM efficiency {GEMM_EFFICIENCY}; worst |predicted/published − 1| = "
             f"{worst:.0%} (tolerance {TOLERANCE:.0%}). Triton kernels compiled by the available release "
             "closest to the published run's (published / compiled).", "",
             "| case | GPU | published ms | predicted ms | predicted/published | bound | HBM ms | compute ms "
             "| GEMM ms | spill GB | Triton |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['gpu']} | {r['published_ms']:.3f} | {r['predicted_ms']:.3f} | "
                     f"{r['ratio']:.2f} | {r['bound']} | {r['mem_ms']:.3f} | {r['alu_ms']:.3f} | "
                     f"{r['gemm_ms']:.3f} | {r['spill_gb']:.2f} | {r['triton_published']} / "
                     f"{r['triton_compiled']} |")
    return "\n".join(lines) + "\n"


def calibrate(write: bool = True) -> list[dict[str, Any]]:
    """``--calibrate``: model the published rows (compiling any launch without an sm_90 record first),
    print predicted beside published, and store the table in bench/data/calibration.json."""
    rows = calibrate_rows()
    if compile_missing():
        rows = calibrate_rows()
    if write:
        CALIBRATION_JSON.write_text(json.dumps({"commit": _commit(), "hbm_efficiency": HBM_EFFICIENCY,
                                                "gemm_efficiency": GEMM_EFFICIENCY, "tolerance": TOLERANCE,
                                                "rows": rows}, indent=1) + "\n")
    return rows


def _summarise(ops: list[OpCost], gpu: GPU) -> dict[str, Any]:
    rules = list(dict.fromkeys(o.rule for o in ops if o.rule))
    compute = sum(o.pipe_ms / 1e3 if o.pipe_ms is not None else o.alu_ops / (gpu.fp32_flops / 2) for o in ops)
    return {"hbm_bytes": sum(o.bytes for o in ops), "flops": sum(o.flops for o in ops),
            "alu_ops": sum(o.alu_ops for o in ops), "spill_bytes": sum(o.spill_bytes for o in ops),
            "sass_instr": sum(o.sass_instr for o in ops),
            "sass_pipes": {p: sum(o.sass_pipes.get(p, 0.0) for o in ops) for p in ("fma", "alu", "xu", "issue")},
            "unrecorded_kernels": sum(1 for o in ops if o.name.startswith("triton.") and o.pipe_ms is None),
            "mem_ms": 1e3 * sum(o.bytes for o in ops) / (gpu.hbm_bw * HBM_EFFICIENCY),
            "alu_ms": 1e3 * compute,
            "gemm_ms_in": 1e3 * sum(o.flops for o in ops if o.tensor_core) / (gpu.tensor_flops * GEMM_EFFICIENCY),
            "predicted_ms": sum(o.ms(gpu) for o in ops), "kernels": len(ops),
            "l2_rule": "; ".join(rules) if rules else "torch ops: inputs + outputs once each"}


def model_case(case: Case, gpu: GPU, rows: int = SAMPLE_ROWS, providers: list[str] | None = None) -> list[dict]:
    """The rows of one case: one per provider (errors become a row with status 'error: ...')."""
    model = Model(gpu, rows)
    gemm_ms = None
    if case.gemm is not None:
        ops, _ = model.run(case.build, case.gemm)
        gemm_ms = sum(o.ms(gpu) for o in ops)
    out = []
    for name, step in case.providers.items():
        if providers and not any(p in name for p in providers):
            continue
        row: dict[str, Any] = {"case": case.name, "provider": name, "gpu": gpu.name, "status": "ok",
                               "commit": _commit(),
                               "sizes": case.sizes, "floor_bytes": case.floor_bytes, "gemm_ms": gemm_ms}
        try:
            t0 = time.perf_counter()
            ops, peak = model.run(case.build, step)
            row.update(_summarise(ops, gpu), peak_extra_mb=peak / 2**20, model_s=time.perf_counter() - t0)
        except Exception as exc:  # a provider the model cannot run is reported, not fatal
            row.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc)
                       else f"error: {type(exc).__name__}")
            out.append(row)
            continue
        row["bytes_vs_floor"] = row["hbm_bytes"] / case.floor_bytes
        elems = case.sizes["N"] * case.sizes["V"]
        row["instr_per_elem"] = row["sass_instr"] / elems if row["sass_instr"] else None
        row["pipes_per_elem"] = {p: n / elems for p, n in row["sass_pipes"].items()}
        floor_ms = 1e3 * case.floor_bytes / (gpu.hbm_bw * HBM_EFFICIENCY)
        row["pct_of_floor_time"] = 100.0 * floor_ms / row["predicted_ms"] if case.gemm is None else None
        row["pct_of_floor"] = 100.0 * case.floor_bytes / row["hbm_bytes"] if row["hbm_bytes"] else None
        row["time_vs_gemm"] = row["predicted_ms"] / gemm_ms if gemm_ms else None
        out.append(row)
    for r in out:  # speed-up of each row over Liger (model)
        lig = next((x for x in out if x["provider"] == "liger" and x["status"] == "ok"), None)
        r["speedup_vs_liger"] = (lig["predicted_ms"] / r["predicted_ms"]
                                 if lig and r["status"] == "ok" and r["predicted_ms"] else None)
    return out


@functools.lru_cache(maxsize=1)
def _commit() -> str:
    """HEAD's short hash, + "-dirty" when the kernels / package / bench have uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "fastkd", "bench"],
                               capture_output=True, text=True, cwd=root, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def markdown(rows: list[dict[str, Any]], gpu: GPU) -> str:
    """The table for bench/RESULTS.md, labelled as a model."""

    def f(x: Any, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    commit = rows[0].get("commit", _commit()) if rows else _commit()
    key = next((k for k, g in GPUS.items() if g == gpu), "h200")
    lines = [f"### Cost model on {gpu.name} (model, not measured) — {day}, commit {commit}", "",
             f"`python bench/model.py --gpu {key}`: HBM {gpu.hbm_bw / 1e12:.2f} TB/s × {HBM_EFFICIENCY} achieved, "
             f"bf16 tensor {gpu.tensor_flops / 1e12:.0f} TFLOP/s × {GEMM_EFFICIENCY} achieved, {gpu.sms} SMs at "
             f"{gpu.clock_hz / 1e9:.2f} GHz, L2 {gpu.l2_bytes / 1e6:.0f} MB (published figures; the two efficiencies "
             "calibrated, `--calibrate`). predicted_ms = Σ per kernel/op of max(HBM, GEMM, compute); Triton compute "
             "from the sm_90 SASS per pipe; HBM ms / compute ms are the two sums alone. SASS instr/elem = "
             "lane-instructions issued by all Triton kernels per logit element (N·V). floor % = HBM floor time / "
             "predicted. A commit marked -dirty includes uncommitted working-tree changes.", "",
             "| case | provider | HBM GB | floor GB | bytes/floor | GFLOP | SASS instr/elem | HBM ms | compute ms | "
             "predicted ms | floor % | gemm ms | time/gemm | vs liger | peak extra MB | l2_rule |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['provider']} |" + " |" * 13 + f" {r['status']} |")
            continue
        lines.append(
            f"| {r['case']} | {r['provider']} | {r['hbm_bytes'] / 1e9:.2f} | {r['floor_bytes'] / 1e9:.2f} | "
            f"{r['bytes_vs_floor']:.2f} | {r['flops'] / 1e9:.0f} | {f(r.get('instr_per_elem'), '.0f')} | "
            f"{r['mem_ms']:.3f} | {r['alu_ms']:.3f} | {r['predicted_ms']:.3f} | {f(r.get('pct_of_floor_time'), '.0f')} "
            f"| {f(r['gemm_ms'], '.3f')} | {f(r['time_vs_gemm'], '.2f')} | {f(r['speedup_vs_liger'], '.2f')} | "
            f"{r['peak_extra_mb']:.0f} | {r['l2_rule']} |")
    return "\n".join(lines) + "\n"


def _kernels_compiled_natively() -> bool:
    """True when fastkd's kernels were defined without TRITON_INTERPRET=1 (then they cannot be counted here)."""
    mod = sys.modules.get("fastkd.kernels.distill")
    if mod is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(getattr(mod, "_distill_kernel", None), InterpretedFunction)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU cost model measured on CPU (model, not measured)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--cases", default="", help="comma list of substrings of case names")
    parser.add_argument("--providers", default="", help="comma list of substrings of provider names")
    parser.add_argument("--rows", type=int, default=SAMPLE_ROWS, help="sample rows per Triton kernel")
    parser.add_argument("--calibrate", action="store_true",
                        help="model the published GPU runs of bench/data/published.csv, print predicted beside "
                             "published, store bench/data/calibration.json")
    args = parser.parse_args(argv)
    if _kernels_compiled_natively():  # e.g. `fastkd bench --model`: fastkd was imported before this module
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, str(Path(__file__).resolve()),
                                *(sys.argv[1:] if argv is None else argv)], env=env)
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's log(0) / inf − inf in numpy
    if args.calibrate:
        rows = calibrate()
        print(json.dumps(rows, indent=1, default=str) if args.json else calibration_markdown(rows))
        return 0 if all(within_tolerance(r) for r in rows) else 1
    gpu = GPUS[args.gpu]
    wanted = [w for w in args.cases.split(",") if w]
    rows: list[dict[str, Any]] = []
    for name, make in CASES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        case_rows = model_case(make(), gpu, args.rows, [p for p in args.providers.split(",") if p] or None)
        if compile_missing():  # launches without an sm_90 record: compiled now, the case modelled again
            case_rows = model_case(make(), gpu, args.rows, [p for p in args.providers.split(",") if p] or None)
        rows.extend(case_rows)
        if not args.json:
            print(f"modelled {name}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(markdown(rows, gpu))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
