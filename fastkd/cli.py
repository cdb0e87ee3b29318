"""The ``fastkd`` command (also ``python -m fastkd``): ``info``, ``bench``, ``check``, ``cache-teacher``.

``bench`` runs :mod:`fastkd.bench` (the source tree's top-level ``bench/``, installed as ``fastkd/bench/``:
``bench_<family>.py`` on the shared ``harness.py``), from a clone or from a wheel. Imports point one way:
this module imports ``fastkd.bench.harness`` when ``bench`` runs, and bench never imports ``fastkd.cli``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _device(args: Any) -> Any:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastkd: --device cuda requested but CUDA is not available")
    return torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available()
                                                                      else "cpu")


def _set_interpret(args: Any) -> None:
    if getattr(args, "interpret", False):
        os.environ["TRITON_INTERPRET"] = "1"  # before any fastkd kernel module is imported


def cmd_info(args: Any) -> int:
    _set_interpret(args)
    from rich.console import Console
    from rich.table import Table

    from fastkd import info

    console = Console()
    device = _device(args)
    console.print("[bold]fastkd info")
    for k, v in info.versions().items():
        console.print(f"  {k:<13} {v}")
    console.print("[bold]devices")
    for line in info.devices():
        console.print(f"  {line}")
    table = Table(title=f"backends on {device.type} sample tensors")
    for col in ("op", "backend", "available", "reasons"):
        table.add_column(col)
    for op in info.OPS:
        for backend, reasons in info.backend_status(op, device).items():
            table.add_row(op, backend, "[green]yes" if not reasons else "[red]no", "; ".join(reasons))
    console.print(table)
    console.print(f"[bold]auto dispatch on {device.type} tensors")
    for op in info.OPS:
        chosen, skipped = info.auto_choice(op, device)
        why = "; ".join(f"skipped {b}: {r}" for b, r in skipped)
        console.print(f"  {op:<13} -> {chosen}" + (f"  ({why})" if why else ""), highlight=False)
    errors = info.backend_load_errors()
    for module, err in errors.items():
        console.print(f"[yellow]backend module {module} failed to load: {err}")
    console.print("[bold]CUDA extension")
    for line in info.cuda_extension_info():
        console.print(f"  {line}")
    return 0


def cmd_check(args: Any) -> int:
    _set_interpret(args)
    from rich.console import Console
    from rich.table import Table

    from fastkd import info

    console = Console()
    device = _device(args)
    ops = tuple(args.ops.split(",")) if args.ops else info.OPS
    unknown = [o for o in ops if o not in info.OPS]
    if unknown:
        console.print(f"[red]unknown ops {unknown}; choose from {info.OPS}")
        return 2
    results, skipped = info.run_checks(device, ops)
    table = Table(title=f"fastkd check on {device.type} (vs float64 reference)")
    for col in ("op", "backend", "case", "max err", "tol", "result"):
        table.add_column(col)
    for r in results:
        verdict = "[green]pass" if r.ok else f"[red]FAIL {r.error[:80]}"
        table.add_row(r.op, r.backend, r.case, f"{r.max_err:.2e}", f"{r.tol:.0e}", verdict)
    console.print(table)
    for line in skipped:
        console.print(f"[dim]skipped {line}")
    failed = [r for r in results if not r.ok]
    console.print(f"{len(results) - len(failed)} passed, {len(failed)} failed, "
                  f"{len(skipped)} backends skipped")
    return 1 if failed or not results else 0


def cmd_bench(args: Any) -> int:
    """Forward every argument after ``bench`` to ``fastkd.bench.harness.main`` (bench owns its options)."""
    if args.bench_args[:1] == ["--model"]:  # fastkd bench --model h100|h200 [...]: the GPU cost model
        from fastkd.bench.model import main as model_main

        return model_main(["--gpu", *args.bench_args[1:2], *args.bench_args[2:]])
    from fastkd.bench.harness import main as bench_main

    return bench_main(list(args.bench_args), prog="fastkd bench")


def _cache_teacher_missing(args: Any) -> int:
    print("fastkd cache-teacher: fastkd.cache.cli is not available in this build "
          f"({args._cache_error}); the teacher-cache builder is not installed.", file=sys.stderr)
    return 2


def _add_cache_teacher(subparsers: Any) -> None:
    try:
        from fastkd.cache import cli as cache_cli
    except ImportError as exc:
        p = subparsers.add_parser("cache-teacher", help="build a sparse teacher cache (unavailable)",
                                  description="unavailable: fastkd.cache.cli is missing")
        p.set_defaults(_run=_cache_teacher_missing, _cache_error=f"{type(exc).__name__}: {exc}")
        return
    parser = cache_cli.add_parser(subparsers)
    if parser is None:
        parser = subparsers.choices["cache-teacher"]
    parser.set_defaults(_run=cache_cli.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd",
                                     description="Kernel-backed knowledge-distillation losses.")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,check,cache-teacher}")
    sub.required = True
    p = sub.add_parser("info", help="versions, devices and backend availability with reasons")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--interpret", action="store_true", help="set TRITON_INTERPRET=1 (Triton on CPU tensors)")
    p.set_defaults(_run=cmd_info)
    # The bench options belong to bench/harness.py (the source tree's bench/, found at run time): every
    # argument after `bench` is forwarded there, `fastkd bench --help` included.
    p = sub.add_parser("bench", help="benchmark every op family on this machine's device (fastkd bench --help)",
                       add_help=False)
    p.set_defaults(_run=cmd_bench, bench_args=[])
    p = sub.add_parser("check", help="every available backend vs the float64 reference (exit 1 on failure)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--ops", default=None, help="comma list of distill,fused_linear,sparse,sinkhorn")
    p.add_argument("--interpret", action="store_true", help="set TRITON_INTERPRET=1 (Triton on CPU tensors)")
    p.set_defaults(_run=cmd_check)
    _add_cache_teacher(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # forwarded verbatim: argparse would otherwise take bench's options for fastkd's own
        args = parser.parse_args(["bench"])
        args.bench_args = argv[1:]
        return int(args._run(args) or 0)
    args, extra = parser.parse_known_args(argv)
    if extra and args._run is not _cache_teacher_missing:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
