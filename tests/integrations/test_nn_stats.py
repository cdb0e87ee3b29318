"""fastkd.nn modules and the issue-16 statistics: last_stats (detached, the last call's), return_stats /
track_stats, equal to the functions' own stats; the loss is unchanged by tracking."""

from __future__ import annotations

import torch

import fastkd
import fastkd.nn as fnn


def _check_same(stats, ref):
    assert set(stats) == set(ref)
    for k in ref:
        assert torch.equal(stats[k], ref[k]), k
        assert not stats[k].requires_grad


def test_distill_loss_module_stats():
    s, t = torch.randn(2, 5, 41), torch.randn(2, 5, 41)
    mask = torch.rand(2, 5) > 0.3
    mod = fnn.DistillLoss("jsd", temperature=2.0, track_stats=True)
    assert mod.last_stats is None
    x = s.clone().requires_grad_()
    out = mod(x, t, mask=mask)
    assert isinstance(out, torch.Tensor) and out.dim() == 0
    ref, ref_stats = fastkd.distill_loss(s, t, "jsd", temperature=2.0, mask=mask, return_stats=True)
    assert torch.equal(out.detach(), ref)
    _check_same(mod.last_stats, ref_stats)
    out.backward()  # tracking keeps the loss differentiable
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # return_stats per call: the function's tuple; a plain module clears last_stats
    plain = fnn.DistillLoss("jsd", temperature=2.0)
    loss, stats = plain(s, t, mask=mask, return_stats=True)
    _check_same(stats, ref_stats)
    _check_same(plain.last_stats, ref_stats)
    plain(s, t, mask=mask)
    assert plain.last_stats is None
    # a per-call track_stats=False overrides the stored option
    mod(s, t, track_stats=False)
    assert mod.last_stats is None


def test_fused_linear_module_stats():
    h, w = torch.randn(9, 16), torch.randn(53, 16) * 0.3
    th, tw = torch.randn(9, 24), torch.randn(53, 24) * 0.3
    mod = fnn.FusedLinearDistillLoss("rkl", temperature=1.5, track_stats=True, chunk_size=4)
    out = mod(h, w, th, tw)
    ref, ref_stats = fastkd.fused_linear_distill_loss(h, w, th, tw, divergence="rkl", temperature=1.5,
                                                      chunk_size=4, return_stats=True)
    assert torch.equal(out, ref)
    _check_same(mod.last_stats, ref_stats)


def test_sparse_module_stats():
    s, t = torch.randn(6, 37), torch.randn(6, 37)
    vals, ids = torch.log_softmax(t, -1).topk(5, dim=-1)
    mod = fnn.SparseDistillLoss(mode="topk", values="logprobs", track_stats=True)
    out = mod(s, ids, vals)
    ref, ref_stats = fastkd.sparse_distill_loss(s, ids, vals, mode="topk", values="logprobs", return_stats=True)
    assert torch.equal(out, ref)
    _check_same(mod.last_stats, ref_stats)
