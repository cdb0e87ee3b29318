"""Shared benchmark machinery for every ``bench/bench_<family>.py``.

A family module exposes::

    FAMILY: str                                         # e.g. "distill"
    def cases(device: torch.device, preset: str) -> list[Case]   # preset: "quick" | "default" | "design"
    def summarize(rows: list[dict], console) -> None    # optional: print derived ratios

A :class:`Case` is one op at one set of sizes: ``make_inputs(device, seed)`` builds the inputs once per
run (every provider gets the *same* dict; providers must not modify it), ``reference(inputs)`` returns the
float64 outputs ``(loss, *grads)`` used for the max-error check, and ``providers`` are the implementations.
A :class:`Provider` is a name plus ``setup(inputs, mode) -> step``: a zero-argument callable running one
iteration and returning its outputs (a tensor or tuple of tensors, compared with the reference), or a
:class:`Step` with untimed work before each iteration. :func:`autograd_step` builds the usual
fwd / bwd / full steps from a loss function. ``setup`` raises :class:`Skip` (the message is the reason)
when the provider cannot run here; any other exception is reported as an error row.

Measurements per (case, provider, mode): median, p20 and p80 of per-iteration wall time (after warmup;
``torch.cuda.synchronize`` / CUDA events on GPU); peak extra memory — on CPU in a fresh process per
provider (peak RSS growth over the RSS after inputs were built, via ``/proc/self/clear_refs`` + VmHWM,
falling back to ``ru_maxrss``), on GPU ``max_memory_allocated`` minus the allocation before the
iteration; max |output − float64 reference|. Because the CPU memory child unpickles the case, its
``make_inputs``, ``reference`` and provider ``setup`` must be module-level functions (or
``functools.partial`` of them) in an importable module (``bench.bench_<family>``).

Output rows (dicts, one per measurement) carry :data:`COLUMNS`; :func:`write_results` appends them to
CSV and JSON files under ``bench/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import datetime as _dt
import functools
import gc
import json
import math
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fastkd

# this module is fastkd.bench.harness: bench/ of a source tree, or fastkd/bench/ of an installed wheel
PACKAGE_PARENT = Path(fastkd.__file__).resolve().parents[1]  # the sys.path entry that holds this fastkd
BENCH_DIR = Path(__file__).resolve().parent
SOURCE_ROOT: Path | None = PACKAGE_PARENT if (PACKAGE_PARENT / "bench" / "harness.py").is_file() else None
# a clone writes into its git-ignored bench/results/; an installed wheel into ./fastkd-bench-results/
RESULTS_DIR = SOURCE_ROOT / "bench" / "results" if SOURCE_ROOT else Path.cwd() / "fastkd-bench-results"
MODES = ("fwd", "bwd", "full")
PRESETS = ("quick", "default", "design")

COLUMNS = [
    "run_id", "date", "family", "op", "case", "sizes", "provider", "mode", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "reps", "peak_mem_mb", "mem_method", "max_abs_err",
    "time_vs_baseline", "mem_vs_baseline", "baseline", "device", "device_name", "threads",
    "torch", "triton", "fastkd", "python", "git_commit", "load_avg",
]


class Skip(Exception):
    """Raised by a provider's ``setup`` when it cannot run here; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class Step:
    """One timed iteration: ``before()`` runs untimed and its result is passed to ``run``."""

    run: Callable[..., Any]
    before: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Provider:
    """An implementation of a case's op.

    ``setup(inputs, mode)`` returns a zero-arg callable (or a :class:`Step`) running one iteration.
    ``checked=False`` for providers that compute something else (e.g. "the GEMMs alone").
    ``warmup_in_child`` runs one untimed iteration before the memory measurement (torch.compile: keeps
    compilation out of the peak).
    """

    name: str
    setup: Callable[[dict[str, Any], str], Callable[[], Any] | Step]
    checked: bool = True
    warmup_in_child: bool = False


@dataclass
class Case:
    """One op at one size; ``sizes`` labels it (e.g. ``{"N": 4096, "V": 32000, "dtype": "fp32"}``)."""

    family: str
    op: str
    sizes: dict[str, Any]
    make_inputs: Callable[[torch.device, int], dict[str, Any]]
    providers: list[Provider]
    reference: Callable[[dict[str, Any]], Sequence[torch.Tensor]] | None = None
    modes: tuple[str, ...] = ("full",)
    baseline: str | None = None
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.sizes.items())


# -------------------------------------------------------------------------------------------------------
# Steps
# -------------------------------------------------------------------------------------------------------


def _fwd_only(loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor]:
    return (loss_fn(),)


def _fwd_bwd(loss_fn: Callable[[], torch.Tensor], wrt: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    loss = loss_fn()
    return (loss, *torch.autograd.grad(loss, list(wrt)))


def _bwd(wrt: Sequence[torch.Tensor], loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.autograd.grad(loss, list(wrt)))


def autograd_step(loss_fn: Callable[[], torch.Tensor], wrt: Sequence[torch.Tensor], mode: str) -> Any:
    """The step for ``mode`` of a scalar loss: "fwd" → (loss,), "bwd" → grads (forward untimed),
    "full" → (loss, *grads) with ``grads = torch.autograd.grad(loss, wrt)``."""
    if mode == "fwd":
        return functools.partial(_fwd_only, loss_fn)
    if mode == "bwd":
        return Step(run=functools.partial(_bwd, wrt), before=loss_fn)
    if mode == "full":
        return functools.partial(_fwd_bwd, loss_fn, wrt)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _as_step(step: Callable[[], Any] | Step) -> Step:
    return step if isinstance(step, Step) else Step(run=step)


def _call(step: Step) -> Any:
    return step.run(step.before()) if step.before is not None else step.run()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------------------


def time_step(
    step: Step, device: torch.device, *, warmup: int = 1, budget_s: float = 1.0, min_reps: int = 3,
    max_reps: int = 100,
) -> list[float]:
    """Per-iteration times in ms: ``warmup`` untimed iterations, then as many as fit in ``budget_s``
    (clamped to [min_reps, max_reps]). CUDA: events around ``run`` only; CPU: perf_counter."""
    for _ in range(max(warmup, 0)):
        _call(step)
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_reps:
        pre = step.before() if step.before is not None else None
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = step.run(pre) if step.before is not None else step.run()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            out = step.run(pre) if step.before is not None else step.run()
            times.append((time.perf_counter() - t0) * 1e3)
        del out, pre
        if len(times) >= min_reps and time.perf_counter() - start_all >= budget_s:
            break
    return times


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation."""
    xs = sorted(times)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def max_abs_error(outputs: Any, reference: Sequence[torch.Tensor], mode: str) -> float:
    """max |out − ref| over the tensors a step returned; "bwd" outputs are compared with ``reference[1:]``.
    Equal infinities count as 0; a NaN anywhere gives NaN."""
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    refs = list(reference)[1:] if mode == "bwd" else list(reference)
    err = 0.0
    for out, ref in zip(outs, refs):
        if out is None or ref is None:
            continue
        o = out.detach().to(torch.float64).cpu()
        r = ref.detach().to(torch.float64).cpu()
        if o.shape != r.shape:
            raise ValueError(f"output shape {tuple(o.shape)} does not match reference {tuple(r.shape)}")
        diff = torch.where(o == r, torch.zeros((), dtype=torch.float64), (o - r).abs())
        if bool(torch.isnan(diff).any()):
            return math.nan
        if diff.numel():
            err = max(err, float(diff.max()))
    return err


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError("no VmRSS in /proc/self/status")


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_growth_mb(step: Step, warmup: bool = False) -> tuple[float, str]:
    """Peak RSS growth (MiB) of one iteration in *this* process, over the RSS just before it.

    Meant for a fresh process whose inputs are already built. Uses VmHWM after resetting it through
    ``/proc/self/clear_refs``; without that, ``ru_maxrss`` minus the current RSS (an upper bound).
    """
    if warmup:
        out = _call(step)
        del out
    gc.collect()
    _malloc_trim()
    base = _rss_kb()
    if _reset_hwm():
        out = _call(step)
        peak = _hwm_kb()
        method = "rss-hwm-fresh-process"
    else:
        out = _call(step)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss-fresh-process"
    del out
    return max(peak - base, 0) / 1024.0, method


def _measure_in_child(case: Case, provider: Provider, mode: str, threads: int) -> dict[str, Any]:
    """Body of the fresh process: build the inputs, set up the step, measure one iteration's peak."""
    torch.set_num_threads(threads)
    try:
        inputs = case.make_inputs(torch.device("cpu"), case.seed)
        step = _as_step(provider.setup(inputs, mode))
        mb, method = peak_rss_growth_mb(step, warmup=provider.warmup_in_child)
        return {"peak_mem_mb": mb, "mem_method": method}
    except Exception as exc:  # reported, never fatal for the run
        return {"error": f"{type(exc).__name__}: {exc}"}


def _child_main() -> None:
    """Entry of the subprocess fallback: read a pickled (case, provider, mode, threads), print JSON."""
    case, provider, mode, threads = pickle.loads(sys.stdin.buffer.read())
    result = _measure_in_child(case, provider, mode, threads)
    sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")


# glibc serves every allocation over 64 KiB with mmap so freed buffers leave the RSS and cannot hide a
# provider's peak; read once at process start, so they are set in the environment of the fresh processes.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _zygote_main() -> None:
    """``python -m bench.harness --zygote``: import torch, fastkd and this module once, then for each
    request on stdin (8-byte length + pickled (case, provider, mode, threads)) fork a fresh process that
    measures it, and answer on stdout (8-byte length + JSON). The zygote itself only imports (no OpenMP
    pool has been started in it), so forking it is safe; each child is a new address space (its own VmHWM)
    without paying Python + torch start-up (1.5-5 s on a 2-core machine, most of a CPU bench's time)."""
    import fastkd  # noqa: F401  (preloaded for every child)

    proto_in = sys.stdin.buffer
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a child prints goes to stderr, never into the answers
    while True:
        head = proto_in.read(8)
        if len(head) < 8:
            return
        payload = proto_in.read(int.from_bytes(head, "little"))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the measuring child
            os.close(r)
            try:
                result = _measure_in_child(*pickle.loads(payload))
            except BaseException as exc:  # unpickling failed: reported, never fatal for the run
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        data = b"".join(chunks) or json.dumps({"error": f"memory child died (wait status {status})"}).encode()
        proto_out.write(len(data).to_bytes(8, "little") + data)
        proto_out.flush()


class _Zygote:
    """The parent's handle on one ``--zygote`` process (started on first use, restarted after a timeout)."""

    proc: subprocess.Popen | None = None

    @classmethod
    def measure(cls, payload: bytes, timeout_s: float) -> dict[str, Any]:
        import select

        if cls.proc is None or cls.proc.poll() is not None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            for k, v in _MALLOC_ENV.items():
                env.setdefault(k, v)
            cls.proc = subprocess.Popen([sys.executable, "-m", "fastkd.bench.harness", "--zygote"],
                                        cwd=str(PACKAGE_PARENT), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        proc = cls.proc
        try:
            proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
            proc.stdin.flush()
            if not select.select([proc.stdout], [], [], timeout_s)[0]:
                raise TimeoutError(f"memory child timed out after {timeout_s:.0f} s")
            head = proc.stdout.read(8)
            if len(head) < 8:
                raise RuntimeError(f"memory zygote exited (code {proc.poll()})")
            return json.loads(proc.stdout.read(int.from_bytes(head, "little")))
        except BaseException:
            cls.close()
            raise

    @classmethod
    def close(cls) -> None:
        proc, cls.proc = cls.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.stdin.close()  # a waiting zygote exits on end of input
            proc.wait(2)
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, 9)  # the zygote and a child it may be waiting for (own session)
            proc.wait()


atexit.register(_Zygote.close)


def cpu_peak_fresh_process(
    case: Case, provider: Provider, mode: str, timeout_s: float = 900
) -> tuple[float, str]:
    """Peak extra RSS (MiB) of one ``provider`` iteration, measured in a new process.

    Forked from a pre-imported zygote process (:func:`_zygote_main`); with
    ``FASTKD_BENCH_MEMORY_CHILD=subprocess`` (or where ``os.fork`` does not exist) a new Python interpreter
    per measurement (``python -m bench.harness --memory-child``). Either way the process starts with
    ``MALLOC_*`` set.
    """
    payload = pickle.dumps((case, provider, mode, torch.get_num_threads()))
    if os.environ.get("FASTKD_BENCH_MEMORY_CHILD", "fork") != "subprocess" and hasattr(os, "fork"):
        result = _Zygote.measure(payload, timeout_s)
    else:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for k, v in _MALLOC_ENV.items():
            env.setdefault(k, v)
        proc = subprocess.run([sys.executable, "-m", "fastkd.bench.harness", "--memory-child"], input=payload,
                              capture_output=True, timeout=timeout_s, env=env, cwd=str(PACKAGE_PARENT))
        text = proc.stdout.decode(errors="replace")
        if "@@RESULT@@" not in text:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"memory child failed (rc={proc.returncode}): {' | '.join(tail)}")
        result = json.loads(text.rsplit("@@RESULT@@", 1)[1].strip())
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["peak_mem_mb"], result["mem_method"]


def cuda_peak_mb(step: Step, device: torch.device) -> tuple[float, str]:
    """max_memory_allocated during one iteration minus the allocation just before it (MiB)."""
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = _call(step)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(peak - base, 0) / 2**20, "cuda-max-allocated"


# -------------------------------------------------------------------------------------------------------
# Environment and results
# -------------------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus)"


@functools.cache
def _git_commit() -> str:
    try:
        if SOURCE_ROOT is None:
            return ""
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=SOURCE_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict[str, Any]:
    """Device and version fields stamped on every row."""
    import fastkd

    return {
        "device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": _version("triton"), "fastkd": fastkd.__version__,
        "python": platform.python_version(), "git_commit": _git_commit(), "load_avg": _load_avg(),
    }


def _load_avg() -> float | None:
    """The 1-minute load average of this machine (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def load_caveat(load: float | None = None, cores: int | None = None) -> str | None:
    """One line when the machine is busier than its cores (timings inflated, ratios noisier), else None."""
    load = _load_avg() if load is None else load
    cores = cores or os.cpu_count() or 1
    if load is None or load <= cores:
        return None
    return (f"machine busy: load average {load:.1f} on {cores} cores; times are inflated and ratios noisier "
            "(providers are interleaved, so ratios are less affected): rerun on an idle machine to quote them")


def write_results(rows: list[dict[str, Any]], csv_path: Path | str | None = None,
                  json_path: Path | str | None = None) -> tuple[Path, Path]:
    """Append ``rows`` to a CSV (header written when the file is new) and a JSON list."""
    csv_path = Path(csv_path) if csv_path else RESULTS_DIR / "results.csv"
    json_path = Path(json_path) if json_path else RESULTS_DIR / "results.json"
    for p in (csv_path, json_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    old: list[dict[str, Any]] = []
    if json_path.exists() and json_path.stat().st_size:
        with open(json_path) as f:
            old = json.load(f)
    with open(json_path, "w") as f:
        json.dump(old + rows, f, indent=1, default=str)
    return csv_path, json_path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def print_table(rows: list[dict[str, Any]], console: Any = None, title: str = "fastkd bench") -> None:
    """A rich table of the measured rows (one line per case × provider × mode), then the skipped ones."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_lines=False)
    for col in ("case", "provider", "mode", "median ms", "p20–p80 ms", "peak MiB", "max err", "time/base",
                "mem/base"):
        table.add_column(col, justify="left" if col in ("case", "provider", "mode") else "right")
    for r in rows:
        if r["status"] != "ok":
            continue
        table.add_row(
            r["case"], r["provider"], r["mode"], _fmt(r["median_ms"], 2),
            f"{_fmt(r['p20_ms'], 2)}–{_fmt(r['p80_ms'], 2)}", _fmt(r["peak_mem_mb"], 1),
            _fmt(r["max_abs_err"], 2), _fmt(r["time_vs_baseline"], 2), _fmt(r["mem_vs_baseline"], 3),
        )
    console.print(table)
    for r in rows:
        if r["status"] != "ok":
            console.print(f"[yellow]{r['status']}[/] {r['case']} {r['provider']} {r['mode']}: {r['reason']}",
                          markup=True, highlight=False)
        elif r["reason"]:
            console.print(f"[yellow]note[/] {r['case']} {r['provider']}: {r['reason']}", highlight=False)


# -------------------------------------------------------------------------------------------------------
# Running cases
# -------------------------------------------------------------------------------------------------------


def _select(providers: list[Provider], names: Sequence[str] | None, baseline: str | None) -> list[Provider]:
    if not names:
        return providers
    return [p for p in providers if p.name == baseline or any(n in p.name for n in names)]


def run_cases(
    cases: list[Case], device: torch.device, *, providers: Sequence[str] | None = None,
    modes: Sequence[str] | None = None, memory: bool = True, budget_s: float = 1.0, warmup: int = 1,
    min_reps: int = 3, max_reps: int = 100, console: Any = None, progress: bool = True,
    run_id: str | None = None, family: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every (case, provider, mode); returns result rows (see :data:`COLUMNS`).

    ``providers``: keep only providers whose name contains one of these strings (the case baseline is
    always kept). ``modes``: override each case's modes. ``memory=False`` skips peak-memory measurement.
    ``run_id`` labels the rows (one id for every family of a ``fastkd bench`` run; default: now, UTC).
    ``progress``: two rich bars on a terminal (the family's cases, the current case's providers); one line
    per case and provider otherwise, so a log shows where the time goes.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    env = environment(device)
    now = _dt.datetime.now(_dt.timezone.utc)
    run_id = run_id or now.strftime("%Y%m%dT%H%M%SZ")
    date = now.isoformat(timespec="seconds")
    plan = [(c, p, m) for c in cases for p in _select(c.providers, providers, c.baseline)
            for m in (modes or c.modes)]
    by_case: dict[int, list[tuple[Provider, str]]] = {}
    for c, p, m in plan:
        by_case.setdefault(id(c), []).append((p, m))
    todo_cases = [c for c in cases if by_case.get(id(c))]
    family = family or (todo_cases[0].family if todo_cases else "bench")
    live = progress and console.is_terminal
    lines = progress and not console.is_terminal
    rows: list[dict[str, Any]] = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not live, transient=True)
    with bar:
        fam_task = bar.add_task(f"[bold]{family}[/] cases", total=len(todo_cases))
        case_task = bar.add_task("", total=1)
        for i, case in enumerate(todo_cases, 1):
            todo = by_case[id(case)]
            t_case = time.perf_counter()
            bar.update(fam_task, description=f"[bold]{family}[/] case {i}/{len(todo_cases)}")
            bar.reset(case_task, total=len(todo) + (case.reference is not None),
                      description=f"  {case.label}")
            if lines:
                console.print(f"[{family}] case {i}/{len(todo_cases)} {case.op} {case.label}: "
                              f"{len(todo)} measurements", highlight=False, markup=False)
            inputs = case.make_inputs(device, case.seed)
            ref = None
            ref_error = ""
            if case.reference is not None:
                bar.update(case_task, description=f"  {case.label}: float64 reference")
                try:
                    ref = [None if r is None else r.detach() for r in case.reference(inputs)]
                except Exception as exc:
                    ref_error = f"reference failed: {type(exc).__name__}: {exc}"
                bar.advance(case_task)
            case_rows = []
            for provider, mode in todo:
                case_rows.append({"run_id": run_id, "date": date, "family": case.family, "op": case.op,
                                  "case": case.label, "sizes": json.dumps(case.sizes), "provider": provider.name,
                                  "mode": mode, "status": "ok", "reason": ref_error,
                                  "baseline": case.baseline or "", **env})
            bar.update(case_task, description=f"  {case.label}: {len(todo)} providers, interleaved")
            t0 = time.perf_counter()
            measured = _measure_case(case, todo, inputs, ref, device, memory=memory, budget_s=budget_s,
                                     warmup=warmup, min_reps=min_reps, max_reps=max_reps)
            for row, result in zip(case_rows, measured):
                row.update(result)
                bar.advance(case_task)
                if lines:
                    console.print(f"[{family}]   {row['provider']} {row['mode']}: {row['status']}",
                                  highlight=False, markup=False)
            if lines:
                console.print(f"[{family}]   {len(todo)} measurements in {time.perf_counter() - t0:.1f} s",
                              highlight=False, markup=False)
            _add_ratios(case_rows)
            rows.extend(case_rows)
            bar.advance(fam_task)
            if lines:
                console.print(f"[{family}] case {i} done in {time.perf_counter() - t_case:.1f} s", highlight=False,
                              markup=False)
            del inputs, ref
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _empty_result() -> dict[str, Any]:
    return {"median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0, "peak_mem_mb": None, "mem_method": "",
            "max_abs_err": None, "status": "ok"}


def _failed(out: dict[str, Any], exc: Exception) -> None:
    if isinstance(exc, Skip):
        out.update(status="skipped", reason=str(exc))
    else:
        out.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])


def interleaved_times(steps: Sequence[Step], device: torch.device, *, warmup: int = 1, budget_s: float = 1.0,
                      min_reps: int = 3, max_reps: int = 100) -> list[list[float] | Exception]:
    """Per-iteration times in ms of several steps, measured in rounds: each round times one iteration of
    every step still running, in an order rotated by one each round, so that a slow phase of a busy
    machine falls on every provider alike and the ratios between them survive it. A step stops once it
    has ``min_reps`` iterations and ``budget_s`` of timed work, or ``max_reps``; an exception ends that
    step only (its entry is the exception)."""
    out: list[list[float] | Exception] = [[] for _ in steps]
    spent = [0.0] * len(steps)
    for i, step in enumerate(steps):
        try:
            for _ in range(max(warmup, 0)):
                _call(step)
        except Exception as exc:
            out[i] = exc
    _sync(device)
    live = [i for i in range(len(steps)) if not isinstance(out[i], Exception)]
    rnd = 0
    while live:
        order = live[rnd % len(live):] + live[:rnd % len(live)]
        for i in order:
            try:
                t = time_step(steps[i], device, warmup=0, budget_s=0.0, min_reps=1, max_reps=1)[0]
            except Exception as exc:
                out[i] = exc
                continue
            out[i].append(t)  # type: ignore[union-attr]
            spent[i] += t / 1e3
        live = [i for i in live if not isinstance(out[i], Exception) and len(out[i]) < max_reps
                and (len(out[i]) < min_reps or spent[i] < budget_s)]
        rnd += 1
    return out


def _measure_case(case: Case, todo: Sequence[tuple[Provider, str]], inputs: dict[str, Any], ref: Any,
                  device: torch.device, *, memory: bool, budget_s: float, warmup: int, min_reps: int,
                  max_reps: int) -> list[dict[str, Any]]:
    """Every (provider, mode) of one case: set up and error-checked one after the other, timed interleaved
    (:func:`interleaved_times`), then peak memory one at a time (a fresh process each on CPU)."""
    results = [_empty_result() for _ in todo]
    steps: list[Step | None] = []
    for (provider, mode), out in zip(todo, results):
        try:
            step = _as_step(provider.setup(inputs, mode))
            first = _call(step)  # first call: the error check (and a warmup)
            if provider.checked and ref is not None:
                out["max_abs_err"] = max_abs_error(first, ref, mode)
            del first
            steps.append(step)
        except Exception as exc:
            _failed(out, exc)
            steps.append(None)
    ready = [i for i, st in enumerate(steps) if st is not None]
    times = interleaved_times([steps[i] for i in ready], device, warmup=max(warmup - 1, 0), budget_s=budget_s,
                              min_reps=min_reps, max_reps=max_reps)
    for i, t in zip(ready, times):
        if isinstance(t, Exception):
            _failed(results[i], t)
            steps[i] = None
            continue
        med, p20, p80 = quantiles(t)
        results[i].update(median_ms=med, p20_ms=p20, p80_ms=p80, reps=len(t))
    if memory:
        for i, ((provider, mode), out) in enumerate(zip(todo, results)):
            if steps[i] is None:
                continue
            try:
                if device.type == "cuda":
                    out["peak_mem_mb"], out["mem_method"] = cuda_peak_mb(steps[i], device)
                else:
                    steps[i] = None
                    gc.collect()
                    out["peak_mem_mb"], out["mem_method"] = cpu_peak_fresh_process(case, provider, mode)
            except Exception as exc:
                out["reason"] = f"memory not measured: {type(exc).__name__}: {exc}"[:300]
    return results


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """time_vs_baseline = median / baseline median; mem_vs_baseline = peak / baseline peak (same mode)."""
    for r in rows:
        r["time_vs_baseline"] = r["mem_vs_baseline"] = None
        base = next((b for b in rows if b["provider"] == r["baseline"] and b["mode"] == r["mode"]
                     and b["status"] == "ok"), None)
        if base is None or r["status"] != "ok":
            continue
        if base["median_ms"]:
            r["time_vs_baseline"] = r["median_ms"] / base["median_ms"]
        if base["peak_mem_mb"] and r["peak_mem_mb"] is not None:
            r["mem_vs_baseline"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def ratio(
    rows: list[dict[str, Any]], case: str, num: str, den: str, key: str, mode: str = "full"
) -> float | None:
    """rows[num][key] / rows[den][key] for one case label (None when either is missing)."""
    def get(name: str) -> float | None:
        r = next((r for r in rows if r["case"] == case and r["provider"] == name and r["mode"] == mode
                  and r["status"] == "ok"), None)
        return None if r is None else r.get(key)

    a, b = get(num), get(den)
    return None if a is None or not b else a / b


def _raise_skip(inputs: dict[str, Any], mode: str, *, reason: str) -> Any:
    raise Skip(reason)


def skipped(name: str, reason: str) -> Provider:
    """A provider row that is not run here, with the reason printed as its skip line."""
    return Provider(name, functools.partial(_raise_skip, reason=reason))


def _no_inputs(device: torch.device, seed: int) -> dict[str, Any]:
    return {}


def _allocate(mb: float) -> torch.Tensor:
    return torch.ones(int(mb * 2**20) // 4, dtype=torch.float32)  # written, so every page is resident


def _setup_allocate(inputs: dict[str, Any], mode: str, *, mb: float) -> Any:
    return functools.partial(_allocate, mb)


def calibration_case(mb: float) -> Case:
    """A case whose providers allocate and touch ``mb`` MiB ("alloc") and 1 MiB ("small") per iteration:
    checks that the peak-memory measurement sees a known allocation (used by the tests)."""
    return Case(family="calibration", op="allocate", sizes={"MiB": mb}, make_inputs=_no_inputs,
                providers=[Provider("alloc", functools.partial(_setup_allocate, mb=mb), checked=False),
                           Provider("small", functools.partial(_setup_allocate, mb=1.0), checked=False)],
                baseline="alloc")


# -------------------------------------------------------------------------------------------------------
# Command-line driver (shared by `fastkd bench` and `python bench/bench_<family>.py`)
# -------------------------------------------------------------------------------------------------------


def discover_families() -> dict[str, str]:
    """family name → module name for every ``bench_<family>.py`` beside this module."""
    return {p.stem[len("bench_"):]: f"fastkd.bench.{p.stem}" for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def _split(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


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


def add_bench_arguments(parser: argparse.ArgumentParser, families: bool = True) -> None:
    """Options of ``fastkd bench`` and ``python bench/bench_<family>.py`` (bench owns them; ``fastkd.cli``
    forwards its ``bench`` arguments to :func:`main`)."""
    if families:
        parser.add_argument("--families", default=None,
                            help="comma list of families to run (default: every bench/bench_*.py)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke test)")
    size.add_argument("--design", action="store_true",
                      help="the target sizes of docs/DESIGN.md (slow on CPU: minutes per case)")
    parser.add_argument("--providers", default=None,
                        help="comma list; keep providers whose name contains one of these (baseline kept)")
    parser.add_argument("--modes", default=None, help="comma list of fwd,bwd,full (default: each case's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="results directory (default: bench/results)")
    parser.add_argument("--csv", default=None, help="CSV file to append rows to (default: OUT/results.csv)")
    parser.add_argument("--json", default=None, help="JSON file to append to (default: OUT/results.json)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="where to write the run's plot (default: OUT/bench-<run id>.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--budget", type=_positive_float, default=None,
                        help="seconds of timed repetitions per measurement (default 0.5, 0.05 with --quick)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")


def build_parser(prog: str = "fastkd bench", families: bool = True,
                 description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description or "Benchmark every op family (bench/bench_*.py): one table per "
        "family, rows appended to bench/results/results.csv|json, one PNG plot of the run.")
    add_bench_arguments(parser, families=families)
    return parser


def run_bench(args: Any, modules: list[Any] | None = None, console: Any = None) -> int:
    """Run families per parsed ``args`` (see :func:`add_bench_arguments`); returns an exit code."""
    import importlib

    from rich.console import Console

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda requested but CUDA is not available")
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "design" if args.design else "default"
    if modules is None:
        found = discover_families()
        wanted = _split(getattr(args, "families", None)) or list(found)
        unknown = [f for f in wanted if f not in found]
        if unknown:
            console.print(f"[red]unknown bench families {unknown}; available: {sorted(found)}")
            return 2
        modules = [importlib.import_module(found[f]) for f in wanted]
    modes = _split(args.modes)
    if modes and any(m not in MODES for m in modes):
        console.print(f"[red]--modes must be a comma list of {MODES}, got {args.modes!r}")
        return 2
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 0.5)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    t_run = time.perf_counter()
    load = _load_avg()
    console.print(f"load average {'n/a' if load is None else f'{load:.2f}'} on {os.cpu_count()} cores",
                  highlight=False)
    caveat = load_caveat(load)
    if caveat:
        console.print(f"[yellow]{caveat}")
    all_rows: list[dict[str, Any]] = []
    for mod in modules:
        if not callable(getattr(mod, "cases", None)):
            console.print(f"[yellow]{mod.__name__} does not define cases(device, preset); skipped "
                          "(run it directly with python)")
            continue
        t_fam = time.perf_counter()
        cases = mod.cases(device, preset)
        rows = run_cases(cases, device, providers=_split(args.providers), modes=modes,
                         memory=not args.no_memory, budget_s=budget, warmup=2 if args.quick else 1,
                         min_reps=2 if args.quick else 3, console=console, run_id=run_id, family=mod.FAMILY)
        print_table(rows, console, title=f"fastkd bench — {mod.FAMILY} on {device_name(device)} "
                                         f"({time.perf_counter() - t_fam:.0f} s)")
        if hasattr(mod, "summarize"):
            mod.summarize(rows, console)
        all_rows.extend(rows)
    if not all_rows:
        console.print("[yellow]nothing was measured")
        return 1
    out = Path(args.out) if args.out else RESULTS_DIR
    csv_path, json_path = write_results(all_rows, args.csv or out / "results.csv",
                                        args.json or out / "results.json")
    console.print(f"rows appended to {csv_path} and {json_path}")
    if not args.no_plot:
        try:
            from fastkd.bench.plot import plot

            png = plot(json_path, args.plot or out / f"bench-{run_id}.png", run_id=run_id)
            console.print(f"plot of this run (time and memory relative to each case's baseline): {png}",
                          highlight=False)
        except ImportError as exc:
            console.print(f"[yellow]no plot: matplotlib is not installed ({exc}); `make bench` installs it")
        except Exception as exc:
            console.print(f"[yellow]no plot: {type(exc).__name__}: {exc}")
    caveat = load_caveat()
    if caveat:
        console.print(f"[yellow]at the end: {caveat}")
    console.print(f"bench finished in {time.perf_counter() - t_run:.0f} s", highlight=False)
    bad = [r for r in all_rows if r["status"] == "error"]
    return 1 if bad and len(bad) == len(all_rows) else 0


def main(argv: list[str] | None = None, modules: list[Any] | None = None, prog: str = "fastkd bench") -> int:
    """Parse bench options from ``argv`` and run (``fastkd bench ...`` lands here; so does
    ``python bench/bench_<family>.py ...`` with ``modules=[that module]``)."""
    description = modules[0].__doc__ if modules and len(modules) == 1 else None
    args = build_parser(prog, families=modules is None, description=description).parse_args(argv)
    return run_bench(args, modules=modules)


def cli_main(module: Any, argv: list[str] | None = None) -> int:
    """``python bench/bench_<family>.py [options]``: the same options as ``fastkd bench``."""
    return main(argv, modules=[module], prog=f"bench_{module.FAMILY}.py")


if __name__ == "__main__" and ("--memory-child" in sys.argv or "--zygote" in sys.argv):
    # Re-import under the package name so pickled Case/Step classes are the ones this code checks against.
    from fastkd.bench.harness import _child_main, _zygote_main

    _zygote_main() if "--zygote" in sys.argv else _child_main()
