"""fastkd.integrations.trl.generalized_jsd_loss vs TRL's own GKDTrainer.generalized_jsd_loss and vs a
float64 formula written here (values and gradients, every reduction, labels with -100)."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.integrations import trl as fkd_trl

trl_gkd = pytest.importorskip("trl.experimental.gkd", reason="trl not installed")
TRL_FN = trl_gkd.GKDTrainer.generalized_jsd_loss

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def formula64(s, t, labels, beta, temp, reduction, num_items=None):
    """The GKD generalized JSD written out in float64 (independent of both implementations)."""
    s = s.double() / temp
    t = t.double() / temp
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = log_q.exp(), log_p.exp()
    if beta == 0:
        el = p * (log_p - log_q)
    elif beta == 1:
        el = q * (log_q - log_p)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        el = (torch.where(p > 0, beta * p * (log_p - log_m), 0.0)
              + torch.where(q > 0, (1 - beta) * q * (log_q - log_m), 0.0))
    if labels is not None:
        el = el[labels != -100]
    if num_items is not None:
        return el.sum() / num_items
    if reduction == "batchmean":
        return el.sum() / (max(int((labels != -100).sum()), 1) if labels is not None else max(el.size(0), 1))
    if reduction == "sum":
        return el.sum()
    if reduction == "mean":
        return el.mean()
    return el


def make(b=3, t=7, v=53, dtype=torch.float32, with_labels=True):
    s = (torch.randn(b, t, v) * 2).to(dtype).requires_grad_()
    te = (torch.randn(b, t, v) * 2).to(dtype)
    labels = None
    if with_labels:
        labels = torch.randint(0, v, (b, t))
        labels[0, :3] = -100
        labels[2, -2:] = -100
    return s, te, labels


def grads(fn, s, *args, **kw):
    s = s.detach().clone().requires_grad_()
    out = fn(s, *args, **kw)
    gout = torch.randn(out.shape).to(out.dtype) if out.dim() else torch.tensor(1.7, dtype=out.dtype)
    (out * gout).sum().backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_trl_and_formula(reduction, beta, with_labels):
    s, te, labels = make(with_labels=with_labels)
    kw = dict(labels=labels, beta=beta, temperature=1.7, reduction=reduction)
    torch.manual_seed(1)
    ours, g_ours = grads(fkd_trl.generalized_jsd_loss, s, te, **kw)
    torch.manual_seed(1)
    theirs, g_theirs = grads(TRL_FN, s, te, **kw)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-7)
    torch.manual_seed(1)
    ref, g_ref = grads(formula64, s.double(), te, labels, beta, 1.7, reduction)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_num_items_in_batch(beta):
    s, te, labels = make()
    for n in (11, torch.tensor(11)):
        ours, g1 = grads(fkd_trl.generalized_jsd_loss, s, te, labels, beta, num_items_in_batch=n)
        theirs, g2 = grads(TRL_FN, s, te, labels, beta, num_items_in_batch=n)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


def test_signature_and_defaults_match_trl():
    import inspect

    ours = inspect.signature(fkd_trl.generalized_jsd_loss).parameters
    theirs = inspect.signature(TRL_FN).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def test_all_masked_is_zero_not_nan():
    s, te, labels = make()
    labels.fill_(-100)
    out, g = grads(fkd_trl.generalized_jsd_loss, s, te, labels)
    assert out.item() == 0.0 and torch.count_nonzero(g) == 0
    assert TRL_FN(s, te, labels).item() == 0.0


def test_bf16_close_to_float64():
    s, te, labels = make(dtype=torch.bfloat16)
    ours = fkd_trl.generalized_jsd_loss(s, te, labels)
    theirs = TRL_FN(s, te, labels)  # TRL computes in bf16
    ref = formula64(s, te, labels, 0.5, 1.0, "batchmean")
    assert ours.dtype == torch.float32
    assert abs(ours.double() - ref) <= abs(theirs.double() - ref) + 1e-3 * ref.abs()


def test_teacher_requiring_grad_falls_back_and_propagates():
    s, te, labels = make()
    te = te.detach().requires_grad_()
    fkd_trl.generalized_jsd_loss(s, te, labels).backward()
    g_ours = te.grad.clone()
    te.grad = None
    TRL_FN(s, te, labels).backward()
    torch.testing.assert_close(g_ours, te.grad, rtol=1e-4, atol=1e-7)


def test_bad_inputs():
    s, te, labels = make()
    with pytest.raises(ValueError, match="reduction"):
        fkd_trl.generalized_jsd_loss(s, te, labels, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        fkd_trl.generalized_jsd_loss(s, te, labels, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        fkd_trl.generalized_jsd_loss(s, te, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        fkd_trl.generalized_jsd_loss(s, te, labels[:, :-1])


def test_patch_gkd_trainer():
    class Sub(trl_gkd.GKDTrainer):
        pass

    assert fkd_trl.patch_gkd_trainer(Sub) is Sub
    assert Sub.generalized_jsd_loss is fkd_trl.generalized_jsd_loss
    assert trl_gkd.GKDTrainer.generalized_jsd_loss is TRL_FN  # the base class is untouched
    obj = object.__new__(Sub)  # calls through self.generalized_jsd_loss, as compute_loss does
    s, te, labels = make()
    out = obj.generalized_jsd_loss(student_logits=s, teacher_logits=te, labels=labels, beta=0.5)
    assert math.isclose(out.item(), TRL_FN(s, te, labels).item(), rel_tol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_masked_vocabulary_entries_stay_finite(beta):
    """-inf logits on both sides (masked vocabulary): finite, equal to the formula with a finite stand-in
    (logits -60: mass e^-60, negligible). TRL gives NaN here: exp(-inf)·(-inf - x)."""
    s, te, labels = make()
    s = s.detach()
    s[..., :3] = float("-inf")
    te[..., :3] = float("-inf")
    ours, g = grads(fkd_trl.generalized_jsd_loss, s, te, labels, beta)
    ref, g_ref = grads(formula64, s.double().clamp_min(-60.0), te.double().clamp_min(-60.0), labels, beta, 1.0,
                       "batchmean")
    assert torch.isfinite(ours) and torch.isfinite(g).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_one_dimensional_input_matches_trl(reduction, beta):
    # a single (V,) distribution: TRL's "batchmean" divides by jsd.size(0), i.e. by V here
    torch.manual_seed(3)
    s, te = (torch.randn(41) * 2).requires_grad_(), torch.randn(41) * 2
    torch.manual_seed(4)
    ours, g_ours = grads(fkd_trl.generalized_jsd_loss, s, te, beta=beta, reduction=reduction)
    torch.manual_seed(4)
    theirs, g_theirs = grads(TRL_FN, s, te, beta=beta, reduction=reduction)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-8)
    ref = formula64(s.detach(), te, None, beta, 1.0, reduction)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-8)
    if reduction == "batchmean":
        total = fkd_trl.generalized_jsd_loss(s.detach(), te, beta=beta, reduction="sum")
        torch.testing.assert_close(ours, total / 41)
