"""fastkd.logprobs_from_hidden, the on-policy estimators and the framework top-k semantics vs float64 references."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.onpolicy import reference as R
from fastkd.onpolicy.estimators import iw_opd_weights, on_policy_distill_loss

F64 = torch.float64


def _head(n, h, v, seed, dtype=F64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h) * 3).to(dtype).requires_grad_(True)
    b = (torch.randn(v, generator=g, dtype=F64)).to(dtype).requires_grad_(True) if bias else None
    return hid, w, b, g


# ---- logprobs_from_hidden --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,h,v,k,chunk,temp,cap", [(13, 8, 37, 0, 5, 1.0, None), (17, 5, 61, 3, 4, 0.7, 4.0),
                                                    (9, 7, 23, 4, None, 1.9, None)])
def test_logprobs_match_reference(n, h, v, k, chunk, temp, cap):
    hid, w, b, g = _head(n, h, v, n)
    ids = torch.randint(0, v, (n, k) if k else (n,), generator=g)
    out = fastkd.logprobs_from_hidden(hid, w, ids, bias=b, temperature=temp, softcap=cap, return_entropy=True,
                                      return_topk=5, chunk_size=chunk)
    lq, ent, logq = R.logprobs(hid, w, ids, bias=b, temperature=temp, softcap=cap)
    assert out.logprobs.shape == ids.shape and out.logprobs.dtype == F64
    torch.testing.assert_close(out.logprobs, lq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.entropy, ent, rtol=1e-12, atol=1e-12)
    top = logq.topk(5, -1)
    torch.testing.assert_close(out.topk_logprobs, top.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.topk_ids, top.indices)
    go, ge = torch.randn(lq.shape, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)  # grad_output ≠ 1
    got = torch.autograd.grad((out.logprobs * go).sum() + (out.entropy * ge).sum(), (hid, w, b))
    want = torch.autograd.grad((lq * go).sum() + (ent * ge).sum(), (hid, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_logprobs_plain_tensor_3d_and_masked_vocab():
    hid, w, b, g = _head(2 * 7, 6, 31, 3)
    with torch.no_grad():
        b[4] = -math.inf  # a column no token can take
    h3 = hid.view(2, 7, 6)
    ids = torch.randint(0, 31, (2, 7), generator=g)
    ids[0, 0] = 4
    lq = fastkd.logprobs_from_hidden(h3, w, ids, bias=b, chunk_size=3)
    assert isinstance(lq, torch.Tensor) and lq.shape == (2, 7) and lq[0, 0] == -math.inf
    ref, ent, _ = R.logprobs(hid, w, ids.reshape(-1), bias=b)
    torch.testing.assert_close(lq.reshape(-1), ref)
    out = fastkd.logprobs_from_hidden(h3, w, ids, bias=b, return_entropy=True)
    torch.testing.assert_close(out.entropy.reshape(-1), ent)
    keep = ids.reshape(-1) != 4  # a −inf log-prob has no finite gradient
    gh, gw = torch.autograd.grad(out.logprobs.reshape(-1)[keep].sum() + out.entropy.sum(), (hid, w))
    rh, rw = torch.autograd.grad(ref[keep].sum() + ent.sum(), (hid, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    assert gh.isfinite().all() and gw.isfinite().all()


def test_logprobs_gradcheck():
    hid, w, b, g = _head(5, 3, 7, 1)
    ids = torch.randint(0, 7, (5, 2), generator=g)

    def f(x, y, z):
        out = fastkd.logprobs_from_hidden(x, y, ids, bias=z, temperature=0.8, softcap=3.0, return_entropy=True,
                                          chunk_size=2)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(f, (hid, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logprobs_low_precision(dtype):
    hid, w, b, g = _head(19, 16, 53, 5, dtype=dtype)
    ids = torch.randint(0, 53, (19,), generator=g)
    out = fastkd.logprobs_from_hidden(hid, w, ids, bias=b, return_entropy=True, chunk_size=8)
    assert out.logprobs.dtype == torch.float32
    lq, ent, _ = R.logprobs(hid, w, ids, bias=b)  # float64 of the same (rounded) inputs
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logprobs.double(), lq, **tol)
    torch.testing.assert_close(out.entropy.double(), ent, **tol)
    gh, gw = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), (hid, w))
    rh, rw = torch.autograd.grad(lq.sum() + ent.sum(), (hid, w))
    assert gh.dtype == dtype and gw.dtype == dtype
    gtol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gh.double(), rh.double(), **gtol)
    torch.testing.assert_close(gw.double(), rw.double(), **gtol)


def test_logprobs_nan_and_bad_input():
    hid, w, b, g = _head(6, 4, 11, 2)
    with torch.no_grad():
        hid[2, 1] = math.nan
    out = fastkd.logprobs_from_hidden(hid, w, torch.zeros(6, dtype=torch.long), return_entropy=True)
    assert out.logprobs[2].isnan() and out.entropy[2].isnan()
    assert out.logprobs[[0, 1, 3, 4, 5]].isfinite().all()
    ids = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="ids must be in"):
        fastkd.logprobs_from_hidden(hid, w, ids + 11)
    with pytest.raises(ValueError, match="ids must be in"):
        fastkd.logprobs_from_hidden(hid, w, ids - 1)
    with pytest.raises(ValueError, match="ids must have shape"):
        fastkd.logprobs_from_hidden(hid, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must be an integer"):
        fastkd.logprobs_from_hidden(hid, w, ids.float())
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            fastkd.logprobs_from_hidden(hid, w, ids, temperature=t)
    with pytest.raises(ValueError, match="return_topk"):
        fastkd.logprobs_from_hidden(hid, w, ids, return_topk=12)
    with pytest.raises(ValueError, match="hidden size"):
        fastkd.logprobs_from_hidden(hid[:, :3], w, ids)


# ---- on-policy estimators: expectations by sampling --------------------------------------------------------------
def _sampled(v, m, seed, sampler_shift=0.0):
    """Logits z (V,) of q as W[:, 0] with every hidden row e_0; teacher log p; M samples from q_s."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(v, generator=g, dtype=F64)
    logp = torch.log_softmax(torch.randn(v, generator=g, dtype=F64) * 1.5, -1)
    logq = torch.log_softmax(z, -1)
    logqs = torch.log_softmax(z + sampler_shift * torch.randn(v, generator=g, dtype=F64), -1)
    x = torch.multinomial(logqs.exp(), m, replacement=True, generator=g)
    w = torch.randn(v, v, generator=g, dtype=F64)
    w[:, 0] = z
    hid = torch.zeros(m, v, dtype=F64)
    hid[:, 0] = 1.0
    return z, logp, logq, logqs, x, hid, w.requires_grad_(True)


def _mean_and_ci(per_sample: torch.Tensor):
    m = per_sample.shape[0]
    return per_sample.mean(0), 5.0 * per_sample.std(0) / math.sqrt(m) + 1e-12  # 5 σ of the mean


CASES = {  # estimator kwargs, d loss / d log q(x) per sample, the exact expectation of value and gradient
    "k1": dict(kw=dict(estimator="k1"), coef=lambda r, rs: torch.ones_like(r), value="rkl", grad="zero"),
    "k2": dict(kw=dict(estimator="k2"), coef=lambda r, rs: r, value=None, grad="rkl"),
    "k3": dict(kw=dict(estimator="k3"), coef=lambda r, rs: 1 - torch.exp(-r), value="rkl", grad="fkl"),
    "advantage": dict(kw=dict(estimator="advantage"), coef=lambda r, rs: r, value="rkl", grad="rkl"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimator_expectations_on_policy(name):
    case = CASES[name]
    v, m = 7, 60000
    z, logp, logq, _, x, hid, w = _sampled(v, m, seed=11)
    zz = z.clone().requires_grad_(True)
    lq_full = torch.log_softmax(zz, -1)
    exact = {"rkl": R.reverse_kl(lq_full, logp), "fkl": R.forward_kl(lq_full, logp)}
    exact_grad = {k: torch.autograd.grad(e, zz, retain_graph=True)[0] for k, e in exact.items()}
    exact_grad["zero"] = torch.zeros(v, dtype=F64)
    per_tok = on_policy_distill_loss(hid, w, x, logp[x], reduction="none", **case["kw"])
    loss = on_policy_distill_loss(hid, w, x, logp[x], reduction="mean", **case["kw"])
    torch.testing.assert_close(loss, per_tok.mean())
    (gw,) = torch.autograd.grad(loss, w)
    # per-sample gradients wrt z in float64 from the estimator's coefficient: coef(x)·(e_x − q)
    r = logq[x] - logp[x]
    per_grad = case["coef"](r, None)[:, None] * (torch.nn.functional.one_hot(x, v).to(F64) - logq.exp())
    torch.testing.assert_close(gw[:, 0], per_grad.mean(0), rtol=1e-9, atol=1e-12)  # fastkd = the formula
    mean_g, ci_g = _mean_and_ci(per_grad)
    assert (mean_g - exact_grad[case["grad"]]).abs().le(ci_g).all(), (mean_g, exact_grad[case["grad"]], ci_g)
    if case["value"]:
        mean_v, ci_v = _mean_and_ci(per_tok.detach())
        assert abs(mean_v - exact[case["value"]].item()) <= ci_v
    if name == "k1":  # the CI is tight enough to tell k1's gradient (mean 0) from ∇KL(q‖p)
        assert (mean_g - exact_grad["rkl"]).abs().gt(ci_g).any()


def test_advantage_importance_ratio_stale_sampler():
    """x ~ q_s ≠ q: E[−A·ρ] = KL(q‖p) − KL(q‖q_s) and E[grad] = ∇KL(q‖p) − ∇KL(q‖q_s)."""
    v, m = 6, 80000
    z, logp, logq, logqs, x, hid, w = _sampled(v, m, seed=5, sampler_shift=0.6)
    zz = z.clone().requires_grad_(True)
    lq_full = torch.log_softmax(zz, -1)
    target = R.reverse_kl(lq_full, logp) - R.reverse_kl(lq_full, logqs)
    (tg,) = torch.autograd.grad(target, zz)
    per_tok = on_policy_distill_loss(hid, w, x, logp[x], sampling_logprobs=logqs[x], reduction="none")
    (gw,) = torch.autograd.grad(per_tok.mean(), w)
    ratio = (logq[x] - logqs[x]).exp()
    per_grad = ((logqs[x] - logp[x]) * ratio)[:, None] * (torch.nn.functional.one_hot(x, v).to(F64) - logq.exp())
    torch.testing.assert_close(gw[:, 0], per_grad.mean(0), rtol=1e-9, atol=1e-12)
    mean_g, ci_g = _mean_and_ci(per_grad)
    assert (mean_g - tg).abs().le(ci_g).all()
    mean_v, ci_v = _mean_and_ci(per_tok.detach())
    assert abs(mean_v - target.item()) <= ci_v
    # without the ratio (TRL iw_opd's −A·log q) the gradient is E_{q_s}[(log q_s − log p)∇log q], not the above
    plain = on_policy_distill_loss(hid, w, x, logp[x], sampling_logprobs=logqs[x], importance_ratio=False)
    (gp,) = torch.autograd.grad(plain, w)
    want = ((logqs[x] - logp[x])[:, None] * (torch.nn.functional.one_hot(x, v).to(F64) - logq.exp())).mean(0)
    torch.testing.assert_close(gp[:, 0], want, rtol=1e-9, atol=1e-12)


def test_advantage_clip_matches_ppo_formula_and_weights():
    hid, w, b, g = _head(23, 5, 17, 8)
    x = torch.randint(0, 17, (23,), generator=g)
    t = -torch.rand(23, generator=g, dtype=F64) * 4
    s = -torch.rand(23, generator=g, dtype=F64) * 4
    mask = torch.rand(23, generator=g) > 0.2
    tw = torch.rand(23, generator=g, dtype=F64)
    loss = on_policy_distill_loss(hid, w, x, t, bias=b, sampling_logprobs=s, clip=(0.2, 0.28), mask=mask,
                                  token_weight=tw, temperature=0.9, chunk_size=4)
    lq, _, _ = R.logprobs(hid, w, x, bias=b, temperature=0.9)
    adv, ratio = t - s, (lq - s).exp()
    per = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    want = (per * tw * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    for a, e in zip(torch.autograd.grad(loss, (hid, w, b)), torch.autograd.grad(want, (hid, w, b))):
        torch.testing.assert_close(a, e)


def test_estimator_bad_input():
    hid, w, b, g = _head(6, 4, 11, 2)
    x = torch.zeros(6, dtype=torch.long)
    t = torch.zeros(6, dtype=F64)
    with pytest.raises(ValueError, match="teacher_logprobs must have shape"):
        on_policy_distill_loss(hid, w, x, t[:5])
    with pytest.raises(ValueError, match="sampling_logprobs must have shape"):
        on_policy_distill_loss(hid, w, x, t, sampling_logprobs=t[:, None])
    with pytest.raises(ValueError, match="ids must be in"):
        on_policy_distill_loss(hid, w, x + 11, t)
    with pytest.raises(ValueError, match="ids must have shape"):
        on_policy_distill_loss(hid, w, x[:, None], t)
    with pytest.raises(ValueError, match="temperature"):
        on_policy_distill_loss(hid, w, x, t, temperature=0.0)
    with pytest.raises(ValueError, match="estimator"):
        on_policy_distill_loss(hid, w, x, t, estimator="k4")
    with pytest.raises(ValueError, match="sampling_logprobs and clip"):
        on_policy_distill_loss(hid, w, x, t, estimator="k3", clip=0.2)
    # masked tokens may carry padding ids / −inf teacher values
    mask = torch.tensor([True, False, True, True, True, True])
    bad_x, bad_t = x.clone(), t.clone()
    bad_x[1], bad_t[1] = -100, -math.inf
    loss = on_policy_distill_loss(hid, w, bad_x, bad_t, mask=mask, estimator="k3")
    assert loss.isfinite()
    nan_t = t.clone()
    nan_t[3] = math.nan
    assert on_policy_distill_loss(hid, w, x, nan_t).isnan()


def test_iw_opd_weights():
    a = torch.tensor([[1.0, -2.0, 1.0, 0.5], [0.0, 3.0, -1.0, 0.0]], dtype=F64)
    m = torch.tensor([[True, True, True, False], [True, True, True, True]])
    got = iw_opd_weights(a, m, gamma=0.5)
    absa = torch.where(m, a, 0).abs()
    want = torch.where(m, 1 + 0.5 * (1 - (absa.cumsum(-1) - absa) / absa.sum(-1, keepdim=True)), 0.0)
    torch.testing.assert_close(got, want)


# ---- framework top-k semantics vs each framework's formula on full float64 logits ------------------------------
def _verl_topk(u, t_lp, ids, clamp):
    lq = torch.log_softmax(u, -1).gather(1, ids)
    sm, tm = lq.exp().sum(-1), t_lp.exp().sum(-1)
    if clamp is not None:
        lq, t_lp = lq.clamp_min(clamp), t_lp.clamp_min(clamp)
    return (t_lp.exp() * (t_lp - lq)).sum(-1).clamp_min(0.0), sm, tm


def _verl_topk_tail(u, t_lp, ids, eps):
    lq = torch.log_softmax(u, -1).gather(1, ids)
    sm, tm = lq.exp().sum(-1), t_lp.exp().sum(-1)
    head = (t_lp.exp() * (t_lp - lq)).sum(-1)
    pt, qt = (1 - tm).clamp(0, 1), (1 - sm).clamp(eps, 1)
    return head + pt * (pt.clamp_min(torch.finfo(F64).tiny).log() - qt.log()), sm, tm


def _trl_tail(u, t_lp, ids, beta):
    lq = torch.log_softmax(u, -1).gather(1, ids)

    def tail(x):
        s = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([x, torch.log(-torch.expm1(s))], -1)

    s, t = tail(lq), tail(t_lp)
    ps, pt = s.exp(), t.exp()
    if beta == 0:
        d = pt * (t - s)
    elif beta == 1:
        d = ps * (s - t)
    else:
        mlog = torch.log((1 - beta) * ps + beta * pt)
        d = beta * pt * (t - mlog) + (1 - beta) * ps * (s - mlog)
    return d.sum(-1), lq.exp().sum(-1), t_lp.exp().sum(-1)


@pytest.mark.parametrize("sem,kw,ref", [
    ("verl_topk", dict(), lambda u, t, i: _verl_topk(u, t, i, None)),
    ("verl_topk", dict(log_prob_min_clamp=-4.0), lambda u, t, i: _verl_topk(u, t, i, -4.0)),
    ("verl_topk_tail", dict(tail_mass_eps=1e-6), lambda u, t, i: _verl_topk_tail(u, t, i, 1e-6)),
    ("trl_tail", dict(), lambda u, t, i: _trl_tail(u, t, i, 0.0)),
    ("trl_tail", dict(divergence="rkl"), lambda u, t, i: _trl_tail(u, t, i, 1.0)),
    ("trl_tail", dict(divergence="jsd", beta=0.3), lambda u, t, i: _trl_tail(u, t, i, 0.3)),
])
def test_framework_semantics(sem, kw, ref):
    n, h, v, k = 21, 6, 43, 6
    hid, w, b, g = _head(n, h, v, 17)
    t_lp, ids = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * 2.5, -1).topk(k, -1)
    temp = 0.8
    u = R.student_logits(hid, w, b, temp)
    # token 3: the teacher's top-k mass is e^-2 of the student's there, so the truncated sum is < 0 (verl clamps)
    t_lp[3] = torch.log_softmax(u[3].detach(), -1)[ids[3]] - 2.0
    loss, mass = fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, student_bias=b, temperature=temp,
                                                         semantics=sem, return_mass=True, reduction="none",
                                                         chunk_size=5, **kw)
    want, sm, tm = ref(u, t_lp, ids)
    if sem == "verl_topk":
        assert want[3] == 0  # the clamp is active on this token
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mass["student_mass"], sm.detach())
    torch.testing.assert_close(mass["teacher_mass"], tm)
    go = torch.rand(n, generator=g, dtype=F64)
    for a, e in zip(torch.autograd.grad((loss * go).sum(), (hid, w, b)), torch.autograd.grad((want * go).sum(),
                                                                                                (hid, w, b))):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
    mean = fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, student_bias=b, temperature=temp,
                                                   semantics=sem, **kw)
    torch.testing.assert_close(mean, want.mean())


def test_framework_semantics_padding_and_errors():
    hid, w, b, g = _head(8, 4, 19, 4)
    t_lp, ids = torch.log_softmax(torch.randn(8, 19, generator=g, dtype=F64), -1).topk(3, -1)
    ids[2, 1], ids[5] = -1, -1  # one padded slot; one all-padding token (contributes 0)
    loss = fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, semantics="verl_topk_tail", reduction="none")
    assert loss[5] == 0
    keep = ids[2] >= 0
    want, _, _ = _verl_topk_tail(R.student_logits(hid, w)[2:3], t_lp[2:3, keep], ids[2:3, keep], 1e-6)
    torch.testing.assert_close(loss[2], want[0])
    with pytest.raises(ValueError, match="requires log_prob_min_clamp=None"):
        fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, semantics="verl_topk_tail", log_prob_min_clamp=-10.0)
    with pytest.raises(ValueError, match="divergence must be 'fkl'"):
        fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, semantics="verl_topk", divergence="rkl")
    with pytest.raises(ValueError, match="semantics"):
        fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, semantics="nemo")
    with pytest.raises(ValueError, match="tail_mass_eps"):
        fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp, semantics="verl_topk_tail", tail_mass_eps=0.0)
    with pytest.raises(ValueError, match="teacher_ids must be in"):
        fastkd.fused_linear_sparse_distill_loss(hid, w, ids + 19, t_lp, semantics="trl_tail")
    nan_h = hid.detach().clone()
    nan_h[1, 0] = math.nan
    for sem in ("verl_topk", "verl_topk_tail", "trl_tail"):
        out = fastkd.fused_linear_sparse_distill_loss(nan_h, w, ids, t_lp, semantics=sem, reduction="none")
        assert out[1].isnan() and out[0].isfinite()


def test_losses_bf16():
    """bf16 heads: the on-policy loss and a framework semantics vs float64 of the same rounded inputs."""
    hid, w, b, g = _head(19, 16, 41, 9, dtype=torch.bfloat16, bias=False)
    x = torch.randint(0, 41, (19,), generator=g)
    t = -torch.rand(19, generator=g, dtype=torch.float32) * 4
    loss = on_policy_distill_loss(hid, w, x, t, estimator="k3", chunk_size=8)
    assert loss.dtype == torch.float32
    lq, _, _ = R.logprobs(hid, w, x)
    r = lq - t.double()
    want = (torch.expm1(-r) + r).mean()
    torch.testing.assert_close(loss.double(), want, rtol=3e-2, atol=3e-2)
    gh, gw = torch.autograd.grad(loss, (hid, w))
    rh, rw = torch.autograd.grad(want, (hid, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # PyTorch's own bf16 error on the same loss (bf16 logits, fp32 log-softmax) sets the bar (house style)
    pl = torch.log_softmax((hid @ w.t()).float(), -1).gather(1, x[:, None])[:, 0] - t
    ph, pw = torch.autograd.grad((torch.expm1(-pl) + pl).mean(), (hid, w))
    for got, ref, low in ((gh, rh, ph), (gw, rw, pw)):
        err = (got.double() - ref.double()).norm() / ref.double().norm()
        torch_err = (low.double() - ref.double()).norm() / ref.double().norm()
        assert err <= 2 * torch_err + 1e-2, (err, torch_err)
    t_lp, ids = torch.log_softmax(torch.randn(19, 41, generator=g, dtype=F64), -1).topk(4, -1)
    sl = fastkd.fused_linear_sparse_distill_loss(hid, w, ids, t_lp.float(), semantics="verl_topk_tail")
    ref, _, _ = _verl_topk_tail(R.student_logits(hid, w), t_lp.float().double(), ids, 1e-6)
    torch.testing.assert_close(sl.double(), ref.mean(), rtol=3e-2, atol=3e-2)
