"""Token selection from the per-token stats (issue 16 item 2): token_weight=callable(stats) and
select="teacher_entropy_top", fraction=f on distill_loss / fused_linear_distill_loss, vs a float64 manual
computation (reference per-token loss and stats, selection by hand, normalised over the selected tokens)."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd import reference as R
from fastkd.core.selection import top_fraction
from fastkd.distill import triton_impl as TD

needs_triton = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")
EXTRA = {"beta": 0.3, "alpha": 0.2, "mu": 0.4, "t": 0.6}


def _manual(rows, stats, keep, reduction, select=None, fraction=None, token_weight=None, num_items=None):
    """float64: r from the reference stats, then Σ r ℓ / Σ r ("mean"), Σ r ℓ, r ℓ, or Σ r ℓ / num_items."""
    n_kept = int(keep.sum())
    if select is not None:
        k = math.ceil(round(fraction * n_kept, 9))
        ent = stats["teacher_entropy"].tolist()
        order = sorted((i for i in range(keep.numel()) if keep[i]), key=lambda i: (-ent[i], i))
        r = torch.zeros(keep.numel(), dtype=torch.float64)
        r[order[:k]] = 1.0
    else:
        r = torch.where(keep, token_weight(stats).double().reshape(-1), 0.0)
    rows = rows.reshape(-1)
    if reduction == "none":
        return rows * r
    if num_items is not None:
        return (rows * r).sum() / num_items
    return (rows * r).sum() / (r.sum() if reduction == "mean" else 1.0)


def _data(n=23, v=67, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 2).to(dtype)
    # teacher rows of very different sharpness: distinct entropies, so the selection is well defined
    t = (torch.randn(n, v, generator=g) * torch.linspace(0.3, 4.0, n).unsqueeze(-1)).to(dtype)
    t[:, 5] = s[:, 5] = -math.inf  # on both sides: every divergence stays finite
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return s, t, labels


@pytest.mark.parametrize(("div", "reduction", "sel", "backend"), [
    ("fkl", "mean", "top", "torch"), ("jsd", "sum", "top", "torch"), ("akl", "none", "top", "torch"),
    ("tvd", "mean", "kl", "torch"), ("rkl", "mean", "disagree", "torch"), ("taid", "num_items", "top", "torch"),
    pytest.param("fkl", "mean", "top", "triton", marks=needs_triton),
    pytest.param("jsd", "sum", "kl", "triton", marks=needs_triton),
])
def test_distill_loss_matches_manual(div, reduction, sel, backend):
    s, t, labels = _data(seed=1)
    num_items = 11.0 if reduction == "num_items" else None
    red = "mean" if reduction == "num_items" else reduction
    if sel == "top":
        how = dict(select="teacher_entropy_top", fraction=0.3)
    elif sel == "kl":
        how = dict(token_weight=lambda st: st["kl"])
    else:
        how = dict(token_weight=lambda st: 1.0 - st["top1_agree"])
    kw = dict(labels=labels, temperature=1.6, ce_weight=0.2, **EXTRA)
    x = s.clone().requires_grad_()
    out = fastkd.distill_loss(x, t, div, reduction=red, num_items_in_batch=num_items, backend=backend, **how, **kw)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad(out, x, go)
    xr = s.double().requires_grad_()
    rows = R.distill_loss(xr, t.double(), div, reduction="none", **kw)
    stats = R.distill_stats(s.double(), t.double(), temperature=1.6, labels=labels)
    keep = labels != -100
    ref = _manual(rows, stats, keep, red, num_items=num_items, **how)  # r from the float64 stats
    (rgrad,) = torch.autograd.grad(ref, xr, go.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-6)
    if sel == "top":  # unselected kept tokens get no gradient
        n_sel = (grad.abs().sum(-1) > 0).sum().item()
        assert n_sel == math.ceil(round(0.3 * int(keep.sum()), 9))


def test_fraction_one_is_the_plain_loss_and_stats_are_returned():
    s, t, labels = _data(seed=3)
    x = s.clone().requires_grad_()
    out, stats = fastkd.distill_loss(x, t, "jsd", labels=labels, select="teacher_entropy_top", fraction=1.0,
                                     return_stats=True)
    (g,) = torch.autograd.grad(out, x)
    y = s.clone().requires_grad_()
    plain, pstats = fastkd.distill_loss(y, t, "jsd", labels=labels, return_stats=True)
    (gp,) = torch.autograd.grad(plain, y)
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g, gp, rtol=1e-6, atol=1e-9)
    assert set(stats) == set(pstats) | {"selected"} and all(torch.equal(stats[k], pstats[k]) for k in pstats)
    assert torch.equal(stats["selected"], (labels != -100).float())  # fraction 1: every kept token


def test_top_fraction_counts_and_ties():
    score = torch.tensor([1.0, 3.0, 3.0, 2.0, 5.0, 0.0, 4.0, 4.0, 1.0, 2.0])
    keep = torch.ones(10, dtype=torch.bool)
    keep[4] = False
    r = top_fraction(score, keep, 0.3)  # ⌈0.3 · 9⌉ = 3: 4.0, 4.0 (idx 6, 7) and the first 3.0 (idx 1)
    assert r.tolist() == [0, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert top_fraction(score, torch.zeros(10, dtype=torch.bool), 0.5).sum() == 0
    assert top_fraction(score, keep, 1e-6).sum() == 1


def _fused_problem(n=29, h=10, v=53, seed=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)
    th = r(n, 8) * torch.linspace(0.2, 3.0, n, dtype=torch.float64).unsqueeze(-1)
    return r(n, h), r(v, h) * 0.5, th, r(v, 8) * 0.7


@pytest.mark.parametrize(("how", "reduction", "opts"), [
    ({"select": "teacher_entropy_top", "fraction": 0.4}, "mean", {"softcap": 3.0, "temperature": 1.5}),
    ({"select": "teacher_entropy_top", "fraction": 0.25}, "none", {"mixture": True}),
    ({"select": "teacher_entropy_top", "fraction": 0.6}, "sum", {"logits": True, "softcap": 2.5}),
    ({"token_weight": lambda st: st["student_entropy"]}, "mean", {"temperature": 2.0}),
    ({"token_weight": lambda st: st["kl"]}, "sum", {"softcap": 2.0}),
])
def test_fused_matches_manual(how, reduction, opts):
    opts = dict(opts)
    mixture, logits = opts.pop("mixture", False), opts.pop("logits", False)
    hs, ws, th, tw = _fused_problem()
    labels = torch.randint(0, 53, (29,), generator=torch.Generator().manual_seed(5))
    labels[::4] = -100
    teach = dict(teacher_logits=th @ tw.T) if logits else dict(teacher_hidden=th, teacher_weight=tw)
    zt = th @ tw.T
    if mixture:
        th2, tw2 = th.flip(0) * 0.5, tw * 1.3
        w = torch.tensor([0.3, 0.7], dtype=torch.float64)
        teach = dict(teacher_hidden=[th, th2], teacher_weight=[tw, tw2], teacher_weights=w)
        temp = opts.get("temperature", 1.0)
        p = 0.3 * torch.softmax(zt / temp, -1) + 0.7 * torch.softmax(th2 @ tw2.T / temp, -1)
        zt = p.log() * temp
    kw = dict(divergence="jsd", labels=labels, reduction=reduction, **opts)
    leaves = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    out = fastkd.fused_linear_distill_loss(*leaves, chunk_size=8, **teach, **how, **kw)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, go)
    refl = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    cap, temp = opts.get("softcap"), opts.get("temperature", 1.0)
    zs = R.apply_softcap(refl[0] @ refl[1].T, cap)
    ztc = zt if mixture else R.apply_softcap(zt, cap)
    rows = R.distill_loss(zs, ztc, "jsd", labels=labels, reduction="none", temperature=temp)
    stats = R.distill_stats(zs.detach(), ztc, temperature=temp, labels=labels)
    ref = _manual(rows, stats, labels != -100, reduction, **how)
    rgrads = torch.autograd.grad(ref, refl, go)
    # 0/1 selections are exact; callable weights come from the fp32 stats (the stats are fp32 by contract)
    tol = dict(rtol=1e-9, atol=1e-11) if "select" in how else dict(rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, **tol)


def test_bad_arguments():
    s, t, _ = _data(n=6, v=9)
    with pytest.raises(ValueError, match="not both"):
        fastkd.distill_loss(s, t, token_weight=lambda st: st["kl"], select="teacher_entropy_top", fraction=0.5)
    with pytest.raises(ValueError, match="select must be one of"):
        fastkd.distill_loss(s, t, select="student_entropy_top", fraction=0.5)
    with pytest.raises(ValueError, match="needs fraction"):
        fastkd.distill_loss(s, t, select="teacher_entropy_top")
    with pytest.raises(ValueError, match="fraction"):
        fastkd.distill_loss(s, t, select="teacher_entropy_top", fraction=1.5)
    with pytest.raises(ValueError, match="fraction"):
        fastkd.distill_loss(s, t, select="teacher_entropy_top", fraction=0.0)
    with pytest.raises(ValueError, match="fraction needs"):
        fastkd.distill_loss(s, t, fraction=0.5)
    with pytest.raises(TypeError, match="token_weight must be a callable"):
        fastkd.distill_loss(s, t, token_weight=torch.ones(6))
    with pytest.raises(ValueError, match="token_weight must return shape"):
        fastkd.distill_loss(s, t, token_weight=lambda st: torch.ones(5))
    with pytest.raises(ValueError, match="token 2"):
        fastkd.distill_loss(s, t, token_weight=lambda st: torch.tensor([1.0, 1, -1, 1, 1, 1]))
    with pytest.raises(TypeError, match="token_weight must return a tensor"):
        fastkd.distill_loss(s, t, token_weight=lambda st: [1.0] * 6)


@pytest.mark.parametrize(("fused", "mode", "how"), [
    (False, "topk", {"select": "teacher_entropy_top", "fraction": 0.4}),
    (False, "topk_tail", {"token_weight": lambda st: st["kl"]}),
    (True, "topk", {"select": "teacher_entropy_top", "fraction": 0.5}),
])
def test_sparse_matches_manual(fused, mode, how):
    import fastkd.sparse.reference as RS

    g = torch.Generator().manual_seed(7)
    n, h, v, k = 19, 8, 45, 6
    hs, ws = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, n, dtype=torch.float64)[:, None]
    vals, ids = torch.log_softmax(t, -1).topk(k, dim=-1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    kw = dict(mode=mode, values="logprobs", labels=labels, temperature=1.3)
    if fused:
        leaf = ws.clone().requires_grad_()
        out = fastkd.fused_linear_sparse_distill_loss(hs, leaf, ids, vals, chunk_size=8, **kw, **how)
    else:
        leaf = (hs @ ws.T).requires_grad_()
        out = fastkd.sparse_distill_loss(leaf, ids, vals, **kw, **how)
    (grad,) = torch.autograd.grad(out, leaf)
    rleaf = leaf.detach().clone().requires_grad_()
    zs = hs @ rleaf.T if fused else rleaf
    rows = RS.sparse_distill_loss(zs, ids, vals, mode=mode, values="logprobs", temperature=1.3)
    stats = RS.sparse_stats(zs.detach(), ids, vals, **kw)
    ref = _manual(rows, stats, labels != -100, "mean", **how)
    (rgrad,) = torch.autograd.grad(ref, rleaf)
    tol = dict(rtol=1e-9, atol=1e-11) if "select" in how else dict(rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(grad, rgrad, **tol)
