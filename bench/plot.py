"""One PNG per benchmark run: ``python bench/plot.py results.json [-o out.png] [--run-id ID]``.

Every family of the run in one figure: a row per (family, case, mode) and two panels per row, the median
time and the peak extra memory of each provider *relative to the case's baseline* (1.0 = the baseline,
log scale, lower is better), each bar labelled with its absolute value (ms, MiB). ``fastkd bench`` writes
it to ``bench/results/bench-<run id>.png`` and prints the path; by default this script plots the latest
run in the JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any


def load_rows(json_path: Path | str, run_id: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``run_id`` (default: the latest run) whose status is ok."""
    with open(json_path) as f:
        rows = json.load(f)
    if not rows:
        return []
    run_id = run_id or max(r["run_id"] for r in rows)
    return [r for r in rows if r["run_id"] == run_id and r["status"] == "ok"]


def _relative(rows: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of each row over the baseline row's (NaN where either is missing); a group without its
    baseline falls back to its first row, so a plot is never empty."""
    base_name = rows[0].get("baseline") or rows[0]["provider"]
    base = next((r for r in rows if r["provider"] == base_name and r.get(key)), None)
    base = base or next((r for r in rows if r.get(key)), None)
    out = []
    for r in rows:
        v = r.get(key)
        out.append(v / base[key] if base is not None and v is not None and v > 0 else math.nan)
    return out


LEGEND = (("tab:gray", "the case's baseline"), ("tab:green", "better than the baseline"),
          ("tab:red", "worse than the baseline"))


def short_title(family: str, op: str, case: str, mode: str, width: int = 70) -> str:
    """"family · op · case [mode]", the case label cut to ``width`` characters."""
    head = f"{family} · {op}" if family and family != op else op
    label = case if len(case) <= width else case[: width - 1] + "…"
    return f"{head} · {label} [{mode}]"


def _panel(ax: Any, names: list[str], rel: list[float], absolute: list[float | None], unit: str,
           xlabel: str) -> None:
    finite = [x for x in rel if math.isfinite(x) and x > 0]
    colors = ["tab:gray" if math.isfinite(x) and abs(x - 1) < 1e-12 else
              "tab:green" if math.isfinite(x) and x < 1 else "tab:red" for x in rel]
    ax.barh(names, [x if math.isfinite(x) else 0 for x in rel], color=colors)
    ax.axvline(1.0, color="black", lw=0.8)
    if finite and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    ax.invert_yaxis()
    for y, (x, a) in enumerate(zip(rel, absolute)):
        label = "n/a" if a is None or not math.isfinite(x) else f" {x:.2f}x ({a:.3g} {unit})"
        ax.text(x if math.isfinite(x) and x > 0 else (min(finite) if finite else 1), y, label, va="center",
                fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)


def plot(json_path: Path | str, out: Path | str | None = None, run_id: str | None = None) -> Path:
    """Write the PNG of one run (every family); returns its path (default: ``bench-<run id>.png`` next to
    the JSON file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(json_path, run_id)
    if not rows:
        raise ValueError(f"no successful rows to plot in {json_path}")
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("family", ""), r["op"], r["case"], r["mode"]), []).append(r)
    heights = [0.6 + 0.28 * len(g) for g in groups.values()]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (family, op, case, mode), (ax_t, ax_m) in zip(groups, axes):
        g = groups[(family, op, case, mode)]
        names = [r["provider"] for r in g]
        base = g[0].get("baseline") or names[0]
        _panel(ax_t, names, _relative(g, "median_ms"), [r["median_ms"] for r in g], "ms",
               f"median time / {base} (lower is better)")
        _panel(ax_m, names, _relative(g, "peak_mem_mb"), [r.get("peak_mem_mb") for r in g], "MiB",
               f"peak extra memory / {base} (lower is better)")
        ax_t.set_title(short_title(family, op, case, mode), fontsize=8, loc="left")
    first = rows[0]
    load = first.get("load_avg")
    busy = ""
    if load not in (None, ""):
        busy = f", load {float(load):.1f}"
        if float(load) > (os.cpu_count() or 1):
            busy += ": busy machine, ratios noisier"
    fig.suptitle(f"fastkd bench {first['run_id']} on {first.get('device_name', '')} "
                 f"(torch {first.get('torch', '')}, fastkd {first.get('fastkd', '')}{busy})", fontsize=9)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=t) for c, t in LEGEND], loc="lower center", fontsize=7, ncol=3,
               frameon=False)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))  # 0.3 inch at the bottom for the legend
    out = Path(out) if out else Path(json_path).with_name(f"bench-{first['run_id']}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", help="results JSON written by fastkd bench")
    parser.add_argument("-o", "--out", default=None, help="output PNG path")
    parser.add_argument("--run-id", default=None, help="which run to plot (default: the latest)")
    args = parser.parse_args(argv)
    print(plot(args.json, args.out, args.run_id))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
