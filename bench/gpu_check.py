"""``make gpu-check``: the first run on a CUDA machine with no network, in one command.

Steps, each logged under ``--out`` as it finishes:

1. install this checkout into the running Python, editable, without downloads (``pip --no-deps
   --no-build-isolation --no-index``), building csrc/ with every core; build tools that are missing
   (nvcc, pybind11, ninja) are named first, and a failed install prints the end of pip's log before the
   retry without the CUDA extension;
2. ``fastkd info`` (versions, devices, what each backend can run and why not);
3. ``pytest -m gpu`` with native Triton on the test files that hold gpu tests;
4. the trimmed GPU suite (``bench/gpu_suite.py``: no torch.compile, short budget, a total time cap), each case
   written to ``--out`` when it finishes, measured beside the cost model's prediction.

``--dry-run`` runs the same steps on a CPU machine (the gpu tests are collected and skipped, the suite runs its
tiny CPU sizes), so that the check itself is tested without a GPU (tests/tooling/test_gpu_check.py).
Exit code 0 when every step passed; 2 when no CUDA device is visible and ``--dry-run`` was not given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_build_helper():
    spec = importlib.util.spec_from_file_location("_fastkd_build_for_check", ROOT / "fastkd_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name: str, cmd: list[str], out: Path, timeout: float, env: dict | None = None) -> int:
    """Run ``cmd``, echo its output and keep it in ``out/<name>.log``; the exit code (124 on a timeout)."""
    log = out / f"{name}.log"
    print(f"gpu-check: [{name}] {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        # the timer kills a step that hangs silently too (a read of its output would wait for ever)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                fh.write(line)
            rc = proc.wait()
        finally:
            timed_out = not timer.is_alive()
            timer.cancel()
        if timed_out:
            rc = 124
            fh.write(f"\ngpu-check: [{name}] stopped after {timeout:.0f} s\n")
            print(f"gpu-check: [{name}] stopped after {timeout:.0f} s", flush=True)
    (out / f"{name}.rc").write_text(f"{rc}\n")
    print(f"gpu-check: [{name}] exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
    return rc


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    keep = [t for t in text if "is ignored: it is neither a file nor a directory" not in t]
    return "\n".join(keep[-lines:])


def install(out: Path) -> int:
    build = _load_build_helper()
    missing = build.missing_build_tools()
    if missing:
        print(f"gpu-check: csrc/ will not be built (the 'cuda' backend stays off): missing {', '.join(missing)}")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
           str(ROOT)]
    rc = _run("install", pip, out, 300, env={"MAX_JOBS": str(os.cpu_count() or 1)})
    if rc != 0:
        print("gpu-check: installing with the CUDA extension failed; the end of pip's log:\n"
              + _tail(out / "install.log") + "\ngpu-check: retrying without the CUDA extension")
        rc = _run("install-no-cuda", pip, out, 120, env={"FASTKD_SKIP_CUDA_BUILD": "1"})
        if rc != 0:
            print("gpu-check: the install failed without the CUDA extension too:\n"
                  + _tail(out / "install-no-cuda.log"))
    return rc


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if re.search(r"mark\.gpu\b", p.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="run the steps on a CPU machine")
    parser.add_argument("--suite-cap", type=float, default=150.0, help="seconds for the GPU suite's cases")
    parser.add_argument("--pytest-timeout", type=float, default=150.0)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda and not args.dry_run:
        print(f"gpu-check: no CUDA GPU visible to {sys.executable} (torch missing or torch.cuda.is_available() is "
              "False). It needs a CUDA machine; here use 'make test', 'make gpu-aot', 'python bench/model.py', or "
              "'python bench/gpu_check.py --dry-run' to try the check's steps on the CPU.")
        return 2
    rcs = {"install": install(out)}
    rcs["info"] = _run("info", [sys.executable, "-m", "fastkd", "info"], out, 120)
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--durations=10",
                  "--continue-on-collection-errors", *gpu_test_files()]
    rc = _run("pytest-gpu", pytest_cmd, out, args.pytest_timeout)
    rcs["pytest-gpu"] = 0 if rc == 5 and args.dry_run else rc  # 5: nothing selected (no gpu test ran on a CPU)
    suite = [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--no-compile", "--out", str(out),
             "--model", str(ROOT / "bench" / "model_h200.json")]
    suite += ["--dry-run", "--no-memory"] if args.dry_run else ["--budget", "0.5", "--time-cap", str(args.suite_cap)]
    rcs["suite"] = _run("suite", suite, out, args.suite_cap + 60, env={"PYTHONUNBUFFERED": "1"})
    summary = ", ".join(f"{k} exit {v}" for k, v in rcs.items())
    print(f"gpu-check: {summary}; logs and results in {out}")
    return 0 if not any(rcs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
