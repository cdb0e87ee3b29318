"""bench/gpu_suite.py: the whole suite's --dry-run on CPU (every case, every fastkd provider checked against
its float64 reference, unavailable providers skipped with reasons), the derived columns, and the new
chunked references against the full float64 ones."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers import spy_launches  # noqa: E402

from fastkd.bench import gpu_suite as GS  # noqa: E402

pytestmark = pytest.mark.host_device  # real work on the default device (see tests/conftest.py)

# fastkd providers that must run in the dry run, per suite case, and their max |error| bound (bf16
# gradients round at ~4e-3 relative; Sinkhorn values are fp32)
EXPECTED = {
    **{f"distill-{d}": ("fastkd-triton",) for d in ("fkl", "rkl", "jsd")},
    "distill-tvd": ("fastkd-triton", "fastkd-triton-8w"),
    **{f"fused-{d}": ("fastkd-triton",) for d in ("fkl", "jsd")},
    "sparse-fkl-topk": ("fastkd-triton", "fastkd-torch"),
    "sinkhorn": ("fastkd-triton", "fastkd-torch"),
}
TOL = {"sinkhorn": 1e-5}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    rc = GS.main(["--dry-run", "--out", str(out)])
    rows = json.loads((out / "gpu_suite_dry.json").read_text())
    summary = json.loads((out / "gpu_suite_dry_summary.json").read_text())["rows"]
    with open(out / "gpu_suite_dry_summary.csv") as fh:
        header = next(csv.reader(fh))
    return rc, rows, summary, header


def _row(rows, case, provider):
    found = [r for r in rows if r["suite_case"] == case and r["provider"] == provider]
    assert len(found) == 1, (case, provider, len(found))
    return found[0]


def test_every_case_ran_its_fastkd_providers(dry_run):
    rc, rows, _, _ = dry_run
    assert rc == 0
    assert {e.name for e in GS.SUITE} == set(EXPECTED)
    for case, providers in EXPECTED.items():
        for p in providers:
            r = _row(rows, case, p)
            assert r["status"] == "ok", (case, p, r["reason"])
            assert r["median_ms"] > 0 and r["reps"] >= 1
            assert r["max_abs_err"] is not None and r["max_abs_err"] < TOL.get(case, 2e-3), (case, p, r)


def test_baselines_ran_and_agree(dry_run):
    _, rows, _, _ = dry_run
    for case in ("sparse-fkl-topk", "sinkhorn"):
        base = "naive" if case.startswith("sparse") else "pot-batch"
        r = _row(rows, case, base)
        assert r["status"] == "ok" and r["max_abs_err"] < TOL.get(case, 2e-3), r
    for case, p in (("sparse-fkl-topk", "student-matmuls"), ("sparse-fkl-topk", "dense-fused"),
                    ("sinkhorn", "geomloss")):
        r = _row(rows, case, p)
        assert r["status"] == "ok" and r["max_abs_err"] is None  # timed, not checked


def test_unavailable_providers_skipped_with_reasons(dry_run):
    _, rows, _, _ = dry_run
    for case in EXPECTED:
        r = _row(rows, case, "fastkd-cuda")  # the cuda backend needs CUDA tensors: never runs in a dry run
        assert r["status"] == "skipped"
        assert "BackendUnavailableError" in r["reason"] and "cuda" in r["reason"]
    for case in ("distill-fkl", "fused-jsd"):
        r = _row(rows, case, "torch.compile")
        assert r["status"] == "skipped" and "dry-run" in r["reason"]
    assert not [r for r in rows if r["status"] == "error"]
    assert all(r["reason"] for r in rows if r["status"] == "skipped")


def test_summary_has_derived_columns_for_new_rows(dry_run):
    _, rows, dry_summary, header = dry_run
    for col in ("time_vs_gemms", "speedup_vs_liger", "speedup_vs_dense", "speedup_vs_pot",
                "speedup_vs_geomloss"):
        assert col in header
    # a dry run's timings mean nothing: its summary leaves every derived metric blank ...
    for d in dry_summary:
        assert d["gbps"] is None and d["time_vs_gemms"] is None and d["speedup_vs_liger"] is None
    # ... the same rows derived as a real run would be
    summary = GS.derive({e.name: e for e in GS.SUITE}, rows, 1000.0)
    by = {(d["suite_case"], d["provider"]): d for d in summary}
    for p in ("fastkd-triton", "fastkd-torch"):
        d = by[("sparse-fkl-topk", p)]
        mm = _row(rows, "sparse-fkl-topk", "student-matmuls")["median_ms"]
        assert d["time_vs_gemms"] == pytest.approx(d["median_ms"] / mm)
        assert d["speedup_vs_dense"] is not None and d["speedup_vs_pot"] is None
        s = by[("sinkhorn", p)]
        pot = _row(rows, "sinkhorn", "pot-batch")["median_ms"]
        assert s["speedup_vs_pot"] == pytest.approx(pot / s["median_ms"])
        assert s["speedup_vs_geomloss"] is not None and s["time_vs_gemms"] is None
    assert by[("fused-fkl", "fastkd-triton")]["time_vs_gemms"] is not None
    assert by[("distill-jsd", "fastkd-triton")]["gbps"] is not None
    assert ("sinkhorn", "fastkd-cuda") not in by  # skipped rows get no summary row


def test_derive_speedups_and_missing_baseline():
    entries = {"s": GS.SuiteCase("s", GS.sinkhorn_case, speedup_vs=(("pot", "pot-batch"), ("gl", "gl")))}

    def row(provider, ms, status="ok"):
        return {"suite_case": "s", "provider": provider, "median_ms": ms, "status": status, "sizes": "{}",
                "peak_mem_mb": None, "max_abs_err": None, "device_name": "x", "run_id": "r"}

    rows = [row("fastkd-triton", 2.0), row("pot-batch", 30.0), row("gl", None, "skipped")]
    out = {d["provider"]: d for d in GS.derive(entries, rows, None)}
    assert set(out) == {"fastkd-triton", "pot-batch"}
    assert out["fastkd-triton"]["speedup_vs_pot"] == pytest.approx(15.0)
    assert out["fastkd-triton"]["speedup_vs_gl"] is None and out["fastkd-triton"]["time_vs_gemms"] is None


def test_sparse_reference_matches_full_float64():
    """The chunked device reference (loss, grad_h rows, grad_W rows) equals bench_sparse's full one,
    over several chunks (N=150 > chunk=64) so the grad_W accumulation and row slicing are exercised."""
    from fastkd.bench import bench_sparse as BS

    inputs = BS.make_inputs(torch.device("cpu"), 3, n=150, h=24, v=200, k=8, dtype="fp32")
    loss, gh, gw = GS.sparse_reference(inputs, chunk=64)
    rl, rgh, rgw = BS.reference(inputs)
    torch.testing.assert_close(loss, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rgh[:GS.REF_ROWS], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rgw[:GS.REF_ROWS], rtol=1e-10, atol=1e-12)
    assert float(loss) > 0 and gh.abs().max() > 0 and gw.abs().max() > 0


def test_sinkhorn_reference_matches_fastkd_float64():
    inputs = GS.sinkhorn_inputs(torch.device("cpu"), 1, bsz=3, n=17, d=2)
    (ref,) = GS.sinkhorn_reference(inputs, eps=0.1, iters=30)
    import fastkd

    got = fastkd.sinkhorn(x=inputs["x"].double(), y=inputs["y"].double(), eps=0.1, max_iter=30, tol=0,
                          backend="torch").value
    assert ref.shape == (3,) and float(ref.min()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_dry_run_says_timings_mean_nothing(tmp_path, capsys):
    rc = GS.main(["--dry-run", "--cases", "distill-jsd", "--out", str(tmp_path)])
    assert rc == 0
    assert "timings mean nothing" in capsys.readouterr().out


def test_tvd_times_its_default_and_8_warps(monkeypatch):
    """tvd's default launch was chosen by the cost model, which does not model occupancy: the suite also times
    the kernel at 8 warps (in the dry run above, checked against float64 like every provider). On vector-loadable
    rows the two providers launch at 4 and at 8 warps and agree."""
    from fastkd.bench import bench_distill as BD
    from fastkd.kernels import distill_split as KS

    warps = spy_launches(monkeypatch, KS, "_distill_split_kernel", lambda grid, kw: kw["num_warps"])
    inputs = BD.make_inputs(torch.device("cpu"), 3, n=5, v=304, dtype="bf16")
    default = GS.setup_distill_fastkd(inputs, "full", divergence="tvd", backend="triton")()
    eight = GS.setup_distill_warps(inputs, "full", divergence="tvd", warps=8)()
    assert warps == [4, 8]
    for a, b in zip(default, eight, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_time_cap_and_rows_appended_per_case(tmp_path, monkeypatch):
    """Each case's rows are in the results file as soon as the case finishes; cases not started before the
    time cap are listed, not run."""
    written = []
    real = GS.write_results

    def spy(rows, csv_path, json_path):
        written.append({r["suite_case"] for r in rows})
        return real(rows, csv_path, json_path)

    monkeypatch.setattr(GS, "write_results", spy)
    clock = iter([0.0, 0.0])  # start, before case 1; 100 s later before case 2
    monkeypatch.setattr(GS, "_now", lambda: next(clock, 100.0))
    rc = GS.main(["--dry-run", "--cases", "distill-jsd,sinkhorn", "--time-cap", "50", "--out", str(tmp_path)])
    assert rc == 0
    assert written == [{"distill-jsd"}]
    summary = json.loads((tmp_path / "gpu_suite_dry_summary.json").read_text())
    assert summary["not_run_time_cap"] == ["sinkhorn"]
    rows = json.loads((tmp_path / "gpu_suite_dry.json").read_text())
    assert {r["suite_case"] for r in rows} == {"distill-jsd"}


def test_compile_skipped_unless_asked(monkeypatch):
    monkeypatch.setitem(GS.COMPILE, "on", False)
    case = GS.distill_case("fkl", torch.device("cpu"), False)
    comp = next(p for p in case.providers if p.name == "torch.compile")
    with pytest.raises(GS.Skip, match="not asked"):
        comp.setup({"student": None, "teacher": None}, "full")


def test_measured_next_to_model(capsys):
    from rich.console import Console

    rows = [{"status": "ok", "provider": "fastkd-triton", "median_ms": 3.0, "sizes": json.dumps({"N": 8, "V": 100})}]
    model = [{"case": "distill-fkl", "provider": "fastkd-triton", "status": "ok", "predicted_ms": 1.0,
              "gpu": "H200", "sizes": {"N": 8, "V": 200}}]
    GS.print_vs_model("distill-fkl", rows, model, Console(width=200))
    out = capsys.readouterr().out
    assert "measured     3.000 ms" in out and "model     0.500 ms" in out and "measured/model  6.00" in out
    assert "model, not measured" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA host make gpu-check would really run")
def test_make_gpu_check_stops_at_once_without_cuda(tmp_path):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[2]
    dry = subprocess.run(["make", "-n", "gpu-check", f"OUT={tmp_path}"], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    for part in ("bench/gpu_check.py", f"--out {tmp_path}", "--suite-cap"):  # steps: tooling/test_gpu_check.py
        assert part in dry.stdout, part
    run = subprocess.run(["make", "gpu-check", f"OUT={tmp_path}", f"GPU_PY={sys.executable}"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "no CUDA GPU" in run.stdout + run.stderr
    assert not any(tmp_path.iterdir())  # stopped before installing or writing anything


def test_vs_model_table_from_fake_timings():
    """The measured-vs-model table bench/RESULTS.md takes: fake measured rows, the model scaled to their N·V."""
    rows = [{"status": "ok", "provider": "fastkd-triton", "median_ms": 3.0, "device_name": "NVIDIA H100 80GB HBM3",
             "sizes": json.dumps({"N": 8, "V": 100})},
            {"status": "skipped", "provider": "liger", "median_ms": None, "sizes": json.dumps({"N": 8, "V": 100})}]
    model = [{"case": "distill-rkl", "provider": "fastkd-triton", "status": "ok", "predicted_ms": 1.0,
              "gpu": "H200", "sizes": {"N": 8, "V": 200}}]
    table = GS.vs_model("distill-rkl", rows, model)
    assert len(table) == 1 and table[0]["model_ms"] == pytest.approx(0.5)
    assert table[0]["measured_over_model"] == pytest.approx(6.0)
    md = GS.vs_model_markdown(table, "NVIDIA H100 80GB HBM3", "abc1234")
    assert "NVIDIA H100 80GB HBM3" in md and "commit abc1234" in md and "model, not measured" in md
    assert "| distill-rkl | fastkd-triton | 3.000 | 0.500 | H200 | 6.00 |" in md
    assert "DRY RUN" not in md and "DRY RUN" in GS.vs_model_markdown(table, "cpu", "abc1234", dry=True)


def test_vs_model_file_written_as_each_case_finishes(tmp_path, monkeypatch):
    """With --model, the table file in --out is rewritten after every case (a later timeout keeps it)."""
    model = tmp_path / "model.json"
    model.write_text(json.dumps([{"case": c, "provider": "fastkd-triton", "status": "ok", "predicted_ms": 1.0,
                                  "gpu": "H200", "sizes": {"N": 8192, "V": 128256}}
                                 for c in ("distill-fkl", "distill-jsd")]))
    seen = []
    real = GS.vs_model_markdown

    def spy(table, device, commit, dry=False):
        seen.append([v["suite_case"] for v in table])
        return real(table, device, commit, dry)

    monkeypatch.setattr(GS, "vs_model_markdown", spy)
    out = tmp_path / "out"
    rc = GS.main(["--dry-run", "--cases", "distill-fkl,distill-jsd", "--providers", "fastkd-triton",
                  "--model", str(model), "--out", str(out)])
    assert rc == 0
    assert seen == [["distill-fkl"], ["distill-fkl", "distill-jsd"]]
    md = (out / GS.VS_MODEL_MD).read_text()
    assert "| distill-jsd | fastkd-triton |" in md and "DRY RUN" in md


def test_model_file_follows_the_device(tmp_path):
    h200 = tmp_path / "model_h200.json"
    h200.write_text("[]")
    assert GS.model_for_device(str(h200), "NVIDIA H100 80GB HBM3") == str(h200)  # no H100 file: the given one
    (tmp_path / "model_h100.json").write_text("[]")
    assert GS.model_for_device(str(h200), "NVIDIA H100 80GB HBM3") == str(tmp_path / "model_h100.json")
    assert GS.model_for_device(str(h200), "NVIDIA H200") == str(h200)
    assert GS.model_for_device(None, "NVIDIA H100") is None
