"""The GPU cost model (bench/model.py) on cases whose answer is known exactly (model, not a GPU run)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the cost model counts Triton bytes in the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastkd.bench import model as M  # noqa: E402


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _reread_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    b = tl.load(x_ptr + offs, mask=offs < n, other=0.0)  # the same bytes again
    tl.store(y_ptr + offs, a + b, mask=offs < n)


def test_torch_copy_moves_twice_its_bytes():
    x = torch.randn(1000)
    y = torch.empty(1000)
    with M.TorchCounter() as c:
        x.clone()
        y.copy_(x)
    assert [o.bytes for o in c.ops] == [8000.0, 8000.0]


def test_matmul_flops_are_2mnk():
    a, b, acc = torch.randn(7, 5), torch.randn(5, 3), torch.randn(7, 3)
    with M.TorchCounter() as c:
        a @ b
        torch.addmm(acc, a, b)
        acc.addmm_(a, b)
        torch.bmm(a[None].expand(2, 7, 5), b[None].expand(2, 5, 3))
    mnk = 2 * 7 * 3 * 5
    assert [o.flops for o in c.ops] == [mnk, mnk + 7 * 3, mnk + 7 * 3, 2 * mnk]
    # a stride-0 (broadcast) operand counts its stored elements once
    assert c.ops[3].bytes == (7 * 5 + 5 * 3 + 2 * 7 * 3) * 4


def test_masked_off_lanes_move_nothing():
    x = torch.randn(100)
    y = torch.empty(100)
    counter = M.TritonCounter()
    with counter.active():
        _copy_kernel[(1,)](x, y, 0, BLOCK=128)  # every lane masked off
        _copy_kernel[(1,)](x, y, 100, BLOCK=128)  # 100 of 128 lanes active
    off, on = counter.launches
    assert (off.load_bytes, off.store_bytes) == (0, 0)
    assert (on.load_bytes, on.store_bytes) == (400, 400)
    assert on.alu_ops > 0
    assert torch.equal(y, x)  # the instrumented interpreter still runs the kernel


def test_l2_rule_counts_rereads_once_only_when_in_flight_fits():
    x = torch.randn(64)
    y = torch.empty(64)
    counter = M.TritonCounter()
    with counter.active():
        _reread_kernel[(1,)](x, y, 64, BLOCK=64)
    (st,) = counter.launches
    assert st.load_bytes == 2 * st.unique_load_bytes == 512
    gpu = M.GPUS["h100"]
    one = st.cost(gpu)
    assert one.bytes == 256 + 256 and "re-reads once" in one.rule
    # the audit's logits row: 8192 rows of 512 KB distinct bytes, num_warps=8 -> 132 SMs x 4 resident programs
    # hold 277 MB > 50 MB of L2, so the second read of each row is HBM traffic
    row = M.LaunchStats("k", 8, rows_total=8192, rows_run=1, load_bytes=2 * 2**19, store_bytes=2**18,
                        unique_load_bytes=2**19, max_program_bytes=2**19, programs=1)
    cost = row.cost(gpu)
    assert cost.bytes == 8192 * (2 * 2**19 + 2**18) and "from HBM: 528 progs" in cost.rule


def _distill_bytes(rows: int, v: int = 300) -> tuple[float, float]:
    import fastkd

    s = torch.randn(rows, v, requires_grad=True)
    t = torch.randn(rows, v)
    counter = M.TritonCounter()
    with counter.active():
        loss = fastkd.distill_loss(s, t, "fkl", backend="triton")
        loss.backward()
    kernels = [st for st in counter.launches if "distill" in st.kernel]
    assert kernels, [st.kernel for st in counter.launches]
    return sum(st.load_bytes for st in kernels), sum(st.store_bytes for st in kernels)


def test_distill_kernel_bytes_scale_linearly_in_rows():
    one, three = _distill_bytes(1), _distill_bytes(3)
    assert three == (3 * one[0], 3 * one[1])
    # at least the floor: each logit of both inputs read once, the gradient written once (fp32)
    assert one[0] >= 2 * 300 * 4 and one[1] >= 300 * 4


def test_model_rows_small_case():
    """The whole pipeline (meta tensors seen as CUDA, replayed custom op, torch ops) at a small size."""
    gpu = M.GPUS["h200"]
    rows = M.model_case(M.distill_case("fkl", n=64, v=1000), gpu, rows=2, providers=["fastkd", "naive"])
    by = {r["provider"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    fk, nv = by["fastkd-triton"], by["naive"]
    assert fk["floor_bytes"] == 3 * 64 * 1000 * 2
    assert 1.0 <= fk["bytes_vs_floor"] < nv["bytes_vs_floor"]
    assert fk["mem_ms"] == pytest.approx(fk["hbm_bytes"] / (gpu.hbm_bw * M.HBM_EFFICIENCY) * 1e3)
    assert fk["alu_ops"] > 64 * 1000  # the kernel's element operations are counted
    # one kernel dominates: the roofline of its bytes and its ALU operations
    assert fk["predicted_ms"] == pytest.approx(max(fk["mem_ms"], fk["alu_ms"]), rel=0.05)
    assert nv["peak_extra_mb"] > 0
    md = M.markdown(rows, gpu)
    assert "model, not measured" in md and "fastkd-triton" in md


def test_extrapolate_counts_the_fixed_part_once():
    """Two samples of a launch whose cost is E + R·c (E fixed, c per row), each scaled to N rows as the model scales
    a sample, give back E + N·c exactly, for every additive field; the compute time is the slowest extrapolated pipe."""
    gpu, n, r, e, c = M.GPUS["h200"], 8192, 2, 5000.0, 300.0

    def sample(rows: int) -> M.OpCost:
        a = e + rows * c
        pipes = {"fma": 2 * a, "alu": a, "xu": 0.5 * a, "issue": 4 * a}
        return M.OpCost("k", a * n / rows, 3 * a * n / rows, False, "rule", alu_ops=7 * a * n / rows, pipe_ms=1.0,
                        spill_bytes=0.1 * a * n / rows, sass_instr=4 * a * n / rows,
                        sass_pipes={p: v * n / rows for p, v in pipes.items()})

    whole = e + n * c
    out = M.extrapolate(sample(r), sample(2 * r), r / n, gpu)
    assert out.bytes == pytest.approx(whole, rel=1e-12) and out.flops == pytest.approx(3 * whole, rel=1e-12)
    assert out.alu_ops == pytest.approx(7 * whole, rel=1e-12)
    assert out.spill_bytes == pytest.approx(0.1 * whole, rel=1e-12)
    assert out.sass_instr == pytest.approx(4 * whole, rel=1e-12)
    assert out.sass_pipes["fma"] == pytest.approx(2 * whole, rel=1e-12)
    # issue 4·whole at 128 lanes vs alu whole at 64 and fma 2·whole at 128: the issue pipe is the slowest
    assert out.pipe_ms == pytest.approx(1e3 * 4 * whole / gpu.issue_lanes / gpu.sms / gpu.clock_hz, rel=1e-12)
    # scaling one sample by N/R instead charges E N/R times
    assert sample(r).bytes > 1.1 * whole


def test_model_split_schedule_independent_of_sample_rows():
    """A ticketed split launch (jsd) modelled from 2 or 4 sample rows gives the same bytes and element operations:
    its first and last units (which run only some phases) are counted once, and both samples take the L2 rule
    with the same program footprint. Scaled from one sample, 2 rows gave 0.43x the bytes of 4 here (at 2 rows
    no program runs all three phases, so its footprint fit the L2 window and the re-reads were counted as hits)."""
    gpu = M.GPUS["h200"]
    out = {rows: M.model_case(M.distill_case("jsd", n=512, v=20000), gpu, rows=rows, providers=["fastkd-triton"])[0]
           for rows in (2, 4)}
    assert all(r["status"] == "ok" for r in out.values()), out
    assert out[2]["hbm_bytes"] == pytest.approx(out[4]["hbm_bytes"], rel=1e-9)
    assert out[2]["alu_ops"] == pytest.approx(out[4]["alu_ops"], rel=1e-9)
    assert out[2]["hbm_bytes"] >= out[2]["floor_bytes"]


def test_model_fused_case_has_gemm_time():
    rows = M.model_case(M.fused_case("fkl", n=256, hs=64, ht=96, v=1000), M.GPUS["h100"], rows=2,
                        providers=["fastkd"])
    by = {r["provider"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    r = by["fastkd-triton"]
    # return_stats adds no pass over the logits; a teacher mixture's extra memory does not grow with M (issue 16)
    assert by["fastkd-triton+stats"]["hbm_bytes"] <= 1.02 * r["hbm_bytes"]
    m2, m3 = (by[f"fastkd-triton-{m}teachers"]["peak_extra_mb"] for m in (2, 3))
    assert m3 == pytest.approx(m2, rel=1e-3)
    assert r["gemm_ms"] > 0 and r["time_vs_gemm"] >= 1.0
    assert r["flops"] >= 2 * 256 * 1000 * (64 * 3 + 96)  # at least the four GEMMs


def test_fastkd_bench_model_flag(capsys):
    """``fastkd bench --model h100 ...`` runs bench/model.py (here with no case selected: the table header)."""
    from fastkd import cli

    assert cli.main(["bench", "--model", "h100", "--cases", "no-such-case"]) == 0
    out = capsys.readouterr().out
    assert "Cost model on H100 SXM (model, not measured)" in out


def test_softmax_rereads_follow_the_l2_rule():
    """PyTorch's softmax reads a row too long for shared memory three times; the two re-reads are HBM
    traffic unless the rows in flight fit in L2."""
    from fastkd.bench.costcount import softmax_extra_bytes

    gpu = M.GPUS["h100"]
    short = torch.empty(4, 4096, device="meta")  # 16 KB rows: shared memory, read once
    assert softmax_extra_bytes("_log_softmax", [short], gpu)[0] == 0
    mid = torch.empty(4, 32768, device="meta")  # 128 KB x 264 rows in flight = 35 MB <= 50 MB: L2 hits
    assert softmax_extra_bytes("_softmax", [mid], gpu)[0] == 0
    big = torch.empty(4, 128256, dtype=torch.bfloat16, device="meta")  # 256 KB x 264 = 68 MB > L2
    extra, rule = softmax_extra_bytes("_log_softmax", [big], gpu)
    assert extra == 2 * 4 * 128256 * 2 and "from HBM" in rule
    assert softmax_extra_bytes("_log_softmax_backward_data", [big], gpu)[0] == 4 * 128256 * 2


def test_occupancy_from_registers():
    from fastkd.bench.costcount import occupancy

    gpu = M.GPUS["h100"]
    assert occupancy(gpu, 4, 32) == 16  # 2048 threads / 128
    assert occupancy(gpu, 4, 128) == 4  # 65536 / (128 x 128)
    assert occupancy(gpu, 32, 255) == 1


# ---- calibration against published GPU runs (bench/data/published.csv) -----------------------------------


def _stored():
    import json

    return json.loads(M.CALIBRATION_JSON.read_text())


def test_every_published_case_within_tolerance():
    """The stored calibration (``python bench/model.py --calibrate``) holds every published row within ±30 %,
    the jsd spill cliff included, with every Triton launch costed from its sm_90 SASS."""
    stored = _stored()
    rows = stored["rows"]
    published = M.published_rows()
    assert [r["case"] for r in rows] == [M.case_id(p) for p in published]
    assert (stored["hbm_efficiency"], stored["gemm_efficiency"]) == (M.HBM_EFFICIENCY, M.GEMM_EFFICIENCY)
    assert M.TOLERANCE == stored["tolerance"] == 0.30
    bad = [(r["case"], round(r["ratio"], 2)) for r in rows if abs(r["ratio"] - 1) > M.TOLERANCE]
    assert not bad, bad
    assert all(M.within_tolerance(r) for r in rows)
    assert all(r["unrecorded_kernels"] == 0 for r in rows)
    # every row's Triton kernels compiled by the available release closest to the published run's
    assert [r["triton_published"] for r in rows] == [p["triton"] for p in published]
    assert all(r["triton_compiled"] == (M.published_triton(p) or triton.__version__) for r, p in zip(rows, published))
    kernels = {p["kernel"] for p in published}
    assert {"kl_div", "jsd", "tvd", "cross_entropy", "fused_linear_cross_entropy", "fused_linear_jsd"} <= kernels
    by = {r["case"].split(" fp32")[0]: r for r in rows}
    small, cliff, big = (by[f"jsd liger fwd N=8192 V={v}"] for v in (8192, 16384, 131072))
    assert small["spill_gb"] == 0 and cliff["spill_gb"] > 0 and big["spill_gb"] > 0
    assert cliff["predicted_ms"] > 5 * 2 * small["predicted_ms"]  # the cliff: > 5x per element at 2x V
    assert big["predicted_ms"] > 6 * cliff["predicted_ms"]  # and the spills go on at 8x V


def test_published_rows_compile_with_the_closest_triton(monkeypatch):
    """A published row's Triton launches are costed from the compile of the closest available release: the
    Triton floor's side folder for a row older than it, the installed release otherwise; the floor's records are
    found under a tagged key."""
    from fastkd.bench import costcount

    floor = costcount.TRITON_FLOOR
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert M.published_triton({"triton": "3.0.0"}) == floor
    assert M.published_triton({"triton": floor}) == floor
    assert M.published_triton({"triton": "3.9.0"}) is None
    assert M.published_triton({"triton": "3.10.0"}) is None
    assert M.published_triton({}) is None
    x, y = torch.randn(8), torch.empty(8)
    plain, tagged = M.TritonCounter(), M.TritonCounter(triton=floor)
    with plain.active():
        _copy_kernel[(1,)](x, y, 8, BLOCK=8)
    with tagged.active():
        _copy_kernel[(1,)](x, y, 8, BLOCK=8)
    (a,), (b,) = plain.launches, tagged.launches
    assert b.sass_key == a.sass_key + f"|triton={floor}" and b.spec == {**a.spec, "triton": floor}
    assert "triton" not in a.spec


@pytest.mark.parametrize("which", ["kl_div liger fwd N=16384 V=8192", "jsd liger fwd N=8192 V=8192"])
def test_stored_calibration_is_what_the_model_gives(which):
    """Two cheap published cases recomputed now equal the stored predictions (the table is regenerated by
    the command, not edited)."""
    row = next(p for p in M.published_rows() if M.case_id(p).startswith(which))
    stored = next(r for r in _stored()["rows"] if r["case"] == M.case_id(row))
    (now,) = M.calibrate_rows([row])
    assert now["predicted_ms"] == pytest.approx(stored["predicted_ms"], rel=1e-6)
    assert now["unrecorded_kernels"] == 0


def test_model_counts_trl_on_its_cuda_path():
    """TRL's fused loss is modelled as it runs on a GPU: its Triton kernels and bf16 GEMMs written in fp32 (off CUDA
    TRL takes torch tiles and fp32 GEMMs); TRL's own module is left as it was."""
    pytest.importorskip("trl.trainer.distillation_trainer", reason="needs trl >= 1.x")
    import trl.kernels.chunked_divergence as CD

    before = (CD._use_triton, CD._project, CD._addmm_fp32)
    n, hs, ht, v = 256, 64, 96, 1000
    rows = M.model_case(M.fused_case("fkl", n=n, hs=hs, ht=ht, v=v), M.GPUS["h100"], rows=2, providers=["trl"])
    assert (CD._use_triton, CD._project, CD._addmm_fp32) == before
    (r,) = rows
    assert r["status"] == "ok", r
    assert r["flops"] >= 2 * n * v * (2 * hs + ht + hs)  # projections of both heads plus the backward's two GEMMs
    assert "_stats_kernel" in r["l2_rule"] and "_backward_kernel" in r["l2_rule"]


def test_model_onpolicy_case_gemms_and_memory(monkeypatch):
    """on_policy_distill_loss (scalar): the three GEMMs' FLOPs; its reduction='none' and logprobs_from_hidden: four
    (the logits again in backward); peak extra memory grows with N by O(N·H) + O(N) only (64-row chunks: the
    Triton row math's bf16 workspace is 2 B per logit, 0.125 MiB / (1000 · 2 B) → 64 rows)."""
    monkeypatch.setenv("FASTKD_CHUNK_MB", "0.125")
    h, v = 64, 1000
    peaks = {}
    for n in (256, 1024):
        rows = M.model_case(M.onpolicy_case(n=n, hs=h, v=v), M.GPUS["h100"], rows=2)
        by = {r["provider"]: r for r in rows}
        assert all(r["status"] == "ok" for r in rows), rows
        gemm = 2.0 * n * v * h
        assert 3 * gemm <= by["fastkd"]["flops"] < 3.2 * gemm
        for p in ("fastkd-none", "fastkd-logprobs_from_hidden"):
            assert 4 * gemm <= by[p]["flops"] < 4.2 * gemm, p
        assert by["fastkd"]["gemm_ms"] > 0 and by["fastkd"]["time_vs_gemm"] >= 1.0
        peaks[n] = {p: r["peak_extra_mb"] * 2**20 for p, r in by.items()}
    grow = {p: peaks[1024][p] - peaks[256][p] for p in peaks[256]}
    for p in ("fastkd", "fastkd-none", "fastkd-logprobs_from_hidden"):
        assert grow[p] <= 768 * (2 * h * 2 + 64), (p, grow[p])
    assert grow["naive"] >= 768 * v * 4  # the (N, V) logits


def test_compile_missing_runs_a_tagged_launch_under_its_triton(tmp_path, monkeypatch):
    """A launch tagged with the Triton floor is compiled by bench/aot.py with the floor's side folder first on
    PYTHONPATH, and its record is merged under the tagged key (an untagged one keeps the installed Triton)."""
    import json
    from pathlib import Path

    from fastkd.bench import costcount

    floor = costcount.TRITON_FLOOR
    side = tmp_path / "triton-min"
    (side / "triton").mkdir(parents=True)
    sass = tmp_path / "sass.json"
    sass.write_text('{"old|4|": {"regs": 1}}')
    monkeypatch.setattr(costcount, "SASS_PATH", sass)
    monkeypatch.setitem(M.TRITON_DIRS, floor, side)
    monkeypatch.setattr(M, "MISSING", {f"k|4|B=8|triton={floor}": {"module": "m", "name": "k", "triton": floor},
                                       "k|4|B=16": {"module": "m", "name": "k"}})
    calls = []

    def call(cmd, env, stdout):
        specs = json.loads(Path(cmd[cmd.index("--sass-specs") + 1]).read_text())
        calls.append((specs, env.get("PYTHONPATH", ""), "TRITON_INTERPRET" in env, "--sass-out" in cmd))
        if "--sass-out" in cmd:
            Path(cmd[cmd.index("--sass-out") + 1]).write_text(json.dumps({k: {"regs": 32} for k in specs}))
        return 0

    monkeypatch.setattr(M.subprocess, "call", call)
    assert M.compile_missing() and not M.MISSING
    tagged = [c for c in calls if c[3]]
    plain = [c for c in calls if not c[3]]
    assert len(calls) == 2 and len(tagged) == len(plain) == 1
    assert tagged[0][0] == {"k|4|B=8": {"module": "m", "name": "k"}}  # the plain key and spec, as aot.py compiles it
    assert tagged[0][1].split(os.pathsep)[0] == str(side) and not tagged[0][2]
    assert plain[0][0] == {"k|4|B=16": {"module": "m", "name": "k"}} and str(side) not in plain[0][1]
    records = json.loads(sass.read_text())
    assert records[f"k|4|B=8|triton={floor}"] == {"regs": 32, "triton": floor} and records["old|4|"] == {"regs": 1}
    M.MISSING[f"j|4|triton={floor}"] = {"triton": floor}
    monkeypatch.setitem(M.TRITON_DIRS, floor, tmp_path / "absent")
    with pytest.raises(RuntimeError, match="make test-triton-min"):
        M.compile_missing()


def test_a_stale_compile_record_counts_as_missing(monkeypatch, tmp_path):
    """A compile record carries the fingerprint of the sources and Triton release it came from; when the launch's
    fingerprint differs (a kernel or a shared helper was edited since), the record is not used: the launch is
    missing, to be compiled again."""
    from fastkd.bench import costcount as C

    spec = {"module": "fastkd.kernels.distill", "name": "_k", "num_warps": 4, "args": {}}
    st = C.LaunchStats(kernel="_k", num_warps=4, rows_total=1, rows_run=1, sass_key="_k|4|", spec=spec)
    fresh = {"regs": 40, "source": C.source_fingerprint("fastkd.kernels.distill", C.installed_triton())}
    monkeypatch.setattr(C, "MISSING", {})
    monkeypatch.setattr(C, "sass_records", lambda: {"_k|4|": fresh})
    assert st.record() is fresh and not C.MISSING
    for stale in ({**fresh, "source": "0" * 16}, {"regs": 40}):
        monkeypatch.setattr(C, "sass_records", lambda stale=stale: {"_k|4|": stale})
        assert st.record() is None
        assert dict(C.MISSING) == {"_k|4|": spec}
    assert C.source_fingerprint("fastkd.kernels.distill", "3.6.0") != fresh["source"]
    # every file of the kernels folder counts (shared helpers): an edit of one changes the fingerprint
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "a.py").write_text("x = 1\n")
    (fake / "b.py").write_text("y = 1\n")
    spec_of = type("Spec", (), {"origin": str(fake / "a.py")})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: spec_of)
    before = C.source_fingerprint.__wrapped__("fastkd.kernels.a", "3.9.0")
    (fake / "b.py").write_text("y = 2\n")
    assert C.source_fingerprint.__wrapped__("fastkd.kernels.a", "3.9.0") != before


@triton.jit
def _scalar_and_block_kernel(x_ptr, w_ptr, y_ptr, BLOCK: tl.constexpr, SP: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    w = tl.load(w_ptr)  # a scalar: every warp loads it
    slots = tl.load(w_ptr + tl.arange(0, SP))  # a small vector: replicated over the warps
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * w + tl.sum(slots, 0))


def test_warp_load_bytes_count_replicated_loads_per_warp():
    """The SASS path counts a load as 32 lanes × width per warp, predicated-off and replicated lanes included:
    the trace's warp bytes count a block of n elements as max(n, 32·num_warps) elements, and only the blocks with
    an element per lane as streamed (vector) bytes."""
    x, w, y = torch.randn(4096), torch.randn(16), torch.empty(4096)
    counter = M.TritonCounter()
    with counter.active():
        _scalar_and_block_kernel[(1,)](x, w, y, BLOCK=4096, SP=16, num_warps=8)
    (st,) = counter.launches
    assert st.load_bytes == (4096 + 1 + 16) * 4
    assert st.warp_load_bytes == (4096 + 256 + 256) * 4
    assert st.vec_load_bytes == 4096 * 4


def test_straight_code_runs_once_per_warp_and_loops_by_their_streamed_loads(monkeypatch):
    """Instructions of a launch from its SASS record: the straight-line path once per warp (its warp bytes say
    so even where most of them are replicated scalars and slots), a loop as often as its vector loads say (a
    loop whose light iterations load only scalars does not count its heavy path for them)."""
    from fastkd.bench import costcount as C

    def blank(**kw):
        return {**dict.fromkeys(("fma", "alu", "xu", "issue", "ldg", "ldg_vec", "ldl", "stl"), 0), **kw}

    # 1000 programs of 8 warps; per warp the straight path loads 1 KB of block and 3 KB of scalars / slots,
    # the loop's heaviest iteration 512 B of block and 512 B of scalars; the launch streams 4 more blocks
    # per warp through the loop and its light iterations load 6 KB of scalars per warp besides
    warps = 8000
    sass = {"once_path": blank(issue=1000, ldg=4096, ldg_vec=1024), "loop": blank(issue=300, ldg=1024, ldg_vec=512),
            "once": blank(), "loops": 1}
    st = C.LaunchStats("k", 8, rows_total=1000, rows_run=1000, load_bytes=1.0, programs=1000,
                       warp_load_bytes=warps * (4096 + 4 * 1024 + 6144), vec_load_bytes=warps * (1024 + 4 * 512))
    monkeypatch.setattr(C.LaunchStats, "record", lambda self: {"regs": 32, "sass": sass})
    cost = st.cost(M.GPUS["h100"])
    assert cost.sass_instr == 32 * warps * (1000 + 4 * 300)
