"""student_topk / student_topk_from_hidden / union_ids and mode="union" vs float64; k → V gives the dense loss."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd.distill import reference as ref_dense
from fastkd.sparse import reference as ref

BACKENDS = ["torch", "triton"]


def _logits(n, v, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def _merge_loop(tid, tval, sid, sval):
    """Independent union: per token, teacher slots then student slots, an id kept at its first slot."""
    ids, vals = [], []
    for i in range(tid.shape[0]):
        seen, row_i, row_v = set(), [], []
        for a, b in [*zip(tid[i].tolist(), tval[i].tolist()), *zip(sid[i].tolist(), sval[i].tolist())]:
            keep = a >= 0 and a not in seen
            seen.add(a)
            row_i.append(a if keep else -1)
            row_v.append(b)
        ids.append(row_i)
        vals.append(row_v)
    return torch.tensor(ids), torch.tensor(vals, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 1.7])
def test_student_topk_vs_float64(dtype, T):
    z = _logits(7, 53, 1).to(dtype)
    z0 = z.clone()
    ids, lp = fastkd.student_topk(z.view(7, 1, 53), 6, temperature=T)
    assert torch.equal(z, z0)  # the input is not modified
    assert ids.shape == (7, 1, 6) and ids.dtype == torch.int64
    z64 = z.double() / T
    want = torch.log_softmax(z64, -1).gather(-1, ids.view(7, 6))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    torch.testing.assert_close(lp.view(7, 6).double(), want, rtol=tol, atol=tol)
    # the k largest (as a set; bf16 rounding can create ties, then any tied id is a correct choice)
    kth = z64.topk(6, -1).values[:, -1:]
    assert (z64.gather(-1, ids.view(7, 6)) >= kth - 1e-12).all()
    assert (lp.view(7, 6)[:, :-1] >= lp.view(7, 6)[:, 1:]).all()  # decreasing


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_student_topk_from_hidden_vs_float64(softcap):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 11, 8, generator=g, dtype=torch.float64)
    w = torch.randn(37, 8, generator=g, dtype=torch.float64)
    b = torch.randn(37, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        ids, lp = fastkd.student_topk_from_hidden(h.to(dtype), w.to(dtype), 5, student_bias=b.to(dtype),
                                                  softcap=softcap, temperature=1.5, chunk_size=4)
        z = h.reshape(22, 8) @ w.T + b
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        want_lp, want_ids = torch.log_softmax(z / 1.5, -1).topk(5, -1)
        assert ids.shape == (2, 11, 5) and torch.equal(ids.reshape(22, 5), want_ids)
        torch.testing.assert_close(lp.reshape(22, 5).double(), want_lp, rtol=tol, atol=tol)


def test_student_topk_from_hidden_bounded_chunks(monkeypatch):
    """The student's logits are made chunk by chunk (never (N, V)): count the rows per engine call."""
    from fastkd.core import lmhead

    seen = []
    orig = lmhead.LMHeadChunker.logits

    def spy(self, sl):
        z = orig(self, sl)
        seen.append(z.shape[0])
        return z

    monkeypatch.setattr(lmhead.LMHeadChunker, "logits", spy)
    fastkd.student_topk_from_hidden(torch.randn(50, 4), torch.randn(9, 4), 3, chunk_size=16)
    assert seen == [16, 16, 16, 2]


def test_union_ids_vs_loop():
    tid = torch.tensor([[3, 7, -1, 1], [0, 2, 4, 6], [-1, -1, -1, -1]])
    tval = -torch.rand(3, 4, dtype=torch.float64) - 1
    sid = torch.tensor([[7, 5, 3], [6, 6, -1], [9, 9, 2]])  # across-source and within-source repeats, padding
    sval = -torch.rand(3, 3, dtype=torch.float64) - 1
    ids, vals = fastkd.union_ids(tid, tval, sid, sval)
    want_ids, want_vals = _merge_loop(tid, tval, sid, sval)
    assert torch.equal(ids, want_ids) and torch.equal(vals, want_vals)
    assert ids.tolist()[0] == [3, 7, -1, 1, -1, 5, -1]  # the teacher's slot wins for 7 and 3


def _sources(n, v, kt, ks, seed):
    """Dense teacher / student logits, the teacher's top-kt, the student's top-ks and the teacher's log-probs
    there (a served teacher scoring given ids), with padding and an id chosen by both sides."""
    z = _logits(n, v, seed)
    t = _logits(n, v, seed + 100, scale=1.5)
    lpt = torch.log_softmax(t, -1)
    t_lp, t_ids = lpt.topk(kt, -1)
    s_ids, _ = fastkd.student_topk(z, ks)
    s_lp = lpt.gather(-1, s_ids)
    if kt > 2:
        t_ids[1, -1] = -1
    if ks > 2:
        s_ids[2, -1] = -1
    s_ids[0, 0], s_lp[0, 0] = t_ids[0, 0], t_lp[0, 0]  # both sides chose this id
    return z, t, t_ids, t_lp, s_ids, s_lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_union_loss_vs_float64(backend, div, small_blocks):
    z, _, t_ids, t_lp, s_ids, s_lp = _sources(5, 29, 4, 6, 3)
    mask = torch.tensor([True, True, False, True, True])
    zz = z.float().requires_grad_()
    loss = fastkd.sparse_distill_loss(zz, t_ids, t_lp.float(), mode="union", divergence=div, student_ids=s_ids,
                                      student_id_values=s_lp.float(), mask=mask, reduction="none",
                                      temperature=1.3, backend=backend)
    loss.sum().backward()
    ids, vals = _merge_loop(t_ids, t_lp, s_ids, s_lp)
    z64 = z.clone().requires_grad_()
    want = ref.sparse_distill_loss(z64, ids, vals, mode="topk_tail", divergence=div, temperature=1.3) * mask
    want.sum().backward()
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_union_equals_unfused(backend, small_blocks):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(9, 6, generator=g)
    w = torch.randn(23, 6, generator=g)
    t_lp_full = torch.log_softmax(torch.randn(9, 23, generator=g) * 2, -1)
    t_lp, t_ids = t_lp_full.topk(3, -1)
    s_ids, _ = fastkd.student_topk_from_hidden(h, w, 5, chunk_size=4)
    s_lp = t_lp_full.gather(-1, s_ids)
    kw = dict(mode="union", divergence="jsd", student_ids=s_ids, student_id_values=s_lp, backend=backend)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fastkd.fused_linear_sparse_distill_loss(h1, w1, t_ids, t_lp, chunk_size=4, **kw).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fastkd.sparse_distill_loss(h2 @ w2.T, t_ids, t_lp, **kw).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_every_mode_converges_to_dense_as_k_reaches_v(backend, div, small_blocks):
    """Student-proposed ids scored by the teacher: at k = V every mode is the dense loss; below V it is not."""
    n, v = 4, 19
    z, t = _logits(n, v, 7), _logits(n, v, 8, scale=1.5)
    dense = ref_dense.per_token(z, t, div, beta=0.5)
    lpt = torch.log_softmax(t, -1)
    t_lp, t_ids = lpt.topk(3, -1)
    for k in (v // 2, v):
        s_ids, _ = fastkd.student_topk(z, k)
        s_lp = lpt.gather(-1, s_ids)
        got = {
            "topk": fastkd.sparse_distill_loss(z.float(), s_ids, s_lp.float(), mode="topk", divergence=div,
                                               reduction="none", backend=backend),
            "topk_tail": fastkd.sparse_distill_loss(z.float(), s_ids, s_lp.float(), mode="topk_tail",
                                                    divergence=div, reduction="none", backend=backend),
            "union": fastkd.sparse_distill_loss(z.float(), t_ids, t_lp.float(), mode="union", divergence=div,
                                                student_ids=s_ids, student_id_values=s_lp.float(),
                                                reduction="none", backend=backend),
        }
        for mode, loss in got.items():
            err = (loss.double() - dense).abs().max().item()
            if k == v:
                assert err < 1e-5, (mode, err)
            else:
                assert err > 1e-4, (mode, err)  # the check above can fail: fewer ids are not the dense loss


def test_union_bad_inputs():
    z = torch.randn(2, 10)
    ids = torch.tensor([[1, 2], [3, 4]])
    lp = torch.full((2, 2), -3.0)
    with pytest.raises(ValueError, match="needs student_ids"):
        fastkd.sparse_distill_loss(z, ids, lp, mode="union")
    with pytest.raises(ValueError, match="only used by mode='union'"):
        fastkd.sparse_distill_loss(z, ids, lp, mode="topk_tail", student_ids=ids, student_id_values=lp)
    with pytest.raises(ValueError, match="values='logprobs' or 'probs'"):
        fastkd.sparse_distill_loss(z, ids, lp, mode="union", values="logits", student_ids=ids, student_id_values=lp)
    with pytest.raises(ValueError, match="teacher_tail"):
        fastkd.sparse_distill_loss(z, ids, lp, mode="union", student_ids=ids, student_id_values=lp,
                                   teacher_tail=torch.full((2,), -1.0))
    with pytest.raises(ValueError, match="teacher_ids must be in"):  # the merged row is still checked
        fastkd.sparse_distill_loss(z, ids, lp, mode="union", student_ids=ids + 8, student_id_values=lp)
    with pytest.raises(ValueError, match="same leading"):
        fastkd.union_ids(ids, lp, ids[:1], lp[:1])
    with pytest.raises(TypeError, match="integer tensor"):
        fastkd.union_ids(ids, lp, lp, lp)
    with pytest.raises(ValueError, match="k=11 exceeds"):
        fastkd.student_topk(z, 11)
    with pytest.raises(ValueError, match="positive int"):
        fastkd.student_topk_from_hidden(torch.randn(2, 3), torch.randn(10, 3), 0)
    with pytest.raises(ValueError, match="hidden size"):
        fastkd.student_topk_from_hidden(torch.randn(2, 4), torch.randn(10, 3), 2)


def test_served_teacher_example_runs():
    path = Path(__file__).resolve().parents[2] / "examples" / "served_teacher.py"
    spec = importlib.util.spec_from_file_location("served_teacher", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(steps=6, seed=0)
    assert all(math.isfinite(x) for x in out["losses"])
    assert out["losses"][-1] < out["losses"][0]  # the student moves towards the teacher
