"""Shared float64 test helpers: fresh random logits and the reference (loss, gradient) of a dense divergence.

Test modules import them as ``from helpers import ...`` (tests/ is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import torch

from fastkd.distill import reference as R


def logits(shape, dtype=torch.float32, scale: float = 2.0, *, seed: int | None = None,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """N(0, scale²) logits of ``shape`` in ``dtype``; from a private generator when ``seed`` is given."""
    if seed is None:
        x = torch.randn(shape, device=device)
    else:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return (x * scale).to(dtype)


def teacher(shape, dtype, div: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """Teacher logits; for akl distinct values per row (exact in bf16/fp16): the kernels keep tied
    probabilities together at the head boundary while the reference's stable sort may split them."""
    if div != "akl":
        return logits(shape, dtype, device=device)
    perm = torch.argsort(torch.rand(shape, device=device), dim=-1).float()
    return ((perm - shape[-1] / 2) / 16).to(dtype)


def ref_loss_grad(zs: torch.Tensor, zt: torch.Tensor, div: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference (loss, gradient of its sum w.r.t. ``zs``) of ``fastkd.reference.distill_loss``.

    Autograd through the reference's logaddexp / log_softmax turns −inf logits into NaN gradients for the
    whole row, so the gradient is taken with −inf replaced by −1e4 (exp underflows to exactly 0 in float64:
    the same probabilities, and the limit gradient); the value uses the true −inf.
    """
    out = R.distill_loss(zs.double(), zt.double(), div, **kw)
    fin = lambda z: torch.where(torch.isneginf(z), -1e4, z.double())  # noqa: E731
    x = fin(zs).requires_grad_()
    y = R.distill_loss(x, fin(zt), div, **kw).sum()
    grad = torch.autograd.grad(y, x)[0] if y.requires_grad else torch.zeros_like(x)  # skl at α=1: D ≡ 0
    return out, torch.where(torch.isneginf(zs), 0.0, grad)


def teacher_slots(t: torch.Tensor, k: int, kind: str, mode: str, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher (ids, values) (N, K) from float64 teacher logits ``t`` (N, V): K distinct random ids with
    integer draw counts 1..5 for ``mode="sampled"`` or ``kind="counts"``, else the teacher's top-k as
    ``kind`` ("logprobs", "probs" or "logits")."""
    n, v = t.shape
    if mode == "sampled" or kind == "counts":
        ids = torch.stack([torch.randperm(v, generator=generator)[:k] for _ in range(n)])
        return ids, torch.randint(1, 6, (n, k), generator=generator).double()
    top = torch.log_softmax(t, -1).topk(k, -1)
    ids, vals = top.indices.clone(), top.values.clone()
    if kind == "probs":
        vals = vals.exp()
    elif kind == "logits":
        vals = t.gather(-1, ids)
    return ids, vals


def spy_launches(monkeypatch, module, name: str, record) -> list:
    """Replace the Triton kernel ``module.name`` by a spy that appends ``record(grid, kwargs)`` of every launch to
    the returned list and then launches the real kernel."""
    seen = []
    real = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(record(grid, kw))
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(module, name, Spy())
    return seen
