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

ROOT = Path(__file__).resolve().parents[2]


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


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0040*/               @P0 BRA 0x80 ;
        /*0050*/                   FFMA R5, R4, R4, R5 ;
        /*0060*/                   MUFU.EX2 R6, R5 ;
        /*0070*/                   BRA 0x90 ;
        /*0080*/                   FADD R5, R4, R5 ;
        /*0090*/                   STL [R1], R5 ;
        /*00a0*/                   IADD3 R0, R0, 0x1, RZ ;
        /*00b0*/               @P1 BRA 0x20 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0 ;
        /*00e0*/                   NOP ;
"""


def test_sass_counts_loop_longest_path_and_pipes():
    """Loop code = one pass along the heavier side of each runtime branch; pipes and memory widths by opcode."""
    c = aot.sass_counts(SASS)
    assert c["loops"] == 1  # 0x20..0xb0 (the padding BRA to itself is no loop)
    loop, once = c["loop"], c["once"]
    # LDG, ISETP, @P0 BRA, FFMA, MUFU, BRA, STL, IADD3, @P1 BRA: the FFMA + MUFU side (FADD side skipped)
    assert loop["issue"] == 9 and loop["fma"] == 1 and loop["xu"] == 1 and loop["alu"] == 2
    assert loop["ldg"] == 32 * 16 and loop["stl"] == 32 * 4 and loop["ldl"] == 0
    assert loop["ldg_vec"] == 32 * 16  # LDG.E.128: a streamed (vector) load; a 4-byte LDG would not count
    assert once["issue"] == 3 and once["alu"] == 1  # S2R, IMAD.MOV, EXIT (the padding BRA is unreachable)
    assert c["once_path"]["issue"] == 3


# a warp reduction as ptxas lays it out: BRA.DIV (taken only by a divergent warp) to an out-of-line collective
# copy of the shuffles, which jumps back; the converged path falls through
SASS_DIV = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   BRA.DIV UR4, 0xa0 ;
        /*0030*/                   SHFL.BFLY PT, R8, R4, 0x10, 0x1f ;
        /*0040*/                   FADD R4, R4, R8 ;
        /*0050*/                   FMUL R4, R4, R4 ;
        /*0060*/                   FADD R4, R4, R8 ;
        /*0070*/                   STG.E desc[UR4][R2.64], R4 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90 ;
        /*00a0*/                   WARPSYNC.COLLECTIVE R7, 0xc0 ;
        /*00b0*/                   SHFL.BFLY P6, R8, R4, R5, R6 ;
        /*00c0*/                   ENDCOLLECTIVE ;
        /*00d0*/                   BRA 0x40 ;
"""


def test_sass_counts_skip_the_divergent_slow_path():
    """BRA.DIV falls through for a converged warp: the code after it is on the path, its out-of-line target is
    not counted, and that target's jump back is no loop (it made one range of everything between)."""
    c = aot.sass_counts(SASS_DIV)
    assert c["loops"] == 0 and c["loop"]["issue"] == 0
    # S2R, LDG, BRA.DIV, SHFL, FADD, FMUL, FADD, STG, EXIT
    assert c["once_path"]["issue"] == 9 and c["once_path"]["fma"] == 3
    assert c["once"]["issue"] == 9  # the slow path (WARPSYNC .. BRA) and the padding are not code a warp runs


def test_sass_key_of_the_model_and_the_compile_agree():
    from fastkd.bench.costcount import sass_key

    assert sass_key("k", 4, {"BLOCK": 64, "HAS_X": True, "lower": 3}) == "k|4|BLOCK=64,HAS_X=True"


def test_sass_specs_compile_and_merge(tmp_path):
    """--sass-specs: the cost model's missing launches compiled for sm_90 with SASS counts, merged by key."""
    import json

    (tmp_path / "loopk.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def loop(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            acc = tl.zeros([BLOCK], tl.float32)
            for i in range(0, n, BLOCK):
                offs = i + tl.arange(0, BLOCK)
                acc += tl.exp(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
            tl.store(y_ptr + tl.arange(0, BLOCK), acc)
    '''))
    key = "loop|4|BLOCK=512"
    specs = {key: {"module": "loopk", "name": "loop", "num_warps": 4,
                   "args": {"x_ptr": ["tensor", "float32"], "y_ptr": ["tensor", "float32"], "n": ["int", 100000],
                            "BLOCK": ["constexpr", 512]}}}
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    out = tmp_path / "sass.json"
    res = _run(f"from fastkd.bench import aot; raise SystemExit(aot.main(['--sass-specs', 'specs.json', "
               f"'--sass-out', {str(out)!r}]))", tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads(out.read_text())[key]
    assert rec["regs"] > 0 and rec["spill_bytes"] == 0 and rec["sass"]["loops"] >= 1
    loop = rec["sass"]["loop"]
    assert loop["ldg"] > 0 and loop["xu"] >= 1 and loop["issue"] > loop["fma"]  # exp: MUFU.EX2 in the loop


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


def test_split_kernel_logs_on_the_mufu_and_calls_no_division(tmp_path):
    """Compiled for sm_90 (not the interpreter), the mixtures' log is MUFU.LG2 (``_blocks._log``) and the ticket's
    divmod is a multiply and a shift: no CALL (an integer division's subroutine, whose frame ptxas reports as spill
    bytes) and no polynomial log."""
    out = _run("""
        import torch
        from fastkd.bench import aot
        launches, failures = aot.capture(False, r"^distill jsd bf16 V=131072 grad=True ce=False T=1.0$")
        assert launches and not failures, failures
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
        lc = launches[0]
        backend = make_backend(GPUTarget("cuda", 90, 32))
        binder = create_function_from_signature(lc.fn.signature, lc.fn.params, backend)
        bound, spec, opts = binder(*lc.args, **lc.kwargs)
        options, sig, consts, attrs = lc.fn._pack_args(backend, lc.kwargs, bound, spec, opts)
        ck = triton.compile(ASTSource(lc.fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options.__dict__)
        sass = aot._sass_text(ck.asm["cubin"])
        print("LG2", sass.count("MUFU.LG2"), "CALL", sass.count("CALL"), "LGPTX", ck.asm["ptx"].count("lg2.approx"))
    """, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    counts = dict(zip(*[iter(out.stdout.split()[-6:])] * 2))
    assert int(counts["LG2"]) >= 2 and int(counts["LGPTX"]) >= 2 and int(counts["CALL"]) == 0, counts
