"""Benchmark: ``fastkd.fused_linear_sparse_distill_loss`` (LM head + top-k KD, fwd+bwd) and cache sizes.

Inputs: student hidden h (N, H) and weight W (V, H) (both get gradients); a sparse teacher of K ids and
log-probs per token (the top-k of a random teacher, as a :class:`fastkd.cache.TeacherCache` would hold);
for the dense fused comparison, teacher hidden ht (N, H) and weight Wt (V, H). Loss = token mean of the
top-k forward KL (teacher renormalised over K, student full-vocabulary log-softmax).

Providers:
  naive          logits = h @ W.T materialised → log_softmax → gather at ids → Σ p̃ (log p̃ − log q) → autograd.
  matmuls        the student's three GEMMs alone (h Wᵀ, G W, Gᵀ h with a fixed (N, V) G): the time floor.
  dense-fused    fastkd.fused_linear_distill_loss with the dense teacher (ht, Wt): what sparse KD replaces.
  fastkd-<b>     fused_linear_sparse_distill_loss on every fastkd backend that can run the inputs.

:func:`summarize` prints time / matmuls, peak memory / dense-fused and / naive, and the cache's storage
bytes per token for K = 8, 32, 64 (written to a temporary directory with the real encoder).
Run standalone: ``python bench/bench_sparse.py [--design] [--quick]`` (options as ``fastkd bench``).
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastkd.bench.harness import Case, Provider, Skip, autograd_step, ratio  # noqa: E402

FAMILY = "sparse"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(
    device: torch.device, seed: int, *, n: int, h: int, v: int, k: int, dtype: str
) -> dict[str, Any]:
    """h, W require grad; ht, Wt: a dense teacher; ids/lp: its top-k (chunked, never (N, V) at once)."""
    from fastkd.cache import topk_from_hidden

    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    inputs = {
        "h": rand(n, h).requires_grad_(True),
        "W": rand(v, h, scale=2 / h**0.5).requires_grad_(True),
        "ht": rand(n, h),
        "Wt": rand(v, h, scale=2 / h**0.5),
    }
    ids, lp, _ = topk_from_hidden(inputs["ht"], inputs["Wt"], k=k, chunk_size=256)
    inputs["ids"], inputs["lp"] = ids, lp
    return inputs


def reference(inputs: dict[str, Any], rows: int = 256) -> tuple[torch.Tensor, ...]:
    """(loss, grad_h, grad_W) in float64, ``rows`` tokens at a time."""
    from fastkd.sparse.reference import sparse_distill_loss

    h, w = inputs["h"].detach().cpu().double(), inputs["W"].detach().cpu().double().requires_grad_(True)
    ids, lp = inputs["ids"].cpu(), inputs["lp"].cpu().double()
    n = h.shape[0]
    loss = torch.zeros((), dtype=torch.float64)
    grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
    for i in range(0, n, rows):
        hc = h[i : i + rows].clone().requires_grad_(True)
        part = sparse_distill_loss(hc @ w.T, ids[i : i + rows], lp[i : i + rows]).sum() / n
        gh, gw = torch.autograd.grad(part, [hc, w])
        loss += part.detach()
        grad_h[i : i + rows] = gh
        grad_w += gw
    return loss, grad_h, grad_w


def naive_loss(h, w, ids, lp) -> torch.Tensor:
    log_q = torch.log_softmax((h @ w.T).float(), dim=-1).gather(-1, ids)
    p = torch.softmax(lp.float(), dim=-1)
    return (p * (p.log() - log_q)).sum() / h.shape[0]


def _naive(inputs):
    return naive_loss(inputs["h"], inputs["W"], inputs["ids"], inputs["lp"])


def setup_naive(inputs: dict[str, Any], mode: str) -> Any:
    return autograd_step(functools.partial(_naive, inputs), [inputs["h"], inputs["W"]], mode)


def _three_matmuls(h, w, g):
    with torch.no_grad():
        return h @ w.T, g @ w, g.T @ h


def setup_matmuls(inputs: dict[str, Any], mode: str) -> Any:
    if mode != "full":
        raise Skip("the GEMM floor is only defined for mode 'full'")
    h, w = inputs["h"].detach(), inputs["W"].detach()
    g = torch.full((h.shape[0], w.shape[0]), 1e-3, device=h.device, dtype=h.dtype)
    return functools.partial(_three_matmuls, h, w, g)


def _dense_fused(inputs):
    import fastkd

    return fastkd.fused_linear_distill_loss(
        inputs["h"], inputs["W"], inputs["ht"], inputs["Wt"], backend="torch"
    )


def setup_dense_fused(inputs: dict[str, Any], mode: str) -> Any:
    return autograd_step(functools.partial(_dense_fused, inputs), [inputs["h"], inputs["W"]], mode)


def _sparse_fused(inputs, backend):
    import fastkd

    return fastkd.fused_linear_sparse_distill_loss(
        inputs["h"], inputs["W"], inputs["ids"], inputs["lp"], backend=backend
    )


def setup_fastkd(inputs: dict[str, Any], mode: str, *, backend: str) -> Any:
    import fastkd.sparse.op  # noqa: F401  (declares the sparse backends)
    from fastkd.core.registry import implementations, triton_interpret

    impl = implementations("sparse").get(backend)
    if impl is None:
        raise Skip(f"fastkd backend {backend!r} does not implement the sparse loss")
    probe = inputs["h"].detach()[:1, :1]
    reasons = impl.not_supported_reasons(student=probe)
    if reasons:
        raise Skip("; ".join(reasons))
    if backend == "triton" and probe.device.type != "cuda" and triton_interpret():
        raise Skip("Triton interpreter (TRITON_INTERPRET=1) is a correctness tool, not benchmarked")
    return autograd_step(functools.partial(_sparse_fused, inputs, backend), [inputs["h"], inputs["W"]], mode)


def case(n: int, h: int, v: int, k: int, dtype: str, device: torch.device) -> Case:
    sizes = {"N": n, "H": h, "V": v, "K": k, "dtype": dtype}
    ps = [
        Provider("naive", setup_naive),
        Provider("matmuls", setup_matmuls, checked=False),
        Provider("dense-fused", setup_dense_fused, checked=False),
    ]
    for backend in ("torch", "triton"):
        if backend == "torch" or device.type == "cuda":
            ps.append(Provider(f"fastkd-{backend}", functools.partial(setup_fastkd, backend=backend)))
    return Case(
        family=FAMILY,
        op="fused_linear_sparse_distill_loss",
        sizes=sizes,
        make_inputs=functools.partial(make_inputs, n=n, h=h, v=v, k=k, dtype=dtype),
        reference=reference,
        providers=ps,
        baseline="naive",
    )


def cases(device: torch.device, preset: str = "default") -> list[Case]:
    """quick: tiny; default: N=512 H=256 V=32000 K=64 on CPU (sized for `make bench`'s 4 minutes),
    N=8192 H=2048 V=128256 bf16 on GPU; design: N=4096 H=512 V=32000 K=64 fp32 (the docs/DESIGN.md dense
    CPU sizes)."""
    if preset == "quick":
        return [case(64, 32, 1000, 8, "fp32", device)]
    if device.type == "cuda":
        return [case(8192, 2048, 128256, 64, "bf16", device)]
    if preset == "design":
        return [case(4096, 512, 32000, 64, "fp32", device)]
    return [case(512, 256, 32000, 64, "fp32", device)]


def storage_bytes_per_token(k: int, vocab: int, *, tokens: int = 8192, values: str = "logprobs") -> float:
    """Bytes per token of a TeacherCache (one shard) holding random top-k targets."""
    from fastkd.cache import TeacherCache

    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(64)]).repeat(tokens // 64, 1)
    with tempfile.TemporaryDirectory() as d:
        with TeacherCache.create(d, vocab_size=vocab, k=k, values=values, shard_tokens=tokens) as w:
            if values == "counts":
                w.add(ids, torch.randint(1, 4, ids.shape))
            else:
                w.add(ids, torch.log_softmax(torch.randn(ids.shape, generator=g), -1) - 0.1)
        return TeacherCache(d).bytes_per_token()


def summarize(rows: list[dict[str, Any]], console: Any) -> None:
    for label in dict.fromkeys(r["case"] for r in rows):
        for prov in dict.fromkeys(r["provider"] for r in rows if r["provider"].startswith("fastkd-")):
            tm = ratio(rows, label, prov, "matmuls", "median_ms")
            mem_dense = ratio(rows, label, prov, "dense-fused", "peak_mem_mb")
            mem_naive = ratio(rows, label, prov, "naive", "peak_mem_mb")

            def f(x: float | None, d: int = 3) -> str:
                return "n/a" if x is None else f"{x:.{d}f}"

            console.print(
                f"{label} {prov}: time / student matmuls = {f(tm)}, peak memory / dense fused = "
                f"{f(mem_dense)}, / naive = {f(mem_naive, 4)}",
                highlight=False,
            )
    for vocab in (32000, 128256):
        cells = [f"K={k}: {storage_bytes_per_token(k, vocab):.1f}" for k in (8, 32, 64)]
        cnt = storage_bytes_per_token(64, vocab, values="counts")
        console.print(
            f"cache bytes/token, V={vocab} (fp16 log-probs + fp16 tail): "
            + ", ".join(cells)
            + f"; sampled counts K=64: {cnt:.1f}",
            highlight=False,
        )


if __name__ == "__main__":
    from fastkd.bench import bench_sparse as _self
    from fastkd.bench.harness import cli_main

    raise SystemExit(cli_main(_self))
