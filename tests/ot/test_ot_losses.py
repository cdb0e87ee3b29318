"""SinKD and ULD vs float64 formulas written here: gradients, masks, -inf logits, bad input."""

from __future__ import annotations

import pytest
import torch

import fastkd
import fastkd.ot.losses as OL
from fastkd.ot import reference as R

F64 = torch.float64


def _sinkd_formula(s, t, temp, eps, n_iter):
    ps, pt = torch.softmax(s / temp, -1), torch.softmax(t / temp, -1)
    w = torch.cdist(ps, pt, p=1)
    p = torch.exp(-w / eps)
    for _ in range(n_iter):
        p = p / p.sum(1, keepdim=True)
        p = p / p.sum(0, keepdim=True)
    return (p * w).sum() / s.shape[0]


@pytest.mark.parametrize("shape, temp, eps, n_iter", [((6, 11), 2.0, 0.1, 20), ((2, 3, 17), 1.0, 0.05, 5),
                                                      ((5, 9), 3.0, 1.0, 0)])
def test_sinkd_value_and_grad(shape, temp, eps, n_iter, monkeypatch):
    s = torch.randn(*shape, dtype=F64, requires_grad=True)
    t = torch.randn(*shape, dtype=F64)
    got = fastkd.sinkd_loss(s, t, temperature=temp, eps=eps, n_iter=n_iter)
    v = shape[-1]
    want = _sinkd_formula(s.reshape(-1, v), t.reshape(-1, v), temp, eps, n_iter)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got, R.sinkd_loss(s.reshape(-1, v), t.reshape(-1, v), temp, eps, n_iter))
    (g1,) = torch.autograd.grad(2.5 * got, s)  # grad_output != 1
    (g2,) = torch.autograd.grad(2.5 * want, s)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(OL, "_CHUNK_ELEMS", v)  # one teacher row per chunk
    (g3,) = torch.autograd.grad(fastkd.sinkd_loss(s, t, temperature=temp, eps=eps, n_iter=n_iter) * 2.5, s)
    torch.testing.assert_close(g3, g2, rtol=1e-10, atol=1e-12)


def test_sinkd_gradcheck_and_low_precision():
    s = torch.randn(3, 5, dtype=F64, requires_grad=True)
    t = torch.randn(3, 5, dtype=F64)
    assert torch.autograd.gradcheck(lambda z: fastkd.sinkd_loss(z, t, n_iter=3), (s,))
    s32 = torch.randn(8, 33)
    t32 = torch.randn(8, 33)
    want = _sinkd_formula(s32.double(), t32.double(), 2.0, 0.1, 20)
    for dt in (torch.bfloat16, torch.float16):
        sl = s32.to(dt).requires_grad_()
        got = fastkd.sinkd_loss(sl, t32.to(dt))
        assert got.dtype == torch.float32
        lo = _sinkd_formula(s32.to(dt).float(), t32.to(dt).float(), 2.0, 0.1, 20)
        torch_err = (lo.double() - want).abs()
        assert (got.double() - want).abs() <= torch_err + 1e-5
        got.backward()
        assert sl.grad.dtype == dt and torch.isfinite(sl.grad.float()).all()


@pytest.mark.parametrize("vs, vt", [(37, 37), (41, 29), (13, 50)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uld_vs_formula(vs, vt, reduction):
    s = torch.randn(3, 4, vs, dtype=F64, requires_grad=True)
    t = torch.randn(3, 4, vt, dtype=F64)
    labels = torch.randint(0, 5, (3, 4))
    labels[0, 1] = labels[2, 3] = -100
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    keep = (labels != -100) & mask
    got = fastkd.uld_loss(s, t, temperature=1.7, labels=labels, mask=mask, reduction=reduction)
    per = R.uld_per_token(s, t, 1.7) * keep
    want = {"mean": per.sum() / keep.sum(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    go = torch.rand_like(got) + 0.5  # grad_output != 1
    (g1,) = torch.autograd.grad(got, s, go)
    (g2,) = torch.autograd.grad(want, s, go)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_uld_chunks_gradcheck_and_inf_logits(monkeypatch):
    monkeypatch.setattr(OL, "_CHUNK_ELEMS", 20)  # several row chunks
    s = torch.randn(5, 9, dtype=F64, requires_grad=True)
    t = torch.randn(5, 7, dtype=F64)
    t[:, 2] = -torch.inf
    sl = s.detach().clone()
    sl[:, 4] = -torch.inf
    sl.requires_grad_()
    got = fastkd.uld_loss(sl, t)
    torch.testing.assert_close(got, R.uld_per_token(sl, t).mean())
    got.backward()
    assert torch.isfinite(sl.grad).all() and torch.all(sl.grad[:, 4] == 0)
    assert torch.autograd.gradcheck(lambda z: fastkd.uld_loss(z, t, reduction="none"), (s,))


def test_uld_all_masked_and_nan_in_masked_rows():
    s = torch.randn(2, 3, 10, requires_grad=True)
    t = torch.randn(2, 3, 10)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = fastkd.uld_loss(s, t, mask=mask)
    loss.backward()
    assert loss.item() == 0 and torch.all(s.grad == 0)
    s2 = s.detach().clone()
    s2[0, 0] = torch.nan
    s2.requires_grad_()
    mask[1] = True
    loss = fastkd.uld_loss(s2, t, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(s2.grad[0] == 0)
    assert torch.isnan(fastkd.uld_loss(s2.detach(), t))  # NaN in a kept row is not hidden


def test_uld_top_k_error_bound():
    s = torch.randn(16, 200, dtype=F64) * 3
    t = torch.randn(16, 150, dtype=F64) * 3
    exact = fastkd.uld_loss(s, t, reduction="none")
    for k in (1, 10, 100, 1000):
        approx = fastkd.uld_loss(s, t, reduction="none", top_k=k)
        tq = 1 - torch.softmax(s, -1).topk(min(k, 200), -1).values.sum(-1)
        tp = 1 - torch.softmax(t, -1).topk(min(k, 150), -1).values.sum(-1)
        assert torch.all(approx <= exact + 1e-12)
        assert torch.all(exact - approx <= 2 * torch.minimum(tq, tp) + 1e-12)
    torch.testing.assert_close(fastkd.uld_loss(s, t, top_k=1000), exact.mean())


def test_uld_low_precision():
    s = torch.randn(64, 257) * 2
    t = torch.randn(64, 300) * 2
    want = R.uld_per_token(s.double(), t.double()).mean()
    for dt in (torch.bfloat16, torch.float16):
        sl = s.to(dt).requires_grad_()
        got = fastkd.uld_loss(sl, t.to(dt))
        torch_err = (R.uld_per_token(s.to(dt).float(), t.to(dt).float()).mean().double() - want).abs()
        assert got.dtype == torch.float32
        assert (got.double() - want).abs() <= torch_err + 1e-5
        got.backward()
        assert sl.grad.dtype == dt


def test_bad_inputs():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.sinkd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="eps"):
        fastkd.sinkd_loss(s, t, eps=-1.0)
    with pytest.raises(ValueError, match="n_iter"):
        fastkd.sinkd_loss(s, t, n_iter=-1)
    with pytest.raises(ValueError, match="vocabulary"):
        fastkd.sinkd_loss(s, torch.randn(4, 9))
    with pytest.raises(ValueError, match="detach"):
        fastkd.sinkd_loss(s, t.requires_grad_())
    t = t.detach()
    with pytest.raises(ValueError, match="detach"):
        fastkd.uld_loss(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match="every dimension but the last"):
        fastkd.uld_loss(s, torch.randn(5, 8))
    with pytest.raises(TypeError, match="one dtype"):
        fastkd.uld_loss(s, t.double())
    with pytest.raises(ValueError, match="top_k"):
        fastkd.uld_loss(s, t, top_k=0)
    with pytest.raises(ValueError, match="reduction"):
        fastkd.uld_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="mask must have shape"):
        fastkd.uld_loss(s, t, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="student_logits"):
        fastkd.uld_loss(s.long(), t)


def test_empty_vocabulary_raises():
    with pytest.raises(ValueError, match="student_logits has an empty vocabulary"):
        fastkd.uld_loss(torch.randn(3, 0), torch.randn(3, 5))
    with pytest.raises(ValueError, match="teacher_logits has an empty vocabulary"):
        fastkd.sinkd_loss(torch.randn(3, 4), torch.randn(3, 0))


def _uld_sequence_mean64(s, t, keep, temp):
    """ULD paper / TRL GOLD reduction restated: per sequence Σ_kept L1(sorted q, sorted p) / kept, then the
    mean over the sequences that keep a token."""
    per = R.uld_per_token(s.double(), t.double(), temp)  # (B, T)
    k = keep.double()
    count = k.sum(1)
    seq = (per * k).sum(1) / count.clamp_min(1)
    return seq[count > 0].mean() if bool((count > 0).any()) else per.sum() * 0


def test_uld_sequence_mean_is_per_sequence_then_batch():
    torch.manual_seed(7)
    s = torch.randn(3, 6, 13, dtype=F64, requires_grad=True)
    t = torch.randn(3, 6, 17, dtype=F64)
    labels = torch.zeros(3, 6, dtype=torch.long)
    labels[0, 1:] = -100  # sequence 0 keeps 1 token, 1 keeps 6, 2 keeps none
    labels[2] = -100
    keep = labels != -100
    got = fastkd.uld_loss(s, t, temperature=1.3, labels=labels, reduction="sequence_mean")
    want = _uld_sequence_mean64(s, t, keep, 1.3)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g, g_want)
    # differs from the token mean when sequences keep different numbers of tokens
    mean = fastkd.uld_loss(s, t, temperature=1.3, labels=labels)
    assert abs(float(mean) - float(got)) > 1e-3
    # equal lengths: both reductions agree
    full = fastkd.uld_loss(s, t, reduction="sequence_mean")
    torch.testing.assert_close(full, fastkd.uld_loss(s, t))
    # nothing kept: 0 with zero gradient, never NaN
    none = fastkd.uld_loss(s, t, mask=torch.zeros(3, 6, dtype=torch.bool), reduction="sequence_mean")
    assert float(none) == 0.0 and not torch.autograd.grad(none, s)[0].any()
    assert torch.autograd.gradcheck(
        lambda z: fastkd.uld_loss(z, t[:2, :3], labels=labels[:2, :3], reduction="sequence_mean"),
        (s[:2, :3].detach().clone().requires_grad_(),))


def test_uld_sequence_mean_needs_the_batch_layout():
    with pytest.raises(ValueError, match=r"sequence_mean.*\(B, T, V\)"):
        fastkd.uld_loss(torch.randn(4, 9), torch.randn(4, 7), reduction="sequence_mean")
    with pytest.raises(ValueError, match="sequence_mean"):
        fastkd.uld_loss(torch.randn(2, 2, 4, 9), torch.randn(2, 2, 4, 7), reduction="sequence_mean")
