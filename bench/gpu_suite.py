"""The whole GPU benchmark suite in one command: ``python bench/gpu_suite.py`` (on a CUDA device).

Cases (docs/DESIGN.md GPU targets), each fwd+bwd (mode "full") unless noted, loss = mean over tokens. Every
fastkd op also runs as ``fastkd-cuda`` (backend="cuda", the C++/CUDA extension), skipped with the
backend's own reasons (``fastkd.core.registry.select``) where it cannot run.

* ``distill-<div>`` for fkl / rkl / jsd / tvd: N=8192, V=128256, bf16 logits. Providers: fastkd-triton,
  fastkd-cuda, PyTorch eager ("naive"), torch.compile, Liger-Kernel (LigerKLDIVLoss / LigerJSD, when
  importable; Liger's TVD takes probabilities, not logits: skipped), and for tvd "fastkd-triton-8w", its
  kernel at 8 warps (the default's 4 were chosen by the cost model, which does not model occupancy).
  Derived: achieved GB/s against the floor (read both logits once + write the gradient once, 3·N·V·2 bytes)
  and that floor's share of the measured device copy bandwidth (``dst.copy_(src)``).
* ``fused-<div>`` for fkl / jsd: ``fastkd.fused_linear_distill_loss`` with N=8192, Hs=2048, Ht=4096,
  V=128256, bf16, vs Liger's chunked LigerFusedLinearJSD (jsd) and the four GEMMs alone ("matmuls").
  Derived: time / GEMMs, speed-up vs liger.
* ``sparse-fkl-topk``: ``fastkd.fused_linear_sparse_distill_loss`` (top-K=64 teacher, fkl), N=8192,
  H=2048, V=128256, bf16; fastkd-triton / -torch / -cuda vs "student-matmuls" (h Wᵀ, G W, Gᵀ h alone),
  "dense-fused" (the dense teacher through fused_linear_distill_loss) and "naive". Derived: time /
  student GEMMs (target ≤ 1.1), speed-up vs dense-fused and vs naive. Error: loss, grad_h rows and
  grad_W rows.
* ``sinkhorn`` (mode "fwd"): ``fastkd.sinkhorn`` on points x, y (B=64, n=m=1024, d=2, ‖x−y‖²),
  eps=0.05, exactly 200 iterations (tol=0); fastkd-triton / -torch / -cuda vs POT
  ``ot.batch.solve_batch`` (log_sinkhorn, torch backend, on the same device; cost built in the step)
  and GeomLoss ``SamplesLoss("sinkhorn", backend="tensorized")`` (timed only, unchecked). Derived:
  speed-up vs POT (target ≥ 10) and vs GeomLoss (target ≥ 2). Error: ⟨P, C⟩ vs float64.

Every row: median / p20 / p80 ms (CUDA events after warmup, many repetitions; bench/harness.py), peak
extra memory (``torch.cuda.max_memory_allocated`` over the allocation before the iteration), and max
|error| against a float64 reference on a slice (the loss over all tokens, the gradient of the first
``REF_ROWS`` rows; the reference is computed chunk by chunk on the device). Results: a table, then
``bench/results/gpu_suite.{csv,json}`` (harness rows) and ``gpu_suite_summary.{csv,json}`` (derived).

Extending: append a :class:`SuiteCase` to :data:`SUITE` (or call :func:`add_case`) — a name, a builder
``(device, dry: bool) -> harness.Case`` and optional ``floor_bytes`` / ``gemm_provider`` /
``speedup_vs`` ((label, baseline provider) pairs → summary column ``speedup_vs_<label>``).

``--dry-run``: every case at tiny sizes on the CPU (Triton in its interpreter, no memory measurement;
torch.compile, Liger and the cuda backend skipped with reasons; POT and GeomLoss run on CPU tensors,
Sinkhorn with 20 iterations) — a smoke test of the whole suite for CI (~7 s on a 2-core machine). Its
timings mean nothing (the derived GB/s and ratios are left blank).

Trimmed runs (``make gpu-check``): ``--no-compile`` skips torch.compile; ``--budget`` seconds of timing
per measurement; ``--time-cap`` seconds in all (cases not started by then are listed as skipped); each
case's rows are appended to the results files as soon as the case finishes; ``--model FILE`` (the JSON of
``python bench/model.py --json``; ``model_h100.json`` beside it is taken on an H100) prints each case's
measured times next to the calibrated cost model's prediction and rewrites ``gpu_suite_vs_model.md`` in
``--out`` (the table bench/RESULTS.md takes: device, date, commit) as each case finishes.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastkd.bench import bench_distill as BD  # noqa: E402
from fastkd.bench import bench_fused_linear as BF  # noqa: E402
from fastkd.bench import bench_sparse as BS  # noqa: E402
from fastkd.bench.harness import (  # noqa: E402
    RESULTS_DIR,
    Case,
    Provider,
    Skip,
    Step,
    autograd_step,
    print_table,
    run_cases,
    write_results,
)

REF_ROWS = 64  # gradient rows compared with the float64 reference
FASTKD_BACKENDS = ("triton", "cuda")  # fastkd backends measured in the distill / fused cases


@dataclass(frozen=True)
class SuiteCase:
    """One suite entry: ``build(device, dry)`` returns the harness Case (tiny sizes when ``dry``)."""

    name: str
    build: Callable[[torch.device, bool], Case]
    floor_bytes: Callable[[dict[str, Any]], float] | None = None  # HBM floor of one iteration, from sizes
    gemm_provider: str | None = None  # provider whose time is the GEMM floor
    speedup_vs: tuple[tuple[str, str], ...] = (("liger", "liger"),)  # (column label, baseline provider)


# -------------------------------------------------------------------------------------------------------
# Shared pieces: sliced outputs (compared with a sliced reference), fastkd providers that also run in the
# Triton interpreter for --dry-run.
# -------------------------------------------------------------------------------------------------------


def _slice_outputs(outputs: Any, keep: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """(loss, g1, g2, ...) → (loss, g_k[:REF_ROWS] for k in keep): views, so timing is unaffected."""
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return (outs[0], *(outs[k][:REF_ROWS] for k in keep))


def _sliced_run(run: Callable[..., Any], keep: tuple[int, ...], *args: Any) -> tuple[torch.Tensor, ...]:
    return _slice_outputs(run(*args), keep)


def sliced(setup: Callable[[dict[str, Any], str], Any], keep: tuple[int, ...]) -> Callable[..., Step]:
    """Wrap a provider ``setup`` so its step returns the loss and the first REF_ROWS rows of the grads
    numbered ``keep`` (1 = first gradient)."""
    return functools.partial(_sliced_setup, setup, keep)


def _sliced_setup(setup, keep, inputs, mode):
    if mode != "full":
        raise Skip("the GPU suite measures fwd+bwd (mode 'full')")
    step = setup(inputs, mode)
    if isinstance(step, Step):
        return Step(run=functools.partial(_sliced_run, step.run, keep), before=step.before)
    return functools.partial(_sliced_run, step, keep)


def _no_compile(inputs: dict[str, Any], mode: str) -> Any:
    raise Skip("torch.compile is not run in --dry-run")


def _compile_not_asked(inputs: dict[str, Any], mode: str) -> Any:
    raise Skip("torch.compile not asked for (--compile): cold compiles take minutes")


COMPILE = {"on": True}  # main() sets it from --compile (default on, off in make gpu-check)


def _compile_setup(setup: Callable[..., Any], dry: bool) -> Callable[..., Any]:
    if dry:
        return _no_compile
    return setup if COMPILE["on"] else _compile_not_asked


def require_backend(op: str, backend: str, **probe: Any) -> None:
    """Raise :class:`Skip` (the backend's own reasons) unless fastkd's ``backend`` can run ``op`` on
    tensors like ``probe`` (same device and dtype; ``fastkd.core.registry.select`` checks them)."""
    try:
        import fastkd.distill.op  # noqa: F401  (each op module declares its backends)
        import fastkd.ot.sinkhorn  # noqa: F401
        import fastkd.sparse.op  # noqa: F401
        from fastkd.core.registry import select

        select(op, backend, **probe)
    except Exception as exc:  # BackendUnavailableError lists every reason
        raise Skip(f"{type(exc).__name__}: {exc}") from exc


# ---- distill on logits -----------------------------------------------------------------------------------


def distill_reference(inputs: dict[str, Any], *, divergence: str, chunk: int = 512) -> tuple[torch.Tensor,
                                                                                               ...]:
    """float64 (mean loss over all rows, gradient of the first REF_ROWS rows), chunked on the device."""
    from fastkd import reference as R

    s, t = inputs["student"].detach(), inputs["teacher"]
    n = s.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=s.device)
    grad = None
    for i in range(0, n, chunk):
        sc = s[i:i + chunk].double().requires_grad_(i < REF_ROWS)
        part = R.per_token(sc, t[i:i + chunk].double(), divergence).sum() / n
        if i < REF_ROWS:
            (g,) = torch.autograd.grad(part, [sc])
            grad = g[:REF_ROWS] if grad is None else torch.cat([grad, g])[:REF_ROWS]
        total += part.detach()
    return total, grad


def _distill_fastkd(s, t, divergence, backend):
    import fastkd

    return fastkd.distill_loss(s, t, divergence, backend=backend)


def _distill_fastkd_warps(s, t, divergence, warps):
    from fastkd.distill import triton_impl as TD

    with TD.override_config(num_warps=warps):  # the kernel writes the gradient in forward
        return _distill_fastkd(s, t, divergence, "triton")


def setup_distill_fastkd(inputs: dict[str, Any], mode: str, *, divergence: str, backend: str) -> Any:
    s, t = inputs["student"], inputs["teacher"]
    require_backend("distill", backend, student=s.detach(), teacher=t, params=None)
    return autograd_step(functools.partial(_distill_fastkd, s, t, divergence, backend), [s], mode)


def setup_distill_warps(inputs: dict[str, Any], mode: str, *, divergence: str, warps: int) -> Any:
    """The Triton kernel at its default block with ``warps`` warps: tvd's default (8192, 4) was chosen by the
    cost model, which does not model occupancy (12 warps per SM where (8192, 8) has 24), so the suite times
    both."""
    s, t = inputs["student"], inputs["teacher"]
    require_backend("distill", "triton", student=s.detach(), teacher=t, params=None)
    return autograd_step(functools.partial(_distill_fastkd_warps, s, t, divergence, warps), [s], mode)


def distill_case(divergence: str, device: torch.device, dry: bool) -> Case:
    n, v = (16, 300) if dry else (8192, 128256)
    comp = _compile_setup(functools.partial(BD.setup_compile, divergence=divergence), dry)
    providers = [
        Provider("naive", sliced(functools.partial(BD.setup_naive, divergence=divergence), (1,))),
        Provider("torch.compile", sliced(comp, (1,)), warmup_in_child=True),
        *(Provider(f"fastkd-{b}",
                   sliced(functools.partial(setup_distill_fastkd, divergence=divergence, backend=b), (1,)))
          for b in FASTKD_BACKENDS),
        Provider("liger", sliced(functools.partial(BD.setup_liger, divergence=divergence), (1,))),
    ]
    if divergence == "tvd":
        providers.append(Provider("fastkd-triton-8w", sliced(
            functools.partial(setup_distill_warps, divergence=divergence, warps=8), (1,))))
    return Case(family="gpu_suite", op="distill_loss",
                sizes={"N": n, "V": v, "dtype": "bf16", "div": divergence},
                make_inputs=functools.partial(BD.make_inputs, n=n, v=v, dtype="bf16"),
                reference=functools.partial(distill_reference, divergence=divergence),
                providers=providers, baseline="naive")


def distill_floor_bytes(sizes: dict[str, Any]) -> float:
    return 3.0 * sizes["N"] * sizes["V"] * 2  # read student + teacher, write the gradient (bf16)


# ---- fused LM head ---------------------------------------------------------------------------------------


def fused_reference(inputs: dict[str, Any], *, divergence: str, chunk: int = 512) -> tuple[torch.Tensor,
                                                                                             ...]:
    """float64 (mean loss over all rows, grad of the student hidden for the first REF_ROWS rows)."""
    from fastkd import reference as R

    h, w = inputs["h"].detach(), inputs["W"].detach().double()
    ht, wt = inputs["ht"], inputs["Wt"].double()
    n = h.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    grad = None
    for i in range(0, n, chunk):
        hc = h[i:i + chunk].double().requires_grad_(i < REF_ROWS)
        part = R.per_token(hc @ w.T, ht[i:i + chunk].double() @ wt.T, divergence).sum() / n
        if i < REF_ROWS:
            (g,) = torch.autograd.grad(part, [hc])
            grad = g[:REF_ROWS] if grad is None else torch.cat([grad, g])[:REF_ROWS]
        total += part.detach()
    return total, grad


def _fused_fastkd(inputs, divergence, backend):
    import fastkd

    return fastkd.fused_linear_distill_loss(inputs["h"], inputs["W"], inputs["ht"], inputs["Wt"],
                                            divergence=divergence, backend=backend)


def setup_fused_fastkd(inputs: dict[str, Any], mode: str, *, divergence: str, backend: str) -> Any:
    """``fastkd.fused_linear_distill_loss`` on ``backend`` ("auto" is not probed: it always runs)."""
    if backend != "auto":
        probe = inputs["h"].detach()[:1, :1]
        require_backend("distill", backend, student=probe, teacher=probe, params=None)
    return autograd_step(functools.partial(_fused_fastkd, inputs, divergence, backend),
                         [inputs["h"], inputs["W"]], mode)


def fused_case(divergence: str, device: torch.device, dry: bool) -> Case:
    n, h, ht, v = (16, 32, 48, 300) if dry else (8192, 2048, 4096, 128256)
    comp = _compile_setup(functools.partial(BF.setup_compile, divergence=divergence), dry)
    providers = [
        Provider("naive", sliced(functools.partial(BF.setup_naive, divergence=divergence), (1,))),
        Provider("torch.compile", sliced(comp, (1,)), warmup_in_child=True),
        Provider("matmuls", BF.setup_matmuls, checked=False),
        *(Provider(f"fastkd-{b}",
                   sliced(functools.partial(setup_fused_fastkd, divergence=divergence, backend=b), (1,)))
          for b in FASTKD_BACKENDS),
        Provider("liger", sliced(functools.partial(BF.setup_liger, divergence=divergence), (1,))),
    ]
    return Case(family="gpu_suite", op="fused_linear_distill_loss",
                sizes={"N": n, "H": h, "Ht": ht, "V": v, "dtype": "bf16", "div": divergence},
                make_inputs=functools.partial(BF.make_inputs, n=n, h=h, ht=ht, v=v, dtype="bf16"),
                reference=functools.partial(fused_reference, divergence=divergence),
                providers=providers, baseline="naive")


# ---- sparse (top-K teacher) fused LM head ----------------------------------------------------------------


def sparse_reference(inputs: dict[str, Any], *, chunk: int = 512) -> tuple[torch.Tensor, ...]:
    """float64 (mean top-K fkl over all rows, grad_h of the first REF_ROWS rows, grad_W of the first
    REF_ROWS vocabulary rows), chunked on the device: per chunk z = h Wᵀ, G = ∂loss/∂z, then
    grad_h[:R] = G[:R] W and grad_W[:R] = Σ_chunks G[:, :R]ᵀ h."""
    from fastkd.sparse.reference import sparse_distill_loss

    h, w = inputs["h"].detach(), inputs["W"].detach().double()
    ids, lp = inputs["ids"], inputs["lp"].double()
    n = h.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    grad_w = torch.zeros_like(w[:REF_ROWS])
    grad_h = None
    for i in range(0, n, max(chunk, REF_ROWS)):
        hc = h[i:i + chunk].double()
        z = (hc @ w.T).requires_grad_(True)
        part = sparse_distill_loss(z, ids[i:i + chunk], lp[i:i + chunk]).sum() / n
        (gz,) = torch.autograd.grad(part, [z])
        if grad_h is None:
            grad_h = gz[:REF_ROWS] @ w
        grad_w += gz[:, :REF_ROWS].T @ hc
        total += part.detach()
    return total, grad_h, grad_w


def _sparse_fastkd(inputs, backend):
    import fastkd

    return fastkd.fused_linear_sparse_distill_loss(inputs["h"], inputs["W"], inputs["ids"], inputs["lp"],
                                                   backend=backend)


def setup_sparse_fastkd(inputs: dict[str, Any], mode: str, *, backend: str) -> Any:
    probe = inputs["h"].detach()[:1, :1]
    require_backend("sparse", backend, student=probe, ids=inputs["ids"][:1], params=None)
    return autograd_step(functools.partial(_sparse_fastkd, inputs, backend), [inputs["h"], inputs["W"]], mode)


def sparse_case(device: torch.device, dry: bool) -> Case:
    """Top-K (K=64) fkl through the LM head, fwd+bwd; "student-matmuls" = h Wᵀ, G W, Gᵀ h alone and
    "dense-fused" = the dense teacher (ht, Wt with H columns) through fused_linear_distill_loss (auto
    backend: Triton on CUDA), not the same loss (unchecked)."""
    n, h, v, k = (16, 32, 300, 8) if dry else (8192, 2048, 128256, 64)
    providers = [
        Provider("naive", sliced(BS.setup_naive, (1, 2))),
        Provider("student-matmuls", BS.setup_matmuls, checked=False),
        Provider("dense-fused", functools.partial(setup_fused_fastkd, divergence="fkl", backend="auto"),
                 checked=False),
        *(Provider(f"fastkd-{b}", sliced(functools.partial(setup_sparse_fastkd, backend=b), (1, 2)))
          for b in ("triton", "torch", "cuda")),
    ]
    return Case(family="gpu_suite", op="fused_linear_sparse_distill_loss",
                sizes={"N": n, "H": h, "V": v, "K": k, "dtype": "bf16", "div": "fkl"},
                make_inputs=functools.partial(BS.make_inputs, n=n, h=h, v=v, k=k, dtype="bf16"),
                reference=sparse_reference, providers=providers, baseline="naive")


# ---- batched Sinkhorn on point clouds --------------------------------------------------------------------


def sinkhorn_inputs(device: torch.device, seed: int, *, bsz: int, n: int, d: int) -> dict[str, Any]:
    """x ~ U[0,1]^d, y ~ U[0.25,1.25]^d, (B, n, d) fp32 (bench/bench_sinkhorn.py's problem, points only)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(bsz, n, d, generator=g)
    y = torch.rand(bsz, n, d, generator=g) + 0.25
    return {"x": x.to(device), "y": y.to(device)}


def sinkhorn_reference(inputs: dict[str, Any], *, eps: float, iters: int) -> tuple[torch.Tensor]:
    """float64 ⟨P, C⟩ (B,) after exactly ``iters`` log-domain iterations on C = ‖x − y‖², uniform a, b."""
    from fastkd.ot import reference as R

    x, y = inputs["x"].double(), inputs["y"].double()
    bsz, n, m = x.shape[0], x.shape[1], y.shape[1]
    a = torch.full((bsz, n), 1.0 / n, dtype=torch.float64, device=x.device)
    b = torch.full((bsz, m), 1.0 / m, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        return (R.sinkhorn(a, b, R.pairwise_cost(x, y), eps, iters)["value"],)


def _sinkhorn_fastkd(inputs, backend, eps, iters):
    import fastkd

    return fastkd.sinkhorn(x=inputs["x"], y=inputs["y"], eps=eps, max_iter=iters, tol=0,
                           backend=backend).value


def setup_sinkhorn_fastkd(inputs: dict[str, Any], mode: str, *, backend: str, eps: float,
                          iters: int) -> Any:
    require_backend("sinkhorn", backend, x=inputs["x"], y=inputs["y"], params=None)
    return functools.partial(_sinkhorn_fastkd, inputs, backend, eps, iters)


def _sinkhorn_pot(inputs, eps, iters):
    import ot.batch

    cost = ot.batch.dist_batch(inputs["x"], inputs["y"])  # ‖x − y‖², inside the timed step as fastkd's
    return ot.batch.solve_batch(cost, reg=eps, method="log_sinkhorn", max_iter=iters, tol=0,
                                grad="detach").value_linear


def setup_sinkhorn_pot(inputs: dict[str, Any], mode: str, *, eps: float, iters: int) -> Any:
    try:
        import ot.batch  # noqa: F401
    except ImportError as exc:
        raise Skip(f"POT with ot.batch is not installed ({exc})") from exc
    return functools.partial(_sinkhorn_pot, inputs, eps, iters)


def _sinkhorn_geomloss(loss, inputs):
    return (loss(inputs["x"], inputs["y"]),)


def setup_sinkhorn_geomloss(inputs: dict[str, Any], mode: str, *, eps: float, iters: int) -> Any:
    """GeomLoss tensorized: cost ‖x − y‖²/2 with ε = blur², so blur = √(ε/2) is fastkd's ε on ‖x − y‖²;
    its ε-annealing from the diameter down to blur takes ≈ log(diam/blur)/log(1/scaling) iterations, so
    scaling is chosen for ``iters`` of them. Timed only: neither the iterations nor the value (a dual
    objective) are fastkd's."""
    try:
        from geomloss import SamplesLoss
    except ImportError as exc:
        raise Skip(f"geomloss is not installed ({exc})") from exc
    x, y = inputs["x"], inputs["y"]
    lo = torch.minimum(x.amin((0, 1)), y.amin((0, 1)))
    hi = torch.maximum(x.amax((0, 1)), y.amax((0, 1)))
    blur = math.sqrt(eps / 2)
    diameter = float((hi - lo).norm())
    scaling = min(max((blur / diameter) ** (1.0 / iters), 0.5), 0.999)
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=False, backend="tensorized")
    return functools.partial(_sinkhorn_geomloss, loss, inputs)


def sinkhorn_case(device: torch.device, dry: bool) -> Case:
    """B=64, n=m=1024, d=2, eps=0.05, 200 iterations exactly (tol=0); the output compared is ⟨P, C⟩."""
    bsz, n, d, eps, iters = (2, 32, 2, 0.05, 20) if dry else (64, 1024, 2, 0.05, 200)
    kw = {"eps": eps, "iters": iters}
    providers = [
        *(Provider(f"fastkd-{b}", functools.partial(setup_sinkhorn_fastkd, backend=b, **kw))
          for b in ("triton", "torch", "cuda")),
        Provider("pot-batch", functools.partial(setup_sinkhorn_pot, **kw)),
        Provider("geomloss", functools.partial(setup_sinkhorn_geomloss, **kw), checked=False),
    ]
    return Case(family="gpu_suite", op="sinkhorn",
                sizes={"B": bsz, "n": n, "m": n, "d": d, "eps": eps, "iters": iters, "dtype": "fp32"},
                make_inputs=functools.partial(sinkhorn_inputs, bsz=bsz, n=n, d=d),
                reference=functools.partial(sinkhorn_reference, **kw), providers=providers,
                modes=("fwd",), baseline="pot-batch")


SUITE: list[SuiteCase] = [
    *(SuiteCase(f"distill-{d}", functools.partial(distill_case, d), floor_bytes=distill_floor_bytes)
      for d in ("fkl", "rkl", "jsd")),
    *(SuiteCase(f"fused-{d}", functools.partial(fused_case, d), gemm_provider="matmuls")
      for d in ("fkl", "jsd")),
    SuiteCase("sparse-fkl-topk", sparse_case, gemm_provider="student-matmuls",
              speedup_vs=(("dense", "dense-fused"), ("naive", "naive"))),
    SuiteCase("sinkhorn", sinkhorn_case, speedup_vs=(("pot", "pot-batch"), ("geomloss", "geomloss"))),
    # last, so that under gpu-check's time cap it never pushes the cases above out: tvd at 4 and at 8 warps
    SuiteCase("distill-tvd", functools.partial(distill_case, "tvd"), floor_bytes=distill_floor_bytes),
]


def add_case(entry: SuiteCase) -> None:
    """Register another suite entry (sparse, Sinkhorn, cuda backend, ...)."""
    SUITE.append(entry)


# -------------------------------------------------------------------------------------------------------
# Derived metrics and the driver
# -------------------------------------------------------------------------------------------------------


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2 << 30, reps: int = 20) -> float | None:
    """Measured device copy bandwidth (read + write bytes / median time), GB/s; None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize(device)
        if i >= 3:
            times.append(a.elapsed_time(b))
    times.sort()
    return 2 * nbytes / (times[len(times) // 2] * 1e-3) / 1e9


def speedup_columns(entries: dict[str, SuiteCase]) -> list[str]:
    """Summary columns ``speedup_vs_<label>`` over every entry's ``speedup_vs`` (first-seen order)."""
    return list(dict.fromkeys(f"speedup_vs_{label}" for e in entries.values() for label, _ in e.speedup_vs))


def derive(entries: dict[str, SuiteCase], rows: list[dict[str, Any]], copy_bw: float | None,
           dry: bool = False) -> list[dict]:
    """Per measured row: GB/s vs the HBM floor, share of the copy bandwidth, time / the GEMM provider's
    time, and ``speedup_vs_<label>`` = the named baseline's median / this row's median (same suite case);
    a metric that does not apply (or whose baseline did not run) is None — and every derived metric is None
    in a dry run, whose CPU-interpreter timings mean nothing."""
    speedups = speedup_columns(entries)
    out = []
    for r in rows:
        if r["status"] != "ok" or r["median_ms"] is None:
            continue
        entry = entries[r["suite_case"]]
        sizes = json.loads(r["sizes"])
        d = {"suite_case": r["suite_case"], "provider": r["provider"], "median_ms": r["median_ms"],
             "peak_mem_mb": r["peak_mem_mb"], "max_abs_err": r["max_abs_err"], "gbps": None,
             "floor_ms": None, "pct_of_copy_bw": None, "time_vs_gemms": None,
             **dict.fromkeys(speedups), "device_name": r["device_name"], "run_id": r["run_id"]}
        if dry:
            out.append(d)
            continue
        if entry.floor_bytes is not None:
            fb = entry.floor_bytes(sizes)
            d["gbps"] = fb / (r["median_ms"] * 1e-3) / 1e9
            if copy_bw:
                d["floor_ms"] = fb / (copy_bw * 1e9) * 1e3
                d["pct_of_copy_bw"] = 100.0 * d["gbps"] / copy_bw
        peers = {p["provider"]: p for p in rows if p["suite_case"] == r["suite_case"] and p["status"] == "ok"
                 and p["median_ms"]}
        if entry.gemm_provider in peers:
            d["time_vs_gemms"] = r["median_ms"] / peers[entry.gemm_provider]["median_ms"]
        for label, provider in entry.speedup_vs:
            if provider in peers and r["median_ms"] > 0:
                d[f"speedup_vs_{label}"] = peers[provider]["median_ms"] / r["median_ms"]
        out.append(d)
    return out


def print_summary(summary: list[dict[str, Any]], copy_bw: float | None, console: Any,
                  speedups: list[str], dry: bool = False) -> None:
    from rich.table import Table

    bw = "n/a (not CUDA)" if copy_bw is None else f"{copy_bw:.0f} GB/s"
    title = f"GPU suite: derived metrics (device copy bandwidth {bw}; vs X = X's time / this)"
    if dry:
        title = ("GPU suite DRY RUN: tiny sizes in the CPU interpreter, the timings mean nothing "
                 "(derived metrics left blank; only the errors are checked)")
    table = Table(title=title)
    cols = ("case", "provider", "median ms", "GB/s", "% copy bw", "× GEMMs",
            *(f"vs {c.removeprefix('speedup_vs_')}" for c in speedups), "peak MiB", "max err")
    for c in cols:
        table.add_column(c, justify="left" if c in ("case", "provider") else "right")

    def f(x: Any, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    for d in summary:
        table.add_row(d["suite_case"], d["provider"], f(d["median_ms"], ".3f"), f(d["gbps"], ".0f"),
                      f(d["pct_of_copy_bw"], ".1f"), f(d["time_vs_gemms"], ".2f"),
                      *(f(d[c], ".2f") for c in speedups), f(d["peak_mem_mb"], ".0f"),
                      f(d["max_abs_err"], ".2e"))
    console.print(table)


MODEL_CASES = {f"distill-{d}": f"distill-{d}" for d in ("fkl", "rkl", "jsd", "tvd")}
MODEL_CASES.update({"fused-fkl": "fused-fkl", "fused-jsd": "fused-jsd", "sparse-fkl-topk": "sparse-topk"})
MODEL_PROVIDERS = {"fastkd-triton": "fastkd-triton", "naive": "naive", "liger": "liger"}
VS_MODEL_MD = "gpu_suite_vs_model.md"  # in --out: the measured-vs-model table bench/RESULTS.md takes


def model_rows(path: str | None) -> list[dict[str, Any]]:
    """The cost model's rows (``python bench/model.py --json``), [] when there is no such file."""
    if not path or not Path(path).exists():
        return []
    with open(path) as fh:
        return json.load(fh)


def model_for_device(path: str | None, device_name: str) -> str | None:
    """The cost-model file for the device: ``--model``'s file, or its sibling ``model_h100.json`` on an H100
    (the model is per GPU: bandwidth, clock)."""
    if path and "H100" in device_name.upper():
        sibling = Path(path).with_name("model_h100.json")
        if sibling.exists():
            return str(sibling)
    return path


def vs_model(name: str, rows: list[dict[str, Any]], model: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per measured row of suite case ``name`` that the model also has: the measured median and the model's
    predicted_ms, scaled to the measured sizes (bytes, FLOPs and instructions are linear in N·V)."""
    mcase = MODEL_CASES.get(name)
    out: list[dict[str, Any]] = []
    if not mcase or not model:
        return out
    for r in rows:
        if r["status"] != "ok" or r["provider"] not in MODEL_PROVIDERS or r.get("median_ms") is None:
            continue
        m = next((x for x in model if x["case"] == mcase and x["provider"] == MODEL_PROVIDERS[r["provider"]]
                  and x.get("status") == "ok"), None)
        if m is None:
            continue
        sizes = json.loads(r["sizes"])
        msizes = m.get("sizes") or {}
        scale = 1.0
        if msizes.get("N") and msizes.get("V"):
            scale = sizes["N"] * sizes["V"] / (msizes["N"] * msizes["V"])
        pred = m["predicted_ms"] * scale
        out.append({"suite_case": name, "provider": r["provider"], "measured_ms": r["median_ms"],
                    "model_ms": pred, "measured_over_model": r["median_ms"] / pred if pred else None,
                    "model_gpu": m["gpu"], "model_commit": m.get("commit", ""),
                    "device_name": r.get("device_name", "")})
    return out


def print_vs_model(name: str, rows: list[dict[str, Any]], model: list[dict[str, Any]], console: Any) -> None:
    """Measured median next to the model's prediction for the providers both have (:func:`vs_model`);
    measured / predicted checks the calibrated model."""
    for v in vs_model(name, rows, model):
        console.print(f"  {name:<16} {v['provider']:<14} measured {v['measured_ms']:9.3f} ms   model "
                      f"{v['model_ms']:9.3f} ms ({v['model_gpu']}, model, not measured)   measured/model "
                      f"{v['measured_over_model']:5.2f}", highlight=False)


def vs_model_markdown(table: list[dict[str, Any]], device: str, commit: str, dry: bool = False) -> str:
    """The measured-vs-model table for bench/RESULTS.md: device, date and commit in the heading."""
    import datetime

    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (f"### GPU suite on {device}: measured vs the calibrated cost model — {day}, commit {commit}")
    lines = [title, ""]
    if dry:
        lines += ["DRY RUN on CPU (tiny sizes, Triton interpreter): the timings mean nothing.", ""]
    lines += ["`make gpu-check` (bench/gpu_suite.py --model bench/model_h200.json): measured = median of CUDA-event "
              "timings; model = bench/model.py's prediction (model, not measured), scaled to the measured N·V.", "",
              "| case | provider | measured ms | model ms (model, not measured) | model GPU | measured/model |",
              "|---|---|---:|---:|---|---:|"]
    for v in table:
        ratio = "" if v["measured_over_model"] is None else f"{v['measured_over_model']:.2f}"
        lines.append(f"| {v['suite_case']} | {v['provider']} | {v['measured_ms']:.3f} | {v['model_ms']:.3f} | "
                     f"{v['model_gpu']} | {ratio} |")
    return "\n".join(lines) + "\n"


def _suite_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _now() -> float:
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (Triton interpreter)")
    parser.add_argument("--cases", default="", help="comma list of substrings of suite case names")
    parser.add_argument("--providers", default="", help="comma list of substrings of provider names")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the CSV / JSON files")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--time-cap", type=float, default=None, help="seconds in all: later cases are skipped")
    parser.add_argument("--model", default=None, help="JSON of `python bench/model.py --json` to compare with")
    args = parser.parse_args(argv)
    from rich.console import Console

    COMPILE["on"] = not args.no_compile
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            console.print("[red]no CUDA device: the GPU suite needs one (use --dry-run for a CPU smoke test)")
            return 2
        device = torch.device("cuda")
    t_start = _now()
    wanted = [w for w in args.cases.split(",") if w]
    entries = {e.name: e for e in SUITE if not wanted or any(w in e.name for w in wanted)}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    model = model_rows(model_for_device(args.model, device_name))
    out = Path(args.out)
    tag = "gpu_suite_dry" if args.dry_run else "gpu_suite"
    csv_path, json_path = out / f"{tag}.csv", out / f"{tag}.json"
    copy_bw = copy_bandwidth_gbps(device)
    rows: list[dict[str, Any]] = []
    capped: list[str] = []
    compared: list[dict[str, Any]] = []
    commit = _suite_commit()
    out.mkdir(parents=True, exist_ok=True)
    for name, entry in entries.items():
        if args.time_cap is not None and _now() - t_start > args.time_cap:
            capped.append(name)
            continue
        case = entry.build(device, args.dry_run)
        case_rows = run_cases(
            [case], device, providers=[p for p in args.providers.split(",") if p] or None,
            memory=not (args.no_memory or args.dry_run),
            budget_s=args.budget if args.budget is not None else (0.01 if args.dry_run else 3.0),
            warmup=1 if args.dry_run else 5, min_reps=1 if args.dry_run else 10,
            max_reps=2 if args.dry_run else 200, console=console, progress=not args.dry_run)
        for r in case_rows:
            r["suite_case"] = name
        rows.extend(case_rows)
        write_results(case_rows, csv_path, json_path)  # now: a later timeout loses nothing of this case
        print_vs_model(name, case_rows, model, console)
        if model:  # the measured-vs-model table, rewritten as each case finishes
            compared.extend(vs_model(name, case_rows, model))
            (out / VS_MODEL_MD).write_text(vs_model_markdown(compared, device_name, commit, dry=args.dry_run))
    if capped:
        console.print(f"[yellow]time cap {args.time_cap:.0f} s reached: not run: {', '.join(capped)}")
    print_table(rows, console, title=f"fastkd GPU suite on {rows[0]['device_name'] if rows else device}")
    summary = derive(entries, rows, copy_bw, dry=args.dry_run)
    print_summary(summary, copy_bw, console, speedup_columns(entries), dry=args.dry_run)
    with open(out / f"{tag}_summary.json", "w") as fh:
        json.dump({"copy_bw_gbps": copy_bw, "dry_run": args.dry_run, "not_run_time_cap": capped,
                   "rows": summary}, fh, indent=1, default=str)
    if summary:
        with open(out / f"{tag}_summary.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
    console.print(f"rows appended to {csv_path} and {json_path}; derived: {out / (tag + '_summary.*')}")
    errors = [r for r in rows if r["status"] == "error"]
    for r in errors:
        console.print(f"[red]error[/] {r['suite_case']} {r['provider']}: {r['reason']}", highlight=False)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
