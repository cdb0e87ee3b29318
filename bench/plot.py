"""Bar plots of benchmark results: ``python bench/plot.py results.json [-o out.png] [--run-id ID]``.

One subplot pair per (op, case, mode): median time (with p20–p80 whiskers) and peak extra memory per
provider. By default the latest run in the JSON file is plotted.
"""

from __future__ import annotations

import argparse
import json
import math
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


def plot(json_path: Path | str, out: Path | str | None = None, run_id: str | None = None) -> Path:
    """Write a PNG bar plot of one run; returns its path (default: next to the JSON file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(json_path, run_id)
    if not rows:
        raise ValueError(f"no successful rows to plot in {json_path}")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["mode"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 2.6 * len(groups)), squeeze=False)
    for (op, case, mode), (ax_t, ax_m) in zip(groups, axes):
        g = groups[(op, case, mode)]
        names = [r["provider"] for r in g]
        med = [r["median_ms"] for r in g]
        err = [[m - r["p20_ms"] for m, r in zip(med, g)], [r["p80_ms"] - m for m, r in zip(med, g)]]
        ax_t.barh(names, med, xerr=err, color="tab:blue")
        ax_t.set_xlabel("median time (ms), p20–p80")
        ax_t.set_title(f"{op} {case} [{mode}]", fontsize=8)
        mem = [r["peak_mem_mb"] if r["peak_mem_mb"] is not None else math.nan for r in g]
        ax_m.barh(names, mem, color="tab:orange")
        ax_m.set_xlabel("peak extra memory (MiB)")
        ax_m.set_title(g[0]["device_name"], fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else Path(json_path).with_suffix(f".{rows[0]['run_id']}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
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
