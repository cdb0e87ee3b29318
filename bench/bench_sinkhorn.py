"""Benchmark: batched Sinkhorn, fastkd (torch / triton) vs POT ``ot.batch.solve_batch`` and GeomLoss.

Problem (docs/DESIGN.md): B=16, n=m=256, d=2 points, sqeuclidean cost, eps=0.05, exactly 200 iterations (tol=0).
Providers:

* ``fastkd-torch``   ``fastkd.sinkhorn(cost=C, eps, max_iter=200, tol=0, backend="torch")``
* ``fastkd-triton``  same with ``backend="triton"`` (CUDA only)
* ``pot-batch``      ``ot.batch.solve_batch(C, reg=eps, method="log_sinkhorn", max_iter=200, tol=0)``:
  POT's batched log-domain solver (its loop also forms the plan every 10 iterations for its stopping test)
* ``geomloss``       ``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps/2), scaling=0.98, debias=False)`` on the
  points (its cost is ‖x−y‖²/2): its own ε-scaling schedule, so timed for reference only (not the same
  iterations; value not compared). Skipped with the reason when geomloss is not installed.

Values: fastkd's ``value`` (⟨P, C⟩) vs POT's ``value_linear`` on the same cost (relative difference).
Run standalone: ``python bench/bench_sinkhorn.py [--device cuda] [--dtype float64] [--reps 7]``; prints
median times, the ratio POT / fastkd and appends a JSON row to bench/results/sinkhorn.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import time

import torch

import fastkd


def _time(fn, reps: int, device: str) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def problem(bsz=16, n=256, d=2, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(bsz, n, d, generator=g, dtype=torch.float64)
    y = torch.rand(bsz, n, d, generator=g, dtype=torch.float64) + 0.25
    cost = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    return (x.to(device, dtype), y.to(device, dtype), cost.to(device, dtype))


def run(bsz=16, n=256, eps=0.05, iters=200, reps=7, device="cpu", dtype=torch.float32) -> list[dict]:
    x, y, cost = problem(bsz, n, device=device, dtype=dtype)
    rows: list[dict] = []
    results: dict[str, tuple[list[float], torch.Tensor | None]] = {}

    backends = ["torch"] + (["triton"] if device == "cuda" else [])
    for be in backends:
        def fk(be=be):
            return fastkd.sinkhorn(cost=cost, eps=eps, max_iter=iters, tol=0, backend=be).value
        results[f"fastkd-{be}"] = (_time(fk, reps, device), fk())
    try:
        import ot.batch

        def pot():
            return ot.batch.solve_batch(cost, reg=eps, method="log_sinkhorn", max_iter=iters, tol=0,
                                        grad="detach").value_linear
        results["pot-batch"] = (_time(pot, reps, device), pot())
    except ImportError:
        pass
    try:
        from geomloss import SamplesLoss

        # GeomLoss cost for p=2 is ‖x−y‖²/2 and ε = blur²; scaling close to 1 ≈ many iterations.
        loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps / 2), scaling=0.98, debias=False,
                           backend="tensorized")
        results["geomloss"] = (_time(lambda: loss(x, y), reps, device), None)
    except ImportError:
        pass

    ref = results.get("pot-batch", (None, None))[1]
    base = statistics.median(results["pot-batch"][0]) if "pot-batch" in results else None
    for name, (times, val) in results.items():
        med = statistics.median(times)
        rel = None
        if ref is not None and val is not None:
            rel = float(((val.double() - ref.double()).abs() / ref.double().abs()).max())
        rows.append({
            "op": "sinkhorn", "provider": name, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "B": bsz, "n": n, "eps": eps, "iters": iters, "median_s": med,
            "q20_s": sorted(times)[len(times) // 5], "q80_s": sorted(times)[(4 * len(times)) // 5],
            "speedup_vs_pot": None if base is None else base / med, "max_rel_diff_vs_pot": rel,
            "torch": torch.__version__, "fastkd": fastkd.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    return rows


# ---------------------------------------------------------------------------------------------------------
# bench/harness.py interface (``fastkd bench``)
# ---------------------------------------------------------------------------------------------------------

FAMILY = "sinkhorn"


def make_inputs(device: torch.device, seed: int, bsz: int = 16, n: int = 256) -> dict:
    x, y, cost = problem(bsz, n, device=str(device), seed=seed)
    return {"cost": cost, "x": x, "y": y, "eps": 0.05, "iters": 200}


def reference(inputs: dict) -> tuple[torch.Tensor]:
    from fastkd.ot import reference as R

    c = inputs["cost"].double()
    bsz, n, m = c.shape
    a = torch.full((bsz, n), 1.0 / n, dtype=torch.float64, device=c.device)
    b = torch.full((bsz, m), 1.0 / m, dtype=torch.float64, device=c.device)
    return (R.sinkhorn(a, b, c, inputs["eps"], inputs["iters"])["value"],)


def setup_fastkd(backend: str, inputs: dict, mode: str):
    from fastkd.bench.harness import Skip

    if backend == "triton" and inputs["cost"].device.type != "cuda":
        raise Skip("Triton needs CUDA tensors")
    return lambda: fastkd.sinkhorn(cost=inputs["cost"], eps=inputs["eps"], max_iter=inputs["iters"], tol=0,
                                   backend=backend).value


def setup_pot(inputs: dict, mode: str):
    from fastkd.bench.harness import Skip

    try:
        import ot.batch
    except ImportError as exc:
        raise Skip(f"POT with ot.batch is not installed ({exc})") from exc
    return lambda: ot.batch.solve_batch(inputs["cost"], reg=inputs["eps"], method="log_sinkhorn",
                                        max_iter=inputs["iters"], tol=0, grad="detach").value_linear


def setup_geomloss(inputs: dict, mode: str):
    """GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps/2), scaling=0.98, debias=False)`` on the
    point clouds: its cost ‖x−y‖²/2 and ε = blur² make the same problem as C = ‖x−y‖², ε, but it runs its
    own ε-scaling schedule and returns the regularized dual value, so the row is timed for reference and
    its value is not compared (``checked=False``)."""
    from fastkd.bench.harness import Skip

    try:
        from geomloss import SamplesLoss
    except ImportError as exc:
        raise Skip(f"geomloss is not installed ({exc}); `make bench` installs it") from exc
    loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(inputs["eps"] / 2), scaling=0.98, debias=False,
                       backend="tensorized")  # 0.98: about as many ε-scaling steps as fastkd's 200 iterations
    return functools.partial(loss, inputs["x"], inputs["y"])


def cases(device: torch.device, preset: str = "default") -> list:
    """quick: B=2, n=32; default on CPU: B=8, n=m=128 (sized for `make bench`'s 4 minutes); design: the
    docs/DESIGN.md CPU target B=16, n=m=256; GPU: B=64, n=1024. Always eps=0.05 and 200 iterations."""
    from fastkd.bench.harness import Case, Provider

    bsz, n = ((2, 32) if preset == "quick" else (64, 1024) if device.type == "cuda"
              else (16, 256) if preset == "design" else (8, 128))
    providers = [Provider(f"fastkd-{be}", functools.partial(setup_fastkd, be)) for be in ("torch", "triton")]
    providers.append(Provider("pot-batch", setup_pot))
    providers.append(Provider("geomloss", setup_geomloss, checked=False))
    return [Case(FAMILY, "sinkhorn", {"B": bsz, "n": n, "eps": 0.05, "iters": 200, "dtype": "fp32"},
                 functools.partial(make_inputs, bsz=bsz, n=n), providers, reference=reference,
                 modes=("fwd",), baseline="pot-batch")]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sinkhorn.jsonl"))
    args = ap.parse_args(argv)
    rows = run(args.B, args.n, args.eps, args.iters, args.reps, args.device, getattr(torch, args.dtype))
    print(f"sinkhorn B={args.B} n=m={args.n} eps={args.eps} iters={args.iters} {args.dtype} on {args.device}")
    for r in rows:
        sp = "" if r["speedup_vs_pot"] is None else f"  POT/this = {r['speedup_vs_pot']:.2f}x"
        d = r["max_rel_diff_vs_pot"]
        rel = "" if d is None else f"  max rel diff vs POT = {d:.2e}"
        print(f"  {r['provider']:<14} median {r['median_s'] * 1e3:9.2f} ms{sp}{rel}")
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    main()
