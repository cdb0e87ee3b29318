"""The ``fastkd`` command (also ``python -m fastkd``): ``info``, ``bench``, ``check``, ``cache-teacher``.

``bench`` runs the suites of the source tree's ``bench/`` directory (``bench/bench_<family>.py`` on the
shared ``bench/harness.py``); run it from a clone of the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_bench_arguments(parser: argparse.ArgumentParser, families: bool = True) -> None:
    """Options of ``fastkd bench`` (shared with ``python bench/bench_<family>.py``)."""
    if families:
        parser.add_argument("--families", default=None,
                            help="comma list of families to run (default: every bench/bench_*.py)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke test)")
    size.add_argument("--design", action="store_true",
                      help="the DESIGN.md target sizes (slow on CPU: minutes per case)")
    parser.add_argument("--providers", default=None,
                        help="comma list; keep providers whose name contains one of these (baseline kept)")
    parser.add_argument("--modes", default=None, help="comma list of fwd,bwd,full (default: each case's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="results directory (default: bench/results)")
    parser.add_argument("--csv", default=None, help="CSV file to append rows to (default: OUT/results.csv)")
    parser.add_argument("--json", default=None, help="JSON file to append to (default: OUT/results.json)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="also write a bar plot (optionally to PNG)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--budget", type=_positive_float, default=None,
                        help="seconds of timed repetitions per measurement (default 1, 0.05 with --quick)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


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


def find_bench_root() -> Path | None:
    """The source tree holding ``bench/harness.py``: next to the fastkd package, else the current dir."""
    import fastkd

    for root in (Path(fastkd.__file__).resolve().parents[1], Path.cwd()):
        if (root / "bench" / "harness.py").is_file():
            return root
    return None


def cmd_bench(args: Any) -> int:
    root = find_bench_root()
    if root is None:
        import fastkd

        print("fastkd bench: the benchmark suites (bench/harness.py, bench/bench_*.py) live in the source "
              f"repository, and this fastkd (installed at {Path(fastkd.__file__).parent}) has none. "
              "Clone the repository, `pip install -e .` it, and run `fastkd bench` from its root.",
              file=sys.stderr)
        return 2
    _device(args)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.harness import run_bench

    return run_bench(args)


def _cache_teacher_missing(args: Any) -> int:
    print("fastkd cache-teacher: fastkd.cache_cli is not available in this build "
          f"({args._cache_error}); the teacher-cache builder is not installed.", file=sys.stderr)
    return 2


def _add_cache_teacher(subparsers: Any) -> None:
    try:
        from fastkd import cache_cli
    except ImportError as exc:
        p = subparsers.add_parser("cache-teacher", help="build a sparse teacher cache (unavailable)",
                                  description="unavailable: fastkd.cache_cli is missing")
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
    p = sub.add_parser("bench", help="benchmark every op family on this machine's device",
                       description="Run bench/bench_*.py: table, CSV/JSON rows under bench/results, plot.")
    add_bench_arguments(p)
    p.set_defaults(_run=cmd_bench)
    p = sub.add_parser("check", help="every available backend vs the float64 reference (exit 1 on failure)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--ops", default=None, help="comma list of distill,fused_linear,sparse,sinkhorn")
    p.add_argument("--interpret", action="store_true", help="set TRITON_INTERPRET=1 (Triton on CPU tensors)")
    p.set_defaults(_run=cmd_check)
    _add_cache_teacher(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args._run is not _cache_teacher_missing:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
