"""A GPU cost model measured on CPU: HBM bytes, FLOPs and a roofline time per case and provider.

``python bench/model.py [--gpu h100|h200] [--json] [--cases distill-fkl,...] [--rows R]``. Everything here is
a MODEL, NOT A MEASUREMENT: no GPU runs. How each number is obtained:

* **PyTorch ops** (naive providers, the fused path's chunk loop, the torch side of the Triton backends):
  every aten op is seen by :class:`TorchCounter` (a ``TorchDispatchMode``) while the provider runs on
  ``FakeTensor`` s placed on a fake ``cuda`` device at the real sizes (no data, no GPU: the code takes its
  CUDA branches, e.g. ``mm(out_dtype=fp32)`` and the in-place gradient scaling). Bytes = the input tensors'
  footprints + the outputs' (a broadcast input counts its stored elements once; views cost 0; ``copy_``
  reads its source and writes its destination: a copy moves 2× its bytes). FLOPs: ``mm``/``addmm``/``bmm``
  = 2·M·N·K (+ M·N for the add), every other op one FLOP per output element (per input element for
  reductions). Peak extra memory = the peak of live op outputs (FakeTensor lifetimes), like
  ``torch.cuda.max_memory_allocated`` over the inputs.
* **Triton kernels**: run for real in Triton's CPU interpreter on R sample rows at the real vocabulary,
  with the interpreter's loads and stores instrumented (:class:`TritonCounter`): bytes = active (unmasked)
  lanes × element size; a masked-off lane moves nothing. fastkd's custom ops (``fastkd::distill_rows``,
  ``fastkd::sparse_rows``) are replayed on R random rows (logits ~ N(0, 2²), weights 1, a real top-K
  teacher), any other launch (Liger, gradient scaling) on its first R programs of grid axis 0 with
  buffers of the same strides; the counts are scaled by (grid rows / R) — rows are independent.
  **L2 rule** (column ``l2_rule``): a program's re-reads of its own data are counted once only if the
  schedule bounds the bytes in flight below the L2 size — resident programs (SMs × occupancy; occupancy
  from num_warps assuming 64 registers/thread) × the program's distinct bytes ≤ L2 — else every re-read
  is HBM traffic. Separate launches are counted independently (no L2 reuse across launches).
  Compute of Triton kernels (column ``alu_ops``): every element the interpreter's arithmetic, compare and
  select ops produce, one lane-instruction each (exp / log / sqrt weighted 8: the SFU), so a kernel that
  is instruction-bound (AKL's bisection, an O(V·K) membership test) shows it; latency and occupancy are not
  modelled.
* **Roofline**: ``predicted_ms = Σ_op max(bytes / HBM bandwidth, flops / peak, alu_ops / (fp32 peak / 2))``
  with the published H100 SXM / H200 figures (:data:`GPUS`): bf16/fp16 matmuls at the dense tensor-core
  peak, other FLOPs at the fp32 non-tensor peak, ALU ops at one per lane per clock. No launch latency, no
  overlap between ops.
* ``floor_bytes``: logits cases 3·N·V·2 (read student + teacher, write the gradient once, bf16); fused /
  sparse cases the unavoidable GEMM operands (hidden states and weights read, their gradients written).
  ``gemm_ms``: roofline time of the GEMMs the case cannot avoid (fused: h·Wᵀ, hₜ·Wₜᵀ, G·W, Gᵀ·h; sparse:
  the student's three).
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
    GPU,
    GPUS,
    SAMPLE_ROWS,
    LaunchStats,
    OpCost,
    TorchCounter,
    TritonCounter,
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


@dataclass
class Model:
    """Runs providers on fake CUDA tensors and returns their op costs on ``gpu``."""

    gpu: GPU
    rows: int = SAMPLE_ROWS
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
            self._cache[key] = self._replay(func, SAMPLERS[name], args, kwargs)
        launches, torch_ops = self._cache[key]
        f = n / self.rows
        return ([st.cost(self.gpu, f) for st in launches]
                + [OpCost(o.name, o.bytes * f, o.flops * f, o.tensor_core, alu_ops=o.alu_ops * f) for o in torch_ops])

    def _replay(self, func, sampler, args, kwargs) -> tuple[list[LaunchStats], list[OpCost]]:
        gen = torch.Generator().manual_seed(0)
        with _disable_current_modes():
            sample = sampler(args, self.rows, gen)
            names = list(kwargs)
            kwargs = dict(zip(names, _rest(tuple(kwargs.values()), args[0].shape[0], self.rows), strict=True))
            counter = self._triton
            first = len(counter.launches)
            with TorchCounter() as inner:
                func(*sample, **kwargs)
            for st in counter.launches[first:]:
                st.replayed = True
            return counter.launches[first:], inner.ops

    def run(self, build: Callable[[], dict[str, Any]], step: Callable[[dict[str, Any]], Any]) -> tuple[
            list[OpCost], float]:
        """(op costs, peak extra bytes) of ``step(build())`` with every tensor on the meta device, seen as CUDA."""
        self._triton = TritonCounter()
        with contextlib.ExitStack() as stack:
            for p in _gpu_patches(self.gpu):
                stack.enter_context(p)
            inputs = build()
            stack.enter_context(self._triton.active())
            counter = stack.enter_context(TorchCounter(self.hook))
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
               _patched(torch, "equal", _equal_meta)]
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


def distill_case(div: str, n: int = 8192, v: int = 131072) -> Case:
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
        if teachers > 1:  # a mixture of M teachers (issue 16): extra memory must not grow with M
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

    def gemms(x: dict[str, Any]) -> None:
        g = torch.empty(n, v, device="meta", dtype=torch.bfloat16)
        with torch.no_grad():
            x["h"] @ x["W"].T, x["ht"] @ x["Wt"].T, g @ x["W"], g.T @ x["h"]

    floor = 2.0 * (n * hs + v * hs + n * ht + v * ht + n * hs + v * hs)
    return Case(f"fused-{div}", {"N": n, "Hs": hs, "Ht": ht, "V": v, "dtype": "bf16"}, build,
                {"fastkd-triton": fastkd_, "fastkd-triton+stats": functools.partial(fastkd_, stats=True),
                 "fastkd-triton-2teachers": functools.partial(fastkd_, teachers=2),
                 "fastkd-triton-3teachers": functools.partial(fastkd_, teachers=3), "naive": naive,
                 "liger": liger}, floor, gemms)


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


CASES: dict[str, Callable[[], Case]] = {
    "distill-fkl": functools.partial(distill_case, "fkl"),
    "distill-jsd": functools.partial(distill_case, "jsd"),
    "distill-akl": functools.partial(distill_case, "akl"),
    "fused-fkl": functools.partial(fused_case, "fkl"),
    "sparse-topk_tail": functools.partial(sparse_case, "topk_tail"),
    "sparse-topk": functools.partial(sparse_case, "topk"),  # what bench/gpu_suite.py measures
}


def _summarise(ops: list[OpCost], gpu: GPU) -> dict[str, Any]:
    rules = list(dict.fromkeys(o.rule for o in ops if o.rule))
    return {"hbm_bytes": sum(o.bytes for o in ops), "flops": sum(o.flops for o in ops),
            "alu_ops": sum(o.alu_ops for o in ops), "mem_ms": 1e3 * sum(o.bytes for o in ops) / gpu.hbm_bw,
            "alu_ms": 1e3 * sum(o.alu_ops for o in ops) / (gpu.fp32_flops / 2),
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
    lines = [f"### Cost model on {gpu.name} (model, not measured) — {day}, commit {commit}", "",
             f"`python bench/model.py --gpu {'h100' if 'H100' in gpu.name else 'h200'}`: HBM {gpu.hbm_bw / 1e12:.2f} "
             f"TB/s, bf16 tensor {gpu.tensor_flops / 1e12:.0f} TFLOP/s, fp32 {gpu.fp32_flops / 1e12:.0f} TFLOP/s, "
             f"L2 {gpu.l2_bytes / 1e6:.0f} MB, {gpu.sms} SMs (published figures). predicted_ms = Σ per kernel/op "
             "of max(bytes/BW, flops/peak, ALU ops/(fp32 peak/2)); Triton bytes and element operations counted in "
             "the interpreter on sample rows and scaled; HBM ms / ALU ms are the two sums alone. A commit marked "
             "-dirty includes uncommitted working-tree changes.", "",
             "| case | provider | HBM GB | floor GB | bytes/floor | GFLOP | G ALU ops | HBM ms | ALU ms | predicted ms "
             "| gemm ms | time/gemm | vs liger | peak extra MB | l2_rule |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['provider']} |" + " |" * 12 + f" {r['status']} |")
            continue
        lines.append(
            f"| {r['case']} | {r['provider']} | {r['hbm_bytes'] / 1e9:.2f} | {r['floor_bytes'] / 1e9:.2f} | "
            f"{r['bytes_vs_floor']:.2f} | {r['flops'] / 1e9:.0f} | {r['alu_ops'] / 1e9:.0f} | {r['mem_ms']:.3f} | "
            f"{r['alu_ms']:.3f} | {r['predicted_ms']:.3f} | {f(r['gemm_ms'], '.3f')} "
            f"| {f(r['time_vs_gemm'], '.2f')} | {f(r['speedup_vs_liger'], '.2f')} | {r['peak_extra_mb']:.0f} | "
            f"{r['l2_rule']} |")
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
    args = parser.parse_args(argv)
    if _kernels_compiled_natively():  # e.g. `fastkd bench --model`: fastkd was imported before this module
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, str(Path(__file__).resolve()),
                                *(sys.argv[1:] if argv is None else argv)], env=env)
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's log(0) / inf − inf in numpy
    gpu = GPUS[args.gpu]
    wanted = [w for w in args.cases.split(",") if w]
    rows: list[dict[str, Any]] = []
    for name, make in CASES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        rows.extend(model_case(make(), gpu, args.rows, [p for p in args.providers.split(",") if p] or None))
        if not args.json:
            print(f"modelled {name}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(markdown(rows, gpu))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
