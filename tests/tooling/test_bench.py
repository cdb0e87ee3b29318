"""bench/harness.py: measurements, error check, results files, plot; `fastkd bench --quick` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from fastkd.bench import harness as H

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.host_device  # real work on the default device (see tests/conftest.py)


def test_fresh_process_memory_sees_a_known_allocation():
    case = H.calibration_case(256)
    big, method = H.cpu_peak_fresh_process(case, case.providers[0], "full")
    small, _ = H.cpu_peak_fresh_process(case, case.providers[1], "full")
    assert method.endswith("fresh-process")
    assert 250 <= big <= 275, big  # 256 MiB plus interpreter noise
    assert 0 <= small < 16, small


def test_max_abs_error_alignment_inf_and_nan():
    ref = (torch.tensor(1.0, dtype=torch.float64), torch.tensor([0.5, -math.inf], dtype=torch.float64))
    out = (torch.tensor(1.25), torch.tensor([0.25, -math.inf]))
    assert H.max_abs_error(out, ref, "full") == pytest.approx(0.25)
    assert H.max_abs_error(out[:1], ref, "fwd") == pytest.approx(0.25)
    assert H.max_abs_error((torch.tensor([0.5, -math.inf]),), ref, "bwd") == 0.0  # bwd → reference[1:]
    assert math.isnan(H.max_abs_error((torch.tensor(float("nan")),), ref, "fwd"))
    with pytest.raises(ValueError, match="shape"):
        H.max_abs_error((torch.zeros(3),), (torch.zeros(2),), "full")


def test_quantiles_and_autograd_steps():
    assert H.quantiles([5.0]) == (5.0, 5.0, 5.0)
    med, p20, p80 = H.quantiles([float(x) for x in range(1, 11)])
    assert med == 5.5 and p20 == pytest.approx(2.8) and p80 == pytest.approx(8.2)
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    loss_fn = lambda: (x**2).sum()  # noqa: E731
    full = H._call(H._as_step(H.autograd_step(loss_fn, [x], "full")))
    assert torch.allclose(full[1], 2 * x) and torch.allclose(full[0], (x**2).sum())
    bwd = H._call(H._as_step(H.autograd_step(loss_fn, [x], "bwd")))
    assert len(bwd) == 1 and torch.allclose(bwd[0], 2 * x)
    with pytest.raises(ValueError, match="mode"):
        H.autograd_step(loss_fn, [x], "sideways")
    times = H.time_step(H._as_step(H.autograd_step(loss_fn, [x], "fwd")), torch.device("cpu"), budget_s=0.0,
                        min_reps=4)
    assert len(times) == 4 and all(t > 0 for t in times)


def _boom(inputs, mode):
    raise ZeroDivisionError("provider bug")


def _skip(inputs, mode):
    raise H.Skip("needs a GPU")


def test_run_cases_reports_skips_errors_and_ratios(tmp_path):
    case = H.calibration_case(8)
    case.providers += [H.Provider("boom", _boom), H.Provider("skipper", _skip)]
    rows = H.run_cases([case], torch.device("cpu"), memory=False, budget_s=0.0, progress=False)
    by = {r["provider"]: r for r in rows}
    assert by["alloc"]["status"] == "ok" and by["alloc"]["time_vs_baseline"] == 1.0
    assert by["small"]["median_ms"] > 0 and by["small"]["time_vs_baseline"] > 0
    assert by["boom"]["status"] == "error" and "ZeroDivisionError: provider bug" in by["boom"]["reason"]
    assert by["skipper"]["status"] == "skipped" and by["skipper"]["reason"] == "needs a GPU"
    csv_path, json_path = H.write_results(rows, tmp_path / "r.csv", tmp_path / "r.json")
    H.write_results(rows, csv_path, json_path)  # appends, header once
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",") == H.COLUMNS and len(lines) == 1 + 2 * len(rows)
    assert len(json.loads(json_path.read_text())) == 2 * len(rows)
    png = __import__("fastkd.bench.plot", fromlist=["plot"]).plot(json_path, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_fastkd_bench_quick_end_to_end(tmp_path, capsys):
    from fastkd.cli import main

    rc = main(["bench", "--quick", "--families", "fused_linear", "--threads", "1", "--out",
               str(tmp_path), "--plot", str(tmp_path / "plot.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fastkd-torch" in out and "four matmuls" in out and "rows appended" in out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == H.COLUMNS
    ok = {(r["family"], r["provider"]): r for r in rows if r["status"] == "ok"}
    for key in [("fused_linear", "naive"), ("fused_linear", "matmuls"), ("fused_linear", "fastkd-torch")]:
        r = ok[key]
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["peak_mem_mb"]) > 0 and r["mem_method"] == "rss-hwm-fresh-process"
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["fastkd"] and r["date"]
        if key[1] != "matmuls":
            assert float(r["max_abs_err"]) < 1e-5
    assert ok[("fused_linear", "matmuls")]["max_abs_err"] == ""
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(rows)


def test_distill_quick_case_errors_small_and_same_inputs():
    from fastkd.bench import bench_distill

    torch.set_num_threads(1)
    cases = bench_distill.cases(torch.device("cpu"), "quick")
    rows = H.run_cases(cases, torch.device("cpu"), memory=False, budget_s=0.0, progress=False)
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    assert {"naive", "fastkd-torch"} <= set(ok)
    for r in ok.values():
        assert r["max_abs_err"] < 1e-6 and r["median_ms"] > 0 and r["reps"] >= 3
    # make_inputs is deterministic: a fresh process rebuilds exactly the inputs the run used
    a = cases[0].make_inputs(torch.device("cpu"), 0)
    b = cases[0].make_inputs(torch.device("cpu"), 0)
    assert torch.equal(a["student"], b["student"]) and torch.equal(a["teacher"], b["teacher"])


def test_one_run_writes_one_png_with_every_family_and_prints_its_path(tmp_path, capsys):
    from fastkd.bench import plot as P

    rc = H.main(["--quick", "--families", "fused_linear,sinkhorn", "--threads", "1", "--no-memory",
                 "--budget", "0.01", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    assert str(pngs[0]) in out.replace("\n", "")
    rows = P.load_rows(tmp_path / "results.json")
    assert {r["family"] for r in rows} == {"fused_linear", "sinkhorn"}
    assert len({r["run_id"] for r in rows}) == 1
    base = [r for r in rows if r["provider"] == r["baseline"]]
    assert base and all(P._relative([r], "median_ms") == [1.0] for r in base)
    # the peers: a row when installed (Liger checked against float64), else a skip line naming the package
    all_rows = json.loads((tmp_path / "results.json").read_text())
    for provider, package in (("liger", "liger_kernel"), ("geomloss", "geomloss")):
        row = next(r for r in all_rows if r["provider"] == provider)
        try:
            __import__(package)
        except ImportError:
            assert row["status"] == "skipped" and package.replace("_", "-") in row["reason"]
        else:
            assert row["status"] == "ok", row["reason"]
            if provider == "liger":
                assert row["max_abs_err"] < 1e-5


def test_interleaved_times_rotate_the_order_and_stop_each_step_on_its_budget():
    calls: list[str] = []

    def step(name: str, fail_at: int | None = None) -> H.Step:
        def run() -> None:
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")

        return H.Step(run)

    steps = [step("a"), step("b"), step("c", fail_at=3)]
    out = H.interleaved_times(steps, torch.device("cpu"), warmup=0, budget_s=1e9, min_reps=2, max_reps=4)
    assert [len(t) for t in out[:2]] == [4, 4] and isinstance(out[2], RuntimeError)
    # round r starts at live step r mod (live steps): a b c | b c a | c(fails) a b | b a
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "b", "a"]
    assert all(t >= 0 for t in out[0])


def test_load_caveat_only_when_busier_than_the_cores():
    assert H.load_caveat(1.5, 2) is None
    line = H.load_caveat(5.25, 2)
    assert line and "5.2" in line and "2 cores" in line
    assert "load_avg" in H.COLUMNS


def test_plot_titles_are_short_and_the_legend_names_the_colours():
    from fastkd.bench import plot as P

    title = P.short_title("distill", "distill_loss", "fkl N=512 V=32000 fp32 " + "x" * 200, "full")
    assert title.startswith("distill · distill_loss · fkl N=512") and title.endswith("… [full]")
    assert len(title) < 110
    assert {c for c, _ in P.LEGEND} == {"tab:gray", "tab:green", "tab:red"}
