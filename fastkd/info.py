"""What ``fastkd info`` and ``fastkd check`` report: versions, devices, backend availability, and every
available backend of every op compared with the float64 reference on small shapes.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

OPS = ("distill", "fused_linear", "sparse", "sinkhorn")
# fused_linear runs the distill backends chunk by chunk (fastkd/core/lmhead.py)
_REGISTRY_OP = {"distill": "distill", "fused_linear": "distill", "sparse": "sparse", "sinkhorn": "sinkhorn"}
_OP_MODULE = {"distill": "fastkd.distill.op", "fused_linear": "fastkd.distill.fused",
              "sparse": "fastkd.sparse.op", "sinkhorn": "fastkd.ot.sinkhorn"}


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def versions() -> dict[str, str]:
    import fastkd

    return {"fastkd": fastkd.__version__, "torch": torch.__version__, "triton": _dist_version("triton"),
            "python": platform.python_version(), "liger-kernel": _dist_version("liger-kernel"),
            "pot": _dist_version("pot"), "geomloss": _dist_version("geomloss"),
            "transformers": _dist_version("transformers"), "trl": _dist_version("trl")}


def devices() -> list[str]:
    out = [f"cpu: {platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        out.append("cuda: not available" + (f" (torch built with CUDA {torch.version.cuda})"
                                            if torch.version.cuda else " (CPU-only torch build)"))
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    out.append(f"TRITON_INTERPRET={'1 (Triton kernels run on CPU tensors)' if interp else '0'}")
    return out


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sample_inputs(op: str, device: torch.device) -> dict[str, Any]:
    """Small inputs of the kind each op family's backends are asked about (``not_supported_reasons``)."""
    s = torch.randn(4, 16, device=device)
    if op in ("distill", "fused_linear"):
        from fastkd.distill.op import make_params

        params = make_params("fkl", temperature=1.0, scale_by_t2=False, beta=0.5, alpha=0.1, mu=0.5, t=0.5,
                             ce_weight=0.0, chunk_size=None)
        return {"student": s, "teacher": s.clone(), "params": params}
    if op == "sparse":
        from fastkd.core.params import SparseParams

        return {"student": s, "ids": torch.zeros(4, 2, dtype=torch.long, device=device),
                "params": SparseParams()}
    if op == "sinkhorn":
        from fastkd.ot.sinkhorn import SinkhornParams

        a = torch.full((1, 4), 0.25, device=device)
        return {"a": a, "b": a.clone(), "cost": torch.rand(1, 4, 4, device=device), "x": None, "y": None,
                "params": SinkhornParams()}
    raise ValueError(f"unknown op {op!r}")


def backend_status(op: str, device: torch.device) -> dict[str, list[str]]:
    """backend → reasons it cannot run ``op`` on sample tensors of ``device`` ([] = available)."""
    from fastkd.core import registry as backends

    try:
        importlib.import_module(_OP_MODULE[op])
    except ImportError as exc:
        return {b: [f"{_OP_MODULE[op]} is not importable ({exc})"] for b in backends.BACKENDS}
    try:
        return backends.status(_REGISTRY_OP[op], **sample_inputs(op, device))
    except Exception as exc:
        return {b: [f"status check failed: {type(exc).__name__}: {exc}"] for b in backends.BACKENDS}


def auto_choice(op: str, device: torch.device) -> tuple[str, list[tuple[str, str]]]:
    """``(backend, skipped)``: what ``backend="auto"`` picks for ``op`` on sample tensors of ``device`` and
    ``[(backend, reason), ...]`` for each backend it passed over (``fastkd.core.registry.auto_choice``)."""
    from fastkd.core import registry as backends

    try:
        importlib.import_module(_OP_MODULE[op])
        impl, skipped = backends.auto_choice(_REGISTRY_OP[op], **sample_inputs(op, device))
    except Exception as exc:
        return "none", [("*", f"{type(exc).__name__}: {exc}")]
    return impl.backend, skipped


def backend_load_errors() -> dict[str, str]:
    from fastkd.core import registry as backends

    return dict(backends._LOAD_ERRORS)


def cuda_extension_info() -> list[str]:
    """Build/load information of the optional ``fastkd._C`` extension (via ``fastkd._cpp_lib``)."""
    if importlib.util.find_spec("fastkd._cpp_lib") is None:
        return ["fastkd._cpp_lib: not present in this build (no CUDA C++ extension loader)"]
    try:
        lib = importlib.import_module("fastkd._cpp_lib")
    except Exception as exc:
        return [f"fastkd._cpp_lib failed to import: {type(exc).__name__}: {exc}"]
    try:
        meta = lib.build_info()
    except Exception as exc:
        return [f"fastkd._C: build_info failed: {type(exc).__name__}: {exc}"]
    # state: loaded | buildable (JIT on first use with CUDA tensors) | unavailable
    lines = [f"fastkd._C: {meta.get('state', 'unknown')}"]
    lines += [f"  {k}: {v}" for k, v in meta.items() if k != "state"]
    return lines


# -------------------------------------------------------------------------------------------------------
# check: each available backend vs the float64 reference
# -------------------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    op: str
    backend: str
    case: str
    max_err: float
    tol: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.max_err <= self.tol


def _maxdiff(outs: tuple[torch.Tensor, ...], refs: tuple[torch.Tensor, ...]) -> float:
    err = 0.0
    for o, r in zip(outs, refs):
        d = (o.detach().double().cpu() - r.detach().double().cpu()).abs()
        if bool(torch.isnan(d).any()):
            return math.nan
        err = max(err, float(d.max()) if d.numel() else 0.0)
    return err


def _grads(loss: torch.Tensor, wrt: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (loss, *torch.autograd.grad(loss, wrt))


def _check_distill(backend: str, device: torch.device, gen: torch.Generator) -> list[CheckResult]:
    import fastkd
    from fastkd import reference as R

    out = []
    s0 = torch.randn(5, 37, generator=gen) * 2
    t0 = torch.randn(5, 37, generator=gen) * 2
    for div in fastkd.DIVERGENCES:
        s = s0.to(device).requires_grad_(True)
        got = _grads(fastkd.distill_loss(s, t0.to(device), div, backend=backend), [s])
        sr = s0.double().requires_grad_(True)
        ref = _grads(R.distill_loss(sr, t0.double(), div), [sr])
        out.append(CheckResult("distill", backend, f"fp32 5x37 {div} loss+grad", _maxdiff(got, ref), 1e-4))
    return out


def _check_fused_linear(backend: str, device: torch.device, gen: torch.Generator) -> list[CheckResult]:
    import fastkd
    from fastkd import reference as R

    out = []
    h0, w0 = torch.randn(6, 8, generator=gen), torch.randn(37, 8, generator=gen) * 0.5
    th0, tw0 = torch.randn(6, 12, generator=gen), torch.randn(37, 12, generator=gen) * 0.5
    for div in ("fkl", "rkl", "jsd"):
        h, w = h0.to(device).requires_grad_(True), w0.to(device).requires_grad_(True)
        loss = fastkd.fused_linear_distill_loss(h, w, th0.to(device), tw0.to(device), divergence=div,
                                                chunk_size=4, backend=backend)
        got = _grads(loss, [h, w])
        hr, wr = h0.double().requires_grad_(True), w0.double().requires_grad_(True)
        ref_loss = R.fused_linear_distill_loss(hr, wr, th0.double(), tw0.double(), divergence=div)
        ref = _grads(ref_loss, [hr, wr])
        out.append(CheckResult("fused_linear", backend, f"fp32 N6 H8/12 V37 {div} loss+grads",
                               _maxdiff(got, ref), 1e-4))
    return out


def _check_sparse(backend: str, device: torch.device, gen: torch.Generator) -> list[CheckResult]:
    import fastkd
    from fastkd.sparse.reference import sparse_distill_loss as ref_sparse

    out = []
    s0 = torch.randn(5, 37, generator=gen) * 2
    logp = torch.log_softmax(torch.randn(5, 37, generator=gen) * 2, -1)
    vals, ids = logp.topk(6, dim=-1)
    for mode, div in (("topk", "fkl"), ("topk", "rkl"), ("topk", "jsd"), ("topk_tail", "fkl")):
        s = s0.to(device).requires_grad_(True)
        got = _grads(fastkd.sparse_distill_loss(s, ids.to(device), vals.to(device), mode=mode, divergence=div,
                                                backend=backend), [s])
        sr = s0.double().requires_grad_(True)
        ref = _grads(ref_sparse(sr, ids, vals.double(), mode=mode, divergence=div).mean(), [sr])
        out.append(CheckResult("sparse", backend, f"fp32 5x37 K6 {mode} {div} loss+grad", _maxdiff(got, ref),
                               1e-4))
    return out


def _check_sinkhorn(backend: str, device: torch.device, gen: torch.Generator) -> list[CheckResult]:
    import fastkd
    from fastkd.ot.reference import sinkhorn as ref_sinkhorn

    a = torch.softmax(torch.randn(2, 6, generator=gen), -1)
    b = torch.softmax(torch.randn(2, 7, generator=gen), -1)
    cost = torch.rand(2, 6, 7, generator=gen)
    res = fastkd.sinkhorn(a.to(device), b.to(device), cost=cost.to(device), eps=0.1, max_iter=500, tol=1e-9,
                          backend=backend)
    ref = ref_sinkhorn(a.double(), b.double(), cost.double(), 0.1, 500)
    return [CheckResult("sinkhorn", backend, "fp32 B2 6x7 eps0.1 value", _maxdiff((res.value,),
                                                                               (ref["value"],)), 1e-4)]


_CHECKS: dict[str, Callable[[str, torch.device, torch.Generator], list[CheckResult]]] = {
    "distill": _check_distill, "fused_linear": _check_fused_linear, "sparse": _check_sparse,
    "sinkhorn": _check_sinkhorn,
}


def run_checks(device: torch.device, ops: tuple[str, ...] = OPS) -> tuple[list[CheckResult], list[str]]:
    """(results, skipped lines): every backend that can run each op on ``device`` vs the reference."""
    results: list[CheckResult] = []
    skipped: list[str] = []
    for op in ops:
        for backend, reasons in backend_status(op, device).items():
            if reasons:
                skipped.append(f"{op}/{backend}: " + "; ".join(reasons))
                continue
            gen = torch.Generator().manual_seed(0)
            try:
                results += _CHECKS[op](backend, device, gen)
            except Exception as exc:
                results.append(CheckResult(op, backend, "(check raised)", math.nan, 0.0,
                                           f"{type(exc).__name__}: {exc}"))
    return results, skipped
