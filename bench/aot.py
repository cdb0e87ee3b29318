"""sm_90 compile check of fastkd's Triton kernels without a GPU: ``python bench/aot.py [--all] [--json]``.

The configurations are not listed here: they are captured from the wrappers. The public functions
(``distill_loss``, ``sparse_distill_loss``, ``sinkhorn``, the gradient scaling) are called on small CPU
tensors over a grid of user-visible choices (dtype × divergence × gradient / labels / temperature × sparse
mode × K × Sinkhorn path and metric × vocabulary size); ``JITFunction.run`` is patched to record each launch
(kernel, arguments, constexprs, num_warps) instead of running it. Each distinct launch is specialised as
Triton's own launcher does (the kernel's binder: dtypes, integers equal to 1, 16-byte alignment) and compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; ``ptxas -v`` (Triton's own) on the
PTX gives registers and spills, the compiled metadata the shared memory. The check fails (exit 1) on any
compile error and on spills in a default configuration (every captured launch is one: the wrappers launch
their defaults; timing-based autotune configurations, only used with ``FASTKD_AUTOTUNE=1``, are not
checked). Without ``--all`` a representative subset (bf16, the default vocabulary block, every divergence and
sparse mode, both Sinkhorn paths) keeps it short enough for ``make test``; ``make gpu-aot`` runs ``--all``.

Must run with ``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction`` s): this module clears it
before importing the kernels, then sets it so that fastkd's backend registry accepts the CPU tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SM = 90


@dataclass
class Launch:
    """One captured launch: the JITFunction and the arguments it was called with."""

    fn: Any
    args: tuple
    kwargs: dict
    label: str


@dataclass
class Result:
    kernel: str
    label: str
    constexprs: str
    num_warps: int
    regs: int | None = None
    spill_bytes: int | None = None
    shared: int | None = None
    compile_s: float = 0.0
    error: str | None = None
    key: str = field(default="", repr=False)
    stack: int | None = None  # bytes of stack frame per thread (local memory: spills and local arrays)
    sass: dict | None = field(default=None, repr=False)  # sass_counts() of the cubin (with sass=True)
    sass_key: str = ""  # costcount.sass_key of the launch: how the cost model finds this compile


@contextlib.contextmanager
def capturing(out: list[Launch], label: list[str]) -> Iterator[None]:
    """Record every JITFunction launch (``label[0]`` names the call) and skip running it."""
    from triton.runtime.jit import JITFunction

    old = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        out.append(Launch(self, args, dict(kwargs), label[0]))
        return None

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = old


def _import_kernels(extra: tuple[str, ...] = ()) -> None:
    """Import fastkd (and the modules ``extra``) with TRITON_INTERPRET unset (real JITFunctions), then let the
    registry accept CPU tensors."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "fastkd.kernels.distill" in sys.modules:
        raise RuntimeError("bench/aot.py needs real JITFunctions: run it in a process without TRITON_INTERPRET=1")
    os.environ.pop("TRITON_INTERPRET", None)
    import fastkd  # noqa: F401
    import fastkd.kernels.distill  # noqa: F401
    import fastkd.kernels.distill_akl  # noqa: F401
    import fastkd.kernels.distill_split  # noqa: F401
    import fastkd.kernels.onpolicy  # noqa: F401
    import fastkd.kernels.sinkhorn  # noqa: F401
    import fastkd.kernels.sparse  # noqa: F401
    import fastkd.kernels.sparse_split  # noqa: F401
    import fastkd.kernels.topk  # noqa: F401

    for mod in LIGER_MODULES + extra:  # the published baselines' kernels (bench/model.py --calibrate)
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    os.environ["TRITON_INTERPRET"] = "1"  # fastkd.core.registry: CPU tensors are acceptable (launches are faked)


LIGER_MODULES = ("liger_kernel.ops.kl_div", "liger_kernel.ops.tvd", "liger_kernel.ops.cross_entropy",
                 "liger_kernel.ops.jsd", "liger_kernel.ops.backends._triton.jsd")


def calls(full: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(label, call) pairs covering the user-visible choices that select kernel configurations."""
    import torch

    import fastkd
    from fastkd.core.autograd import scale_grad_
    from fastkd.sparse.op import MODES, SPARSE_DIVERGENCES

    dtypes = (torch.bfloat16, torch.float32, torch.float16) if full else (torch.bfloat16,)
    vocabs = (131072, 1000, 50257) if full else (131072,)
    short = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}

    def distill(dt, v, div, grad, labels, temp, stats=False):
        s = torch.zeros(2, v, dtype=dt).requires_grad_(grad)
        t = torch.zeros(2, v, dtype=dt)
        kw = {"labels": torch.zeros(2, dtype=torch.int64), "ce_weight": 0.5} if labels else {}
        fastkd.distill_loss(s, t, div, temperature=temp, backend="triton", return_stats=stats, **kw)

    for dt in dtypes:
        for v in vocabs:
            for div in fastkd.DIVERGENCES:
                variants = [(True, False, 1.0)]
                if full:
                    variants += [(False, False, 1.0), (True, True, 1.0), (True, True, 2.0)]
                elif div == "fkl":
                    variants += [(True, True, 2.0)]
                for grad, labels, temp in variants:
                    yield (f"distill {div} {short[dt]} V={v} grad={grad} ce={labels} T={temp}",
                           lambda dt=dt, v=v, div=div, grad=grad, labels=labels, temp=temp:
                           distill(dt, v, div, grad, labels, temp))
        for v in (131072, 50257):  # return_stats=True: the kernels' STATS variants (label suffix " stats")
            for div, temp in (("fkl", 1.0), ("fkl", 2.0), ("jsd", 1.0), ("akl", 1.0)):
                yield (f"distill {div} {short[dt]} V={v} grad=True ce=False T={temp} stats",
                       lambda dt=dt, v=v, div=div, temp=temp: distill(dt, v, div, True, False, temp, True))
        g = torch.zeros(2, vocabs[0], dtype=dt)
        yield f"scale_grad {short[dt]}", lambda g=g: scale_grad_(g, torch.full((2,), 2.0), True)

    def sparse(dt, v, k, mode, div, sched):
        from fastkd.sparse import triton_impl as TS

        old, TS.CONFIG["schedule"] = TS.CONFIG["schedule"], sched
        try:
            sparse_call(dt, v, k, mode, div)
        finally:
            TS.CONFIG["schedule"] = old

    def sparse_call(dt, v, k, mode, div):
        s = torch.zeros(2, v, dtype=dt).requires_grad_(True)
        ids = torch.arange(k).repeat(2, 1)
        if mode == "sampled":  # draws: values are counts
            fastkd.sparse_distill_loss(s, ids, torch.ones(2, k), values="counts", mode=mode, divergence=div,
                                       backend="triton")
        else:
            fastkd.sparse_distill_loss(s, ids, torch.full((2, k), -10.0), mode=mode, divergence=div,
                                       backend="triton")

    for dt in dtypes:
        for k in (64, 8, 256) if full else (64,):  # 256: the O(K) id paths stay in registers
            for mode in MODES:
                divs = SPARSE_DIVERGENCES if mode == "topk" or (full and mode == "topk_tail") else ("fkl",)
                for div in divs:  # sampled estimates the forward KL only
                    # the row-per-program fallback too (subset: both stats and both gradient variants)
                    row = full or (mode, div) in (("topk_tail", "fkl"), ("topk", "rkl"))
                    for sched in ("split", "row") if row else ("split",):
                        yield (f"sparse {mode} {div} {short[dt]} K={k} {sched}",
                               lambda dt=dt, k=k, mode=mode, div=div, sched=sched:
                               sparse(dt, 128256, k, mode, div, sched))

    def onpolicy(dt, v, k):  # the on-policy row kernels (fastkd.onpolicy.triton_impl): log-probs, then gradient
        from fastkd.onpolicy import triton_impl as TO

        z = torch.zeros(2, v, dtype=dt)
        ids = torch.arange(k).repeat(2, 1)
        shift, ld, _ = TO.row_logprobs(z, ids, 1.0)
        TO.row_grad_(z, ids, torch.ones(2, k), shift, ld, 1.0)

    for dt in dtypes:
        for v in vocabs:
            for k in (1, 4, 64) if full else (1, 64):
                yield f"onpolicy {short[dt]} V={v} K={k}", lambda dt=dt, v=v, k=k: onpolicy(dt, v, k)

    def sinkhorn(n, metric, with_cost):
        x, y = torch.rand(2, n, 3), torch.rand(2, n + 3, 3)
        if with_cost:
            fastkd.sinkhorn(cost=torch.rand(2, n, n + 3), eps=0.1, max_iter=2, tol=0, backend="triton")
        else:
            fastkd.sinkhorn(x=x, y=y, metric=metric, eps=0.1, max_iter=2, tol=0, backend="triton")

    metrics = ("sqeuclidean", "euclidean", "l1", "cosine") if full else ("sqeuclidean",)
    for n in (40, 300):
        for metric in metrics:
            yield f"sinkhorn n={n} {metric}", lambda n=n, metric=metric: sinkhorn(n, metric, False)
        yield f"sinkhorn n={n} cost", lambda n=n: sinkhorn(n, "sqeuclidean", True)

    from fastkd.kernels.topk import topk_lse_rows  # teacher-cache extraction: streaming top-k + lse / tails

    taus = (1.0, 2.0, 0.5, 4.0, 3.0, 1.5, 0.7, 8.0)
    for k in (8, 32, 64, 128) if full else (8, 128):
        for j in (1, 8) if full else ((8,) if k == 128 else (1,)):  # subset: the two extremes only
            yield f"topk K={k} J={j}", lambda k=k, j=j: topk_lse_rows(torch.zeros(2, 131072), k, taus[:j])


def capture(full: bool, only: str | None = None) -> tuple[list[Launch], list[str]]:
    """Every launch the wrappers make over :func:`calls` (those whose label matches the regular expression
    ``only``, searched, when given); and the calls that raised (not launches)."""
    _import_kernels()
    launches: list[Launch] = []
    failures: list[str] = []
    label = [""]
    pattern = re.compile(only) if only else None
    with capturing(launches, label):
        for name, call in calls(full):
            if pattern is not None and not pattern.search(name):
                continue
            label[0] = name
            try:
                call()
            except Exception as exc:  # a call may fail after its (skipped) launch reads garbage: fine if launched
                if not any(lc.label == name for lc in launches):
                    failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return launches, failures


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(log: str) -> tuple[int | None, int]:
    """(registers, spill bytes stored + loaded) from ``ptxas -v`` output (the largest over its functions)."""
    regs = [int(m) for m in _PTXAS_RE["regs"].findall(log)]
    spills = [int(a) + int(b) for a, b in zip(_PTXAS_RE["spill_st"].findall(log), _PTXAS_RE["spill_ld"].findall(log))]
    return (max(regs) if regs else None), (max(spills) if spills else 0)


def parse_stack(log: str) -> int:
    """Bytes of stack frame per thread from ``ptxas -v`` output (the largest over its functions)."""
    return max([int(m) for m in _PTXAS_RE["stack"].findall(log)] or [0])


# SASS opcodes by the sm_90 pipe that executes them (lanes per SM-clock: fma 128, alu 64, xu 16; every
# instruction also takes one issue slot of its SM sub-partition: 4 warp-instructions per SM-clock)
FMA_OPS = frozenset({"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "HFMA2", "HADD2", "HMUL2",
                     "FSWZADD"})
ALU_OPS = frozenset({"IADD3", "IADD", "IADD32I", "IMAD", "IMUL", "IMUL32I", "IMAD32I", "LOP3", "LOP", "LOP32I",
                     "SHF", "SHL", "SHR", "ISETP", "FSETP", "HSETP2", "FSEL", "SEL", "LEA", "IMNMX", "FMNMX",
                     "VIMNMX", "VIADD", "VIADDMNMX", "PRMT", "ISCADD", "IABS", "PLOP3", "P2R", "R2P", "FCHK",
                     "I2FP", "F2FP", "FSET", "ISET", "CSET", "CSETP", "HMNMX2", "BMSK", "SGXT", "IDP"})
XU_OPS = frozenset({"MUFU", "F2F", "F2I", "I2F", "FRND", "POPC", "FLO", "BREV"})
_SASS_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")


def _width(mods: str) -> int:
    """Bytes per lane of a memory instruction from its modifiers (.128, .64, .U16, ...; default 32-bit)."""
    for tag, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if tag in mods:
            return w
    return 4


def _blank() -> dict[str, int]:
    return dict.fromkeys(("fma", "alu", "xu", "issue", "ldg", "ldg_vec", "ldl", "stl"), 0)


def _add(c: dict[str, int], op: str, mods: str) -> None:
    c["issue"] += 1
    pipe = "fma" if op in FMA_OPS else "alu" if op in ALU_OPS else "xu" if op in XU_OPS else None
    if pipe:
        c[pipe] += 1
    if op in ("LDG", "LDL", "STL"):
        c[op.lower()] += 32 * _width(mods)
    if op == "LDG" and _width(mods) >= 8:  # a vector load: streamed data (a scalar or replicated slot is 4 B)
        c["ldg_vec"] += 32 * _width(mods)


def _longest_path(body: list[tuple[int, str, str, str, bool]], lo: int, hi: int,
                  skip: list[list[int]] | None = None) -> dict[str, int]:
    """Counts along the longest (most instructions issued) path through one loop body: basic blocks split
    at branch targets and after branches, forward edges only (the back edge closes the iteration), so a
    runtime branch (a kernel argument's case split, a full block vs the masked tail) counts its heavier side
    once, not both."""
    targets = {int(t[1], 16) for _, op, mods, args, _ in body if _is_jump(op, mods)
               for t in [_TARGET.search(args)] if t}
    blocks: list[list] = [[]]
    for ins in body:
        if blocks[-1] and ins[0] in targets:
            blocks.append([])
        blocks[-1].append(ins)
        if _ends_block(ins[1], ins[2]):
            blocks.append([])
    blocks = [b for b in blocks if b]
    start = {b[0][0]: i for i, b in enumerate(blocks)}
    best: list[tuple[int, dict] | None] = [None] * len(blocks)
    best[0] = (0, _blank())
    top = (0, _blank())
    for i, blk in enumerate(blocks):
        if best[i] is None:
            continue
        c = dict(best[i][1])
        for a, op, mods, _, _ in blk:
            if op != "NOP" and not (skip and any(s_lo <= a <= s_hi for s_lo, s_hi in skip)):
                _add(c, op, mods)
        here = (c["issue"], c)
        if here[0] > top[0]:
            top = here
        addr, op, mods, args, cond = blk[-1]
        nxt = []
        if _falls_through(op, mods, cond) and i + 1 < len(blocks):
            nxt.append(i + 1)
        t = _TARGET.search(args) if _is_jump(op, mods) else None
        if t and lo <= int(t[1], 16) <= hi and int(t[1], 16) > addr and int(t[1], 16) in start:
            nxt.append(start[int(t[1], 16)])
        for j in nxt:
            if best[j] is None or best[j][0] < here[0]:
                best[j] = here
    return top[1]


def _is_jump(op: str, mods: str) -> bool:
    """A branch the longest paths follow. ``BRA.DIV`` (an unpredicated branch taken only when the warp is
    divergent: ptxas's out-of-line slow path of a warp shuffle or vote) is not one: a converged warp falls
    through it, so its target is not followed and the branch has a fall-through."""
    return op in ("BRA", "JMP") and ".DIV" not in mods


def _ends_block(op: str, mods: str) -> bool:
    """A followed branch or an exit: the last instruction of a basic block."""
    return _is_jump(op, mods) or op in ("EXIT", "RET")


def _falls_through(op: str, mods: str, cond: bool) -> bool:
    """Whether the next instruction can follow: always, unless an unpredicated block end."""
    return cond or not _ends_block(op, mods)


def _converged(insns: list[tuple[int, str, str, str, bool]]) -> list[tuple[int, str, str, str, bool]]:
    """The instructions a converged warp can reach from the entry (fall-throughs and followed branches):
    without the divergent slow paths (their jump back into the code they left would make a loop range of
    everything between) and padding after the last EXIT."""
    if not insns:
        return insns
    index = {ins[0]: k for k, ins in enumerate(insns)}
    seen = [False] * len(insns)
    todo = [0]
    while todo:
        k = todo.pop()
        while k < len(insns) and not seen[k]:
            seen[k] = True
            addr, op, mods, args, cond = insns[k]
            t = _TARGET.search(args) if _is_jump(op, mods) else None
            if t and int(t[1], 16) in index:
                todo.append(index[int(t[1], 16)])
            if not _falls_through(op, mods, cond):
                break
            k += 1
    return [ins for k, ins in enumerate(insns) if seen[k]]


def sass_counts(sass: str) -> dict[str, dict[str, int]]:
    """Warp-instruction counts of one kernel's SASS (``cuobjdump -sass``): ``loop`` = the longest path through
    one iteration of each loop (outermost ranges closed by a backward branch; a nested loop counts once
    with its parent), summed over the loops; ``once`` = every instruction outside loops, ``once_path`` = those
    along the longest path from the kernel's entry (what one warp runs once). Per part:
    instructions per pipe (``fma``, ``alu``, ``xu``; ``issue`` = all but NOP) and bytes per warp moved by
    global loads (``ldg``: 32 lanes × width; ``ldg_vec``: those of 8 B or more per lane, the streamed blocks)
    and by local memory (``ldl`` / ``stl``: spills, local arrays). Only the code a converged warp runs is
    counted (:func:`_converged`: a divergent slow path is neither on a path nor a loop)."""
    insns = _converged([(int(m[1], 16), m[3], m[4], m[5], bool(m[2]) and "PT" not in m[2])
                        for m in _SASS_INSN.finditer(sass)])
    ranges: list[list[int]] = []
    for addr, op, mods, args, _ in insns:
        t = _TARGET.search(args) if _is_jump(op, mods) else None
        if t and int(t[1], 16) < addr:
            ranges.append([int(t[1], 16), addr])
    ranges.sort()
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    loop, once = _blank(), _blank()
    for lo, hi in merged:
        path = _longest_path([i for i in insns if lo <= i[0] <= hi], lo, hi)
        for k in loop:
            loop[k] += path[k]
    for addr, op, mods, _, _ in insns:
        if op != "NOP" and not any(lo <= addr <= hi for lo, hi in merged):
            _add(once, op, mods)
    # the straight-line code along its longest path from the entry (loops traversed, not counted): a program
    # runs one side of each runtime branch (its phase, full block or tail, segment 0's merge or not)
    once_path = _longest_path(insns, insns[0][0], insns[-1][0], merged) if insns else _blank()
    return {"loop": loop, "once": once, "once_path": once_path, "loops": len(merged)}


def _sass_text(cubin: bytes) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(get_ptxas(SM).path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        return subprocess.run([str(cuobjdump), "-sass", str(f)], capture_output=True, text=True, check=True).stdout


def _launch_sass_key(lc: Launch) -> str:
    import inspect

    from fastkd.bench.costcount import sass_key

    fn = lc.fn
    kw = {k: v for k, v in lc.kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    bound = inspect.signature(fn.fn).bind_partial(*lc.args, **kw)
    bound.apply_defaults()
    cx = {p.name: bound.arguments.get(p.name) for p in fn.params if p.is_constexpr}
    return sass_key(fn.__name__, int(lc.kwargs.get("num_warps") or 4), cx)


def compile_launch(lc: Launch, seen: dict[str, Result], sass: bool = False) -> Result | None:
    """Compile one launch for sm_90 as the launcher would specialise it; None when already compiled.
    ``sass``: also count the cubin's SASS instructions per pipe (:func:`sass_counts`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", SM, 32)
    backend = make_backend(target)
    fn = lc.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*lc.args, **lc.kwargs)
    options, sig, consts, attrs = fn._pack_args(backend, lc.kwargs, bound, spec, opts)
    names = [p.name for p in fn.params]
    cx = {names[k[0]]: v for k, v in consts.items() if sig.get(names[k[0]]) == "constexpr"}
    key = f"{fn.__name__}|{sig}|{consts}|{attrs}|{options.num_warps}|{options.num_stages}"
    if key in seen:
        return None
    res = Result(fn.__name__, lc.label, ", ".join(f"{k}={v}" for k, v in cx.items() if k.isupper()),
                 options.num_warps, key=key)
    seen[key] = res
    t0 = time.perf_counter()
    try:
        ck = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__)
        res.shared = int(ck.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(ck.asm["ptx"])
            out = subprocess.run([get_ptxas(SM).path, "-v", f"--gpu-name=sm_{SM}a", str(ptx), "-o",
                                  str(Path(tmp) / "k.o")], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"ptxas failed: {out.stderr.strip()[:300]}")
            res.regs, res.spill_bytes = parse_ptxas(out.stdout + out.stderr)
            res.stack = parse_stack(out.stdout + out.stderr)
        if sass:
            res.sass = sass_counts(_sass_text(ck.asm["cubin"]))
            res.sass_key = _launch_sass_key(lc)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
    res.compile_s = time.perf_counter() - t0
    return res


def check(launches: list[Launch], limit_s: float | None = None,
          on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Compile every distinct launch (``on_result`` sees each result as it comes)."""
    seen: dict[str, Result] = {}
    results = []
    start = time.perf_counter()
    for lc in launches:
        if limit_s is not None and time.perf_counter() - start > limit_s:
            break
        r = compile_launch(lc, seen)
        if r is not None:
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


def failures(results: list[Result]) -> list[str]:
    """Compile errors and spills (every captured launch is a default configuration)."""
    out = [f"{r.kernel} [{r.constexprs}] ({r.label}): {r.error}" for r in results if r.error]
    out += [f"{r.kernel} [{r.constexprs}] ({r.label}): {r.spill_bytes} bytes of register spills"
            for r in results if not r.error and r.spill_bytes]
    return out


def spec_launches(specs: dict[str, dict]) -> list[Launch]:
    """Launches re-created from the cost model's specs (bench/costcount.launch_spec): the kernel's
    JITFunction, small CPU tensors of each pointer argument's dtype (16-byte aligned), the scalars and
    constexprs as recorded."""
    import torch
    from triton.runtime.jit import JITFunction

    _import_kernels(tuple(sorted({sp["module"] for sp in specs.values()})))
    out = []
    for key, sp in specs.items():
        fn = getattr(importlib.import_module(sp["module"]), sp["name"])
        while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # autotuner / heuristics wrappers
            fn = fn.fn
        kwargs = {k: torch.empty(64, dtype=getattr(torch, v)) if kind == "tensor" else v
                  for k, (kind, v) in sp["args"].items()}
        out.append(Launch(fn, (), {**kwargs, "num_warps": sp["num_warps"]}, key))
    return out


def record(r: Result) -> dict:
    """The compile record the cost model reads (bench/data/sass_sm90.json)."""
    return {"kernel": r.kernel, "num_warps": r.num_warps, "constexprs": r.constexprs, "regs": r.regs,
            "spill_bytes": r.spill_bytes, "stack": r.stack, "shared": r.shared, "sass": r.sass, "error": r.error}


def compile_specs(path: Path, out: Path) -> int:
    """``--sass-specs FILE``: compile the cost model's missing launches for sm_90 with SASS counts and merge
    their records into ``out``; exit 1 on a compile error or a record whose key differs from the spec's."""
    specs = json.loads(path.read_text())
    records = json.loads(out.read_text()) if out.exists() else {}
    bad = []
    for lc in spec_launches(specs):
        r = compile_launch(lc, {}, sass=True)
        print(table_row(r), flush=True)
        if r.error:
            bad.append(f"{lc.label}: {r.error}")
            continue
        if r.sass_key != lc.label:
            bad.append(f"key mismatch: model {lc.label!r} vs compile {r.sass_key!r}")
        import triton

        from fastkd.bench import costcount

        records[lc.label] = {**record(r), "source": costcount.source_fingerprint(specs[lc.label]["module"],
                                                                                   triton.__version__)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


HEADER = f"{'kernel':<28} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'s':>5}  constexprs / first call"


def table_row(r: Result) -> str:
    status = "ERROR " + (r.error or "") if r.error else ""
    return (f"{r.kernel:<28} {r.num_warps:>5} {r.regs if r.regs is not None else '-':>5} "
            f"{r.spill_bytes if r.spill_bytes is not None else '-':>6} "
            f"{r.shared if r.shared is not None else '-':>7} {r.compile_s:>5.1f}  [{r.constexprs}] ({r.label}) "
            f"{status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sm_90 compile check of every Triton kernel configuration")
    parser.add_argument("--all", action="store_true", help="every dtype, vocabulary size and variant (slow)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--only", metavar="REGEX", default=None,
                        help="compile only the calls whose label matches (re.search), e.g. 'distill akl .*V=1000'; "
                             "labels: 'distill DIV DTYPE V=.. grad=.. ce=.. T=..', "
                             "'sparse MODE DIV DTYPE K=.. split|row', 'scale_grad DTYPE', 'sinkhorn n=.. METRIC', "
                             "'topk K=.. J=..', 'onpolicy DTYPE V=.. K=..'")
    parser.add_argument("--sass-specs", metavar="FILE", default=None,
                        help="compile the launches of FILE (the cost model's missing compile records, JSON) with "
                             "SASS instruction counts and merge them into --sass-out")
    parser.add_argument("--sass-out", metavar="FILE", default=str(Path(__file__).resolve().parent / "data"
                                                                   / "sass_sm90.json"))
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    if args.sass_specs:
        return compile_specs(Path(args.sass_specs), Path(args.sass_out))
    t0 = time.perf_counter()
    launches, call_errors = capture(args.all, args.only)
    if args.only and not launches and not call_errors:
        print(f"no call label matches --only {args.only!r}", file=sys.stderr)
        return 1
    if not args.json:
        print(HEADER, flush=True)
    results = check(launches, on_result=None if args.json else lambda r: print(table_row(r), flush=True))
    bad = call_errors + failures(results)
    if args.json:
        print(json.dumps([{k: v for k, v in r.__dict__.items() if k != "key"} for r in results], indent=1))
    else:
        print(f"{len(results)} distinct configurations from {len(launches)} launches compiled for sm_{SM} in "
              f"{time.perf_counter() - t0:.0f} s")
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
