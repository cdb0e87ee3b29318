"""logprobs_from_hidden and on_policy_distill_loss under AMP (torch.autocast cpu bf16, fp32 weights): the head
computes in bf16, the weight gradient accumulates in fp32, and the error stays within plain autocast's (bf16 logits)
of the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.onpolicy.estimators import token_loss

BF16 = torch.bfloat16
AMP = dict(device_type="cpu", dtype=BF16)


def _prob(hidden_dtype, n=37, h=16, v=67, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(n, h, generator=g).to(hidden_dtype), weight=torch.randn(v, h, generator=g) * 0.4,
                bias=torch.randn(v, generator=g) * 0.1), torch.randint(0, v, (n,), generator=g), g


def _leaves(prob, dtype=None):
    return {k: (v if dtype is None else v.to(dtype)).detach().clone().requires_grad_() for k, v in prob.items()}


def _plain(hidden, weight, bias, ids, t, s, temperature, kind):
    """The same losses written with F.linear (under autocast: bf16 logits) and a float64 log-softmax."""
    lp = torch.log_softmax(F.linear(hidden, weight, bias).double() / temperature, -1)
    lq = lp.gather(-1, ids[:, None])[:, 0]
    if kind == "logprobs":
        ent = -(lp.exp() * lp).sum(-1)
        return torch.stack([lq, ent], -1)
    return token_loss(lq, t.double(), s.double(), "advantage", True, (0.2, 0.2)).mean()


def _fastkd(hidden, weight, bias, ids, t, s, temperature, kind):
    if kind == "logprobs":
        out = fastkd.logprobs_from_hidden(hidden, weight, ids, bias=bias, temperature=temperature,
                                          return_entropy=True, chunk_size=8)
        return torch.stack([out.logprobs, out.entropy], -1)
    return fastkd.on_policy_distill_loss(hidden, weight, ids, t, bias=bias, sampling_logprobs=s, clip=0.2,
                                         temperature=temperature, chunk_size=8)


def _run(fn, leaves, go, *rest):
    out = fn(**leaves, ids=rest[0], t=rest[1], s=rest[2], temperature=rest[3], kind=rest[4])
    grads = torch.autograd.grad(out, list(leaves.values()), go.to(out.dtype))
    return out.detach(), dict(zip(leaves, grads))


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("kind", ["logprobs", "on_policy"])
@pytest.mark.parametrize("hidden_dtype", [BF16, torch.float32])
def test_autocast_bf16_with_fp32_weights(head_compute_dtypes, kind, hidden_dtype):
    prob, ids, g = _prob(hidden_dtype)
    n = ids.shape[0]
    t, s = -torch.rand(n, generator=g) * 3, -torch.rand(n, generator=g) * 3
    go = torch.randn(n, 2, generator=g) if kind == "logprobs" else torch.tensor(1.3)
    rest = (ids, t, s, 1.4, kind)
    seen = head_compute_dtypes
    with torch.autocast(**AMP):
        out, gr = _run(_fastkd, _leaves(prob), go, *rest)
        amp_out, amp_g = _run(_plain, _leaves(prob), go.double(), *rest)
    assert seen and all(d == BF16 for d in seen), seen  # the head computes in bf16
    ref, gref = _run(_plain, _leaves(prob, torch.float64), go.double(), *rest)
    assert out.dtype == torch.float32
    assert _err(out, ref) <= 2 * _err(amp_out, ref) + 1e-3 * ref.abs().max().item() + 1e-4
    for k in gr:
        assert gr[k].dtype == prob[k].dtype, k
        scale = gref[k].abs().max().item()
        assert _err(gr[k], gref[k]) <= 2 * _err(amp_g[k], gref[k]) + 2e-2 * scale, k
    gw = gr["weight"]  # accumulated in fp32 over the chunks: not the bf16 rounding of an fp32 value
    assert gw.dtype == torch.float32 and (gw != gw.to(BF16).float()).any()


def test_without_autocast_mixed_dtypes_still_raise():
    prob, ids, _ = _prob(BF16)
    with pytest.raises(TypeError, match="weight dtype"):
        fastkd.logprobs_from_hidden(prob["hidden"], prob["weight"], ids)
    with pytest.raises(TypeError, match="weight dtype"):
        fastkd.on_policy_distill_loss(prob["hidden"], prob["weight"], ids, torch.zeros(ids.shape[0]))


def test_framework_semantics_under_autocast(head_compute_dtypes):
    """fused_linear_sparse_distill_loss(semantics=...) under autocast: bf16 head, fp32 weight gradient, within plain
    autocast's error of the float64 reference (verl's tail-aware top-k KL written out)."""
    prob, _, g = _prob(BF16)
    t_lp, ids = torch.log_softmax(torch.randn(37, 67, generator=g, dtype=torch.float64) * 2, -1).topk(5, -1)
    seen = head_compute_dtypes

    def fk(hidden, weight, bias):
        return fastkd.fused_linear_sparse_distill_loss(hidden, weight, ids, t_lp.float(), student_bias=bias,
                                                       semantics="verl_topk_tail", chunk_size=8)

    def plain(hidden, weight, bias):
        lq = torch.log_softmax(F.linear(hidden, weight, bias).double(), -1).gather(1, ids)
        q, p = lq.exp().sum(-1), t_lp.exp().sum(-1)
        pt, qt = (1 - p).clamp(0, 1), (1 - q).clamp(1e-6, 1)
        return ((t_lp.exp() * (t_lp - lq)).sum(-1) + pt * (pt.log() - qt.log())).mean()

    def run(fn, leaves):
        out = fn(**leaves)
        return out.detach(), dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()))))

    with torch.autocast(**AMP):
        out, gr = run(fk, _leaves(prob))
        amp_out, amp_g = run(plain, _leaves(prob))
    assert seen and all(d == BF16 for d in seen), seen
    ref, gref = run(plain, _leaves(prob, torch.float64))
    assert _err(out, ref) <= 2 * _err(amp_out, ref) + 1e-3 * ref.abs().item() + 1e-4
    for k in gr:
        assert gr[k].dtype == prob[k].dtype, k
        assert _err(gr[k], gref[k]) <= 2 * _err(amp_g[k], gref[k]) + 2e-2 * gref[k].abs().max().item(), k
    assert (gr["weight"] != gr["weight"].to(BF16).float()).any()
