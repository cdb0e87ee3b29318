"""The sparse-target pipeline of ``examples/distill_tiny.py --sparse-study``, checked end to end.

Targets built by :class:`fastkd.cache.TeacherCacheWriter` at temperature T, read back and fed to the sparse
loss at the same T, must reproduce dense distillation where the theory says they do:
- ``topk_tail`` with all V ids stored (no tail) = dense forward KL (loss and gradient),
- the stored tail is the teacher's mass outside the K ids (Σ p_k + p_tail = 1 up to the value dtype),
- ``sampled`` counts drawn at T give, averaged over draws, the dense forward-KL gradient at T (unbiased),
  also through the fused LM-head path.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.cache import TeacherCache

T = 2.0


def _teacher(n: int, h: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.7


def _roundtrip(tmp_path, name, hidden, weight, **kw) -> dict[str, torch.Tensor]:
    gen = kw.pop("generator", None)
    with TeacherCache.create(tmp_path / name, vocab_size=weight.shape[0], **kw) as w:
        w.add_from_hidden(hidden, weight, temperature=T, generator=gen)
    return TeacherCache(tmp_path / name)[0]


def test_topk_tail_all_ids_equals_dense_at_temperature(tmp_path):
    n, h, v = 9, 6, 11
    ht, wt = _teacher(n, h, v, 0)
    e = _roundtrip(tmp_path, "c", ht, wt, k=v, values="logprobs", value_dtype="float32")
    assert torch.isneginf(e["teacher_tail"]).all()  # every id stored: no tail mass
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(n, 5, generator=g, requires_grad=True)
    ws = torch.randn(v, 5, generator=g, requires_grad=True)
    kw = dict(temperature=T, scale_by_t2=True, reduction="none")
    got = fastkd.fused_linear_sparse_distill_loss(hs, ws, e["teacher_ids"], e["teacher_values"],
                                                  teacher_tail=e["teacher_tail"], mode="topk_tail", **kw)
    (gh, gw) = torch.autograd.grad(got.sum(), (hs, ws))
    exp = fastkd.fused_linear_distill_loss(hs, ws, ht, wt, divergence="fkl", **kw)
    (eh, ew) = torch.autograd.grad(exp.sum(), (hs, ws))
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, eh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value_dtype,tol", [("float16", 2e-3), ("float32", 1e-5)])
def test_stored_tail_is_the_mass_outside_the_ids(tmp_path, value_dtype, tol):
    n, h, v, k = 16, 8, 40, 4
    ht, wt = _teacher(n, h, v, 2)
    e = _roundtrip(tmp_path, "c", ht, wt, k=k, values="logprobs", value_dtype=value_dtype)
    p = torch.softmax((ht @ wt.t()).double() / T, -1)  # the tempered teacher: the targets are p_T
    in_k = p.gather(1, e["teacher_ids"])
    torch.testing.assert_close(e["teacher_values"].double().exp(), in_k, rtol=tol, atol=tol)
    torch.testing.assert_close(e["teacher_tail"].double().exp(), 1 - in_k.sum(-1), rtol=tol, atol=tol)
    assert (1 - in_k.sum(-1) > 0.05).all()  # the tail is real mass here, so the check has power


def test_sampled_cache_gradient_is_unbiased_at_temperature(tmp_path):
    """One teacher token replicated R times, sampled at T through the cache writer: the mean gradient of
    the sampled loss (fused path) equals the dense forward-KL gradient at T within 4.5 standard errors."""
    v, h, draws, reps = 12, 6, 4, 3000
    ht, wt = _teacher(1, h, v, 4)
    e = _roundtrip(tmp_path, "s", ht.expand(reps, h).contiguous(), wt, k=draws, values="counts",
                   generator=torch.Generator().manual_seed(5))
    assert (e["teacher_values"].sum(-1) == draws).all()
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(1, 5, generator=g)
    ws = torch.randn(v, 5, generator=g)
    hr = hs.expand(reps, 5).clone().requires_grad_()
    loss = fastkd.fused_linear_sparse_distill_loss(hr, ws, e["teacher_ids"], e["teacher_values"], mode="sampled",
                                                   values="counts", temperature=T, scale_by_t2=True,
                                                   reduction="sum")
    (gh,) = torch.autograd.grad(loss, hr)  # (reps, 5): one independent estimate per row
    hd = hs.clone().requires_grad_()
    dense = fastkd.fused_linear_distill_loss(hd, ws, ht, wt, divergence="fkl", temperature=T, scale_by_t2=True,
                                             reduction="sum")
    (exact,) = torch.autograd.grad(dense, hd)
    mean, se = gh.double().mean(0), gh.double().std(0) / math.sqrt(reps)
    assert ((mean - exact[0].double()).abs() <= 4.5 * se + 1e-6).all(), (mean - exact[0]) / se
    # power: the same draws taken at T = 1 (a temperature mismatch) are biased by many standard errors
    e1 = TeacherCache.create(tmp_path / "s1", vocab_size=v, k=draws, values="counts")
    with e1 as w:
        w.add_from_hidden(ht.expand(reps, h).contiguous(), wt, temperature=1.0,
                          generator=torch.Generator().manual_seed(5))
    e1 = TeacherCache(tmp_path / "s1")[0]
    hr1 = hs.expand(reps, 5).clone().requires_grad_()
    loss1 = fastkd.fused_linear_sparse_distill_loss(hr1, ws, e1["teacher_ids"], e1["teacher_values"],
                                                    mode="sampled", values="counts", temperature=T,
                                                    scale_by_t2=True, reduction="sum")
    (g1,) = torch.autograd.grad(loss1, hr1)
    assert ((g1.double().mean(0) - exact[0].double()).abs() / (se + 1e-12)).max() > 8
