"""fastkd.integrations.trl.chunked_divergence_loss / chunked_jsd_loss against TRL's own functions (called, not
copied): trl.trainer.distillation_trainer._chunked_divergence_loss (TRL >= 1.x DistillationTrainer) and the async
trainer's _chunked_jsd_loss; values, gradients, the (loss, entropy_sum, n_valid) / 5-tuple contracts, and
patch_distillation_trainer / patch_async_distillation_trainer / unpatch."""

from __future__ import annotations

import os

import pytest
import torch

from fastkd.integrations import trl as fkd_trl

dt = pytest.importorskip("trl.trainer.distillation_trainer", reason="trl (>= 1.x DistillationTrainer) not installed")
TRL_FN = dt._chunked_divergence_loss
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _heads(b=3, k=7, hs=12, ht=9, v=61, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = (torch.rand(b, k, generator=g) > 0.3).long()
    return dict(student_hidden_states=r(b, k, hs), teacher_hidden_states=r(b, k, ht),
                student_lm_head_weight=r(v, hs) * 0.5, teacher_lm_head_weight=r(v, ht) * 0.5, completion_mask=mask,
                student_lm_head_bias=r(v) * 0.3 if bias else None, teacher_lm_head_bias=r(v) * 0.3 if bias else None)


LEAVES = ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")


def _run(fn, prob, beta, **kw):
    leaves = {k: prob[k].detach().clone().requires_grad_() for k in LEAVES if prob[k] is not None}
    loss, ent, n = fn(**{**prob, **leaves}, beta=beta, **kw)[:3]
    grads = torch.autograd.grad(loss * 1.7, list(leaves.values()))
    return loss.detach(), ent, n, dict(zip(leaves, grads))


def _assert_same(ours, theirs, rtol=2e-5, atol=1e-6):
    (l1, e1, n1, g1), (l2, e2, n2, g2) = ours, theirs
    torch.testing.assert_close(l1, l2.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(e1, e2.float(), rtol=rtol, atol=atol)
    assert n1.dtype == n2.dtype and int(n1) == int(n2)
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("case", [
    dict(),
    dict(temperature=1.7),
    dict(num_items_in_batch=11, bias=True),
    dict(num_items_in_batch=torch.tensor(6.5), temperature=0.8),
    dict(student_logit_scale=1.3, teacher_logit_scale=0.6, bias=True),
    dict(student_final_logit_softcapping=2.5, teacher_final_logit_softcapping=4.0, temperature=1.4),
    dict(student_final_logit_softcapping=None, teacher_final_logit_softcapping=3.0, student_logit_scale=0.7),
])
def test_chunked_divergence_loss_equals_trl(beta, case):
    case = dict(case)
    prob = _heads(bias=case.pop("bias", False))
    ours = _run(fkd_trl.chunked_divergence_loss, prob, beta, **case)
    theirs = _run(TRL_FN, prob, beta, **case)
    _assert_same(ours, theirs)


def test_all_masked_and_signature():
    import inspect

    prob = _heads()
    prob["completion_mask"].zero_()
    loss, ent, n, g = _run(fkd_trl.chunked_divergence_loss, prob, 0.5)
    t_loss, t_ent, t_n, _ = _run(TRL_FN, prob, 0.5)
    assert loss.item() == t_loss.item() == 0.0 and ent.item() == 0.0 and int(n) == int(t_n) == 0
    assert all(torch.count_nonzero(x) == 0 for x in g.values())
    ours = list(inspect.signature(fkd_trl.chunked_divergence_loss).parameters.values())
    theirs = list(inspect.signature(TRL_FN).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == [(p.name, p.default) for p in theirs]


def test_other_divergence_and_stats():
    prob = _heads()
    loss, ent, n, stats = fkd_trl.chunked_divergence_loss(**prob, beta=0.5, divergence="tvd", return_stats=True)
    assert set(stats) >= {"teacher_entropy", "student_entropy", "top1_agree", "kl"}
    torch.testing.assert_close(ent, stats["student_entropy"].sum())
    # beta goes to "jsd" only; "ab" keeps its own alpha / beta from kw
    fkd_trl.chunked_divergence_loss(**prob, beta=0.0, divergence="ab", alpha=0.5)


def test_float64_reference():
    """Independent of TRL: the float64 formula (scale, softcap, temperature; masked mean; student entropy)."""
    prob = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in _heads(bias=True).items()}
    kw = dict(student_logit_scale=1.2, teacher_logit_scale=0.9, student_final_logit_softcapping=3.0,
              teacher_final_logit_softcapping=None, temperature=1.5)
    loss, ent, n = fkd_trl.chunked_divergence_loss(**prob, beta=0.3, **kw)
    zs = (prob["student_hidden_states"] @ prob["student_lm_head_weight"].T + prob["student_lm_head_bias"]) * 1.2
    zs = 3.0 * torch.tanh(zs / 3.0) / 1.5
    zt = (prob["teacher_hidden_states"] @ prob["teacher_lm_head_weight"].T + prob["teacher_lm_head_bias"]) * 0.9 / 1.5
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    lm = torch.logaddexp(lp + torch.log(torch.tensor(0.3, dtype=torch.float64)),
                         lq + torch.log(torch.tensor(0.7, dtype=torch.float64)))
    per = 0.3 * (lp.exp() * (lp - lm)).sum(-1) + 0.7 * (lq.exp() * (lq - lm)).sum(-1)
    keep = prob["completion_mask"] != 0
    torch.testing.assert_close(loss.double(), per[keep].sum() / keep.sum(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ent.double(), -(lq.exp() * lq).sum(-1)[keep].sum(), rtol=1e-6, atol=1e-6)


def test_patch_distillation_trainer_and_unpatch():
    cls = fkd_trl.patch_distillation_trainer(divergence="jsd", log_stats=True)
    try:
        assert cls is dt.DistillationTrainer
        assert dt._chunked_divergence_loss is not TRL_FN
        assert getattr(cls.compute_loss, "_fastkd_stats", False)
        prob = _heads()
        out = dt._chunked_divergence_loss(**prob, beta=0.5)
        assert len(out) == 3
        torch.testing.assert_close(out[0], TRL_FN(**prob, beta=0.5)[0], rtol=2e-5, atol=1e-6)
        assert len(fkd_trl._PENDING) == 1
    finally:
        fkd_trl.unpatch()
    assert dt._chunked_divergence_loss is TRL_FN
    assert not getattr(dt.DistillationTrainer.compute_loss, "_fastkd_stats", False)


# ---- async trainer (top-k teacher log-probs) -------------------------------------------------------------------

def _async():
    return pytest.importorskip("trl.experimental.async_distillation.async_distillation_trainer",
                               reason="trl's async distillation trainer not installed")


def _sparse_problem(n=23, h=10, v=47, k=5, seed=0, teachers=False):
    g = torch.Generator().manual_seed(seed)
    hid, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.6
    t_lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    vals, ids = t_lp.topk(k, dim=-1)
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[::3, -1] = False
    mask[1::4, 1] = False
    idx = torch.randint(0, 2, (n,), generator=g) if teachers else None
    return hid, w, ids, vals, mask, idx


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("opts", [dict(), dict(scale=1.3, cap=3.0, temperature=1.6, teachers=True)])
def test_chunked_jsd_loss_equals_trl_async(tail, beta, opts):
    mod = _async()
    hid, w, ids, vals, mask, idx = _sparse_problem(teachers=opts.get("teachers", False))
    args = lambda h_, w_: (h_, w_, None, opts.get("scale", 1.0), opts.get("cap"), ids, vals, mask, beta,  # noqa: E731
                           opts.get("temperature", 1.0), tail, idx, 2, 8)
    outs = []
    for fn in (fkd_trl.chunked_jsd_loss, mod._chunked_jsd_loss):
        h_, w_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(*args(h_, w_))
        outs.append((out, torch.autograd.grad(out[0], (h_, w_))))
    (ours, g1), (theirs, g2) = outs
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=2e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_patch_async_distillation_trainer():
    mod = _async()
    original = mod._chunked_jsd_loss
    fkd_trl.patch_async_distillation_trainer(divergence="fkl")
    try:
        hid, w, ids, vals, mask, _ = _sparse_problem()
        out = mod._chunked_jsd_loss(hid, w, None, 1.0, None, ids, vals, mask, 0.0, 1.0, True, None, 1, 8)
        assert len(out) == 5 and torch.isfinite(out[0])
    finally:
        fkd_trl.unpatch()
    assert mod._chunked_jsd_loss is original


def test_dtensor_head_single_rank(tmp_path):
    """An FSDP2-style DTensor head (Shard(0) on a 1-rank gloo mesh) gives the plain head's values and gradients."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        prob = _heads(bias=True)
        plain = _run(fkd_trl.chunked_divergence_loss, prob, 0.5, temperature=1.3)
        w = distribute_tensor(prob["student_lm_head_weight"].clone(), mesh, [Shard(0)]).requires_grad_()
        tw = distribute_tensor(prob["teacher_lm_head_weight"].clone(), mesh, [Shard(0)])
        loss, ent, n = fkd_trl.chunked_divergence_loss(**{**prob, "student_lm_head_weight": w,
                                                          "teacher_lm_head_weight": tw}, beta=0.5, temperature=1.3)
        (loss * 1.7).backward()
        assert isinstance(w.grad, DTensor)
        torch.testing.assert_close(loss.detach(), plain[0])
        torch.testing.assert_close(ent, plain[1])
        torch.testing.assert_close(w.grad.full_tensor(), plain[3]["student_lm_head_weight"])
    finally:
        dist.destroy_process_group()
