"""fastkd.nn modules: each equals its function (values and gradients), stores options, shows them in repr,
lets per-call keywords override, and the package imports even when an optional op family is missing."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import fastkd
import fastkd.nn as fnn


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _grad(fn, x, *rest, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *rest, **kw)
    (out.sum() * 1.3).backward()
    return out.detach(), x.grad


def test_distill_loss_module():
    s, t = torch.randn(3, 5, 41), torch.randn(3, 5, 41)
    labels = torch.randint(0, 41, (3, 5))
    labels[0, :2] = -100
    mod = fnn.DistillLoss("jsd", beta=0.3, temperature=2.0, ce_weight=0.5)
    out, g = _grad(mod, s, t, labels=labels)
    ref, g_ref = _grad(fastkd.distill_loss, s, t, "jsd", beta=0.3, temperature=2.0, ce_weight=0.5,
                       labels=labels)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    r = repr(mod)
    assert "DistillLoss(" in r and "divergence='jsd'" in r and "beta=0.3" in r
    # per-call keywords override stored options without changing them
    none = mod(s, t, labels=labels, reduction="none")
    assert none.shape == (3, 5) and mod.options.get("reduction") is None
    with pytest.raises(ValueError, match="divergence"):
        fnn.DistillLoss("nope")(s, t)


def test_fused_linear_module():
    h, w = torch.randn(7, 16), torch.randn(53, 16) * 0.3
    th, tw = torch.randn(7, 24), torch.randn(53, 24) * 0.3
    mod = fnn.FusedLinearDistillLoss("rkl", temperature=1.5)
    w1 = w.clone().requires_grad_()
    out = mod(h, w1, th, tw)
    out.backward()
    w2 = w.clone().requires_grad_()
    ref = fastkd.fused_linear_distill_loss(h, w2, th, tw, divergence="rkl", temperature=1.5)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w1.grad, w2.grad)
    # teacher logits instead of the teacher pair
    out2 = mod(h, w, teacher_logits=th @ tw.t())
    torch.testing.assert_close(out2, ref.detach(), rtol=1e-5, atol=1e-6)
    assert "divergence='rkl'" in repr(mod)


@pytest.mark.skipif(not _has("fastkd.sparse.op"), reason="sparse ops not present")
def test_sparse_modules():
    s = torch.randn(6, 50)
    vals, ids = torch.log_softmax(torch.randn(6, 50), -1).topk(5, dim=-1)
    mod = fnn.SparseDistillLoss(mode="topk_tail", values="logprobs")
    out, g = _grad(mod, s, ids, vals)
    ref, g_ref = _grad(fastkd.sparse_distill_loss, s, ids, vals, mode="topk_tail", values="logprobs")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    assert "fused=False" in repr(mod) and "mode='topk_tail'" in repr(mod)
    h, w = torch.randn(6, 8), torch.randn(50, 8)
    fused = fnn.SparseDistillLoss(fused=True, mode="topk")
    torch.testing.assert_close(fused(h, w, ids, vals),
                               fastkd.fused_linear_sparse_distill_loss(h, w, ids, vals, mode="topk"))
    with pytest.raises(TypeError, match="student_hidden"):
        fused(s, ids, vals)


@pytest.mark.skipif(not _has("fastkd.ot.sinkhorn"), reason="sinkhorn not present")
def test_sinkhorn_module():
    x, y = torch.randn(3, 9, 2), torch.randn(3, 11, 2)
    mod = fnn.SinkhornLoss(eps=0.2, max_iter=200)
    x1 = x.clone().requires_grad_()
    out = mod(x1, y)
    out.backward()
    x2 = x.clone().requires_grad_()
    ref = fastkd.sinkhorn(x=x2, y=y, eps=0.2, max_iter=200).value
    ref.mean().backward()
    torch.testing.assert_close(out, ref.mean())
    torch.testing.assert_close(x1.grad, x2.grad)
    per = fnn.SinkhornLoss(reduction="none", eps=0.2, max_iter=200)(x, y)
    assert per.shape == (3,)
    torch.testing.assert_close(fnn.SinkhornLoss(reduction="sum", eps=0.2, max_iter=200)(x, y), per.sum())
    assert "eps=0.2" in repr(mod) and "reduction='mean'" in repr(mod)
    with pytest.raises(ValueError, match="reduction"):
        fnn.SinkhornLoss(reduction="avg")


@pytest.mark.skipif(not _has("fastkd.ot.losses"), reason="ot_losses not present")
def test_ot_loss_modules():
    s, t = torch.randn(4, 30), torch.randn(4, 30)
    out, g = _grad(fnn.SinKDLoss(temperature=2.0, eps=0.1, n_iter=20), s, t)
    ref, g_ref = _grad(fastkd.sinkd_loss, s, t, temperature=2.0, eps=0.1, n_iter=20)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    t2 = torch.randn(4, 45)  # cross-tokenizer: vocabularies differ
    out, g = _grad(fnn.ULDLoss(temperature=1.5), s, t2)
    ref, g_ref = _grad(fastkd.uld_loss, s, t2, temperature=1.5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


def test_imports_without_optional_families(monkeypatch):
    """fastkd.nn imports with an op family unavailable; only that module fails, when called."""
    monkeypatch.setitem(sys.modules, "fastkd.ot.losses", None)  # import → ImportError
    monkeypatch.delitem(sys.modules, "fastkd.nn", raising=False)
    monkeypatch.setattr(fastkd, "nn", fnn, raising=False)  # restored after the re-import below
    mod = importlib.import_module("fastkd.nn")
    s, t = torch.randn(2, 9), torch.randn(2, 9)
    assert mod.DistillLoss()(s, t).isfinite()
    with pytest.raises(ImportError):
        mod.ULDLoss()(s, t)


def test_modules_have_no_parameters_and_move():
    for m in (fnn.DistillLoss(), fnn.FusedLinearDistillLoss(), fnn.SparseDistillLoss(), fnn.SinkhornLoss(),
              fnn.SinKDLoss(), fnn.ULDLoss()):
        assert list(m.parameters()) == []
        m.to(torch.float64)  # harmless


@pytest.mark.parametrize("make, match", [
    (lambda: fastkd.nn.DistillLoss(divergence="kl"), "divergence"),
    (lambda: fastkd.nn.DistillLoss("jsd", beta=1.5), "beta"),
    (lambda: fastkd.nn.DistillLoss("skl", alpha=-0.1), "alpha"),
    (lambda: fastkd.nn.FusedLinearDistillLoss(divergence="nope"), "divergence"),
    (lambda: fastkd.nn.SparseDistillLoss(divergence="tvd"), "divergence"),
])
def test_bad_divergence_fails_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_every_public_divergence_builds_a_module():
    for name in fastkd.DIVERGENCES:
        assert fastkd.nn.DistillLoss(name).options["divergence"] == name
