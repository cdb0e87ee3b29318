"""bench/aot.py: the sm_90 compile check of the Triton kernels, without a GPU.

The check runs in a subprocess with TRITON_INTERPRET unset (it needs real JITFunctions; this test session
runs the kernels in the interpreter). ``make gpu-aot`` runs every configuration (``--all``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

from fastkd.bench import aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}", TRITON_DEFAULT_FP_FUSION="1",
               TRITON_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout)


def test_parse_ptxas():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 32 bytes smem\n")
    assert aot.parse_ptxas(log) == (255, 16)
    assert aot.parse_ptxas("ptxas info : Used 40 registers\n    0 bytes spill stores, 0 bytes spill loads") == (40, 0)


def test_broken_kernel_fails_and_good_kernel_compiles(tmp_path):
    (tmp_path / "tinyk.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def good(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

        @triton.jit
        def broken(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)  # BLOCK=48: not a power of two, a compile error
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
    '''))
    out = _run('''
        import torch
        from fastkd.bench import aot
        import tinyk
        x = torch.zeros(64)
        launches = []
        with aot.capturing(launches, ["tiny"]):
            tinyk.good[(1,)](x, 64, BLOCK=64, num_warps=4)
            tinyk.broken[(1,)](x, 64, BLOCK=48, num_warps=4)
        res = aot.check(launches)
        for r in res:
            print("RESULT", r.kernel, r.regs, r.spill_bytes, r.error is not None)
        print("FAILURES", len(aot.failures(res)))
    ''', tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {ln.split()[1]: ln.split()[2:] for ln in out.stdout.splitlines() if ln.startswith("RESULT")}
    assert lines["good"][2] == "False" and int(lines["good"][0]) > 0 and lines["good"][1] == "0"
    assert lines["broken"][2] == "True"
    assert "FAILURES 1" in out.stdout


@pytest.mark.slow
def test_sm90_compile_subset(tmp_path):
    """Every kernel configuration of the representative subset compiles for sm_90 without spills."""
    out = _run("from fastkd.bench import aot; raise SystemExit(aot.main([]))", tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for kernel in ("_distill_split_kernel", "_akl_split_kernel", "_sparse_split_kernel", "_sparse_stats_kernel",
                   "_topk_kernel"):
        assert kernel in out.stdout, kernel
    assert "_sinkhorn_half_step_kernel" in out.stdout


def test_only_filter_compiles_the_matching_calls(tmp_path):
    """--only REGEX compiles only the calls whose label matches; a pattern matching nothing fails (exit 1)."""
    out = _run("from fastkd.bench import aot; raise SystemExit(aot.main(['--only', '^scale_grad bf16$']))", tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("_")]
    assert len(rows) == 1 and rows[0].startswith("_scale_grad_kernel") and "(scale_grad bf16)" in rows[0]
    none = _run("from fastkd.bench import aot; raise SystemExit(aot.main(['--only', 'no such label']))", tmp_path)
    assert none.returncode == 1 and "no call label matches" in none.stderr
