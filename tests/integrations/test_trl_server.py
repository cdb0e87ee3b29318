"""fastkd.integrations.trl's server-teacher path against TRL's own ServerDistillationTrainer methods (called on a
trainer object, not copied): _compute_server_sparse_top_1_divergence_loss (beta > 0), _compute_server_forward_kl_loss
(beta = 0) and _compute_sparse_top_1_divergence_loss (num_items_in_batch), fed the student's full (B, T, V)
log-probs, vs fastkd's server_loss / server_top1_loss / server_topk_loss fed hidden states and the LM head; loss and
gradients in float64 and float32. The real trainer, patched vs unpatched: tests/integrations/test_trl_trainer_e2e.py."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sd = pytest.importorskip("trl.experimental.server_distillation.server_distillation_trainer",
                         reason="trl (>= 1.x ServerDistillationTrainer) not installed")

from fastkd.integrations import trl as fkd_trl  # noqa: E402

Trainer = sd.ServerDistillationTrainer


def _trl_self(beta, add_tail, reverse_mode="sampled"):
    """A ServerDistillationTrainer carrying only what its loss methods read (no model, no server)."""
    obj = Trainer.__new__(Trainer)
    obj.beta, obj.loss_add_tail, obj.reverse_kl_top_1_mode = beta, add_tail, reverse_mode
    return obj


def _problem(beta, k=1, b=3, t=6, h=10, v=29, seed=0, dtype=torch.float64, bias=True, temperature=1.0):
    """Student head (hidden, weight, bias), a random teacher's top-k at temperature as a server returns it (−inf
    outside the completion), completion tokens (some equal to the teacher's top-1) and labels (−100 = out)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    hidden, weight = r(b, t, h), r(v, h) * 0.6
    bias_t = r(v) * 0.3 if bias else None
    t_lp = torch.log_softmax(r(b, t, v) * 1.5 / temperature, dim=-1)
    top_lp, top_ids = t_lp.topk(k, dim=-1)
    tokens = torch.randint(0, v, (b, t), generator=g)
    same = torch.rand(b, t, generator=g) < 0.3
    tokens = torch.where(same, top_ids[..., 0], tokens)  # the reverse token equals the top-1 (a 1-slot support)
    labels = tokens.masked_fill(torch.rand(b, t, generator=g) < 0.25, -100)
    labels[0, :2] = -100
    out = labels == -100
    result = {"actual_logprobs": t_lp.gather(-1, tokens[..., None])[..., 0].masked_fill(out, -math.inf).float(),
              "topk_logprobs": top_lp.masked_fill(out[..., None], -math.inf).float(),
              "topk_token_ids": top_ids.masked_fill(out[..., None], 0)}
    if dtype == torch.float64:
        result = {k: (x.double() if x.is_floating_point() else x) for k, x in result.items()}
    return dict(hidden=hidden, weight=weight, bias=bias_t, result=result, tokens=tokens, labels=labels)


def _student_logprobs(hidden, weight, bias, scale, softcap, temperature):
    z = hidden @ weight.T + (0 if bias is None else bias)
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z / temperature, dim=-1)


def _leaves(p):
    return {k: p[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias") if p[k] is not None}


def _trl_loss(p, beta, add_tail, temperature, scale, softcap, reverse_mode="sampled"):
    leaves = _leaves(p)
    lp = _student_logprobs(leaves["hidden"], leaves["weight"], leaves.get("bias"), scale, softcap, temperature)
    obj = _trl_self(beta, add_tail, reverse_mode)
    if beta > 0:
        loss = obj._compute_server_sparse_top_1_divergence_loss(p["result"], lp, p["tokens"], p["labels"])
    else:
        loss = obj._compute_server_forward_kl_loss(p["result"], lp, p["labels"])
    return loss, leaves


def _ours_loss(p, beta, add_tail, temperature, scale, softcap, reverse_mode="sampled", **kw):
    leaves = _leaves(p)
    loss = fkd_trl.server_loss(leaves["hidden"], leaves["weight"], leaves.get("bias"), p["result"], p["tokens"],
                               p["labels"], beta=beta, temperature=temperature, add_tail_bucket=add_tail,
                               reverse_kl_top_1_mode=reverse_mode, logit_scale=scale, final_logit_softcapping=softcap,
                               **kw)
    return loss, leaves


def _assert_equal(ours, theirs, rtol, atol):
    (l1, v1), (l2, v2) = ours, theirs
    torch.testing.assert_close(l1.detach().to(l2.dtype), l2.detach(), rtol=rtol, atol=atol)
    g1 = torch.autograd.grad(l1 * 1.3, list(v1.values()))
    g2 = torch.autograd.grad(l2 * 1.3, list(v2.values()))
    for name, a, b in zip(v1, g1, g2, strict=True):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol * 10, atol=atol * 10, msg=name)


CASES = [dict(temperature=1.0, scale=1.0, softcap=None, bias=False),
         dict(temperature=1.7, scale=1.0, softcap=4.0, bias=True),
         dict(temperature=0.8, scale=1.3, softcap=3.0, bias=True)]


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_server_loss_equals_trl(beta, add_tail, case):
    c = CASES[case]
    k = 3 if beta == 0 else 1  # TRL: top-k for pure forward KL, top-1 for beta > 0
    for dtype, rtol, atol in ((torch.float64, 1e-9, 1e-11), (torch.float32, 2e-5, 1e-6)):
        p = _problem(beta, k=k, dtype=dtype, bias=c["bias"], seed=case, temperature=c["temperature"])
        args = (p, beta, add_tail, c["temperature"], c["scale"], c["softcap"])
        theirs, ours = _trl_loss(*args), _ours_loss(*args)
        if beta == 1.0 and not add_tail:  # a one-id support renormalised is one certain outcome on both sides
            assert theirs[0].item() == 0.0
        else:
            assert theirs[0].item() > 1e-4  # a comparison that can fail
        _assert_equal(ours, theirs, rtol, atol)


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_argmax_reverse_token(beta, add_tail):
    """TRL's reverse_kl_top_1_mode='argmax': the student's own top-1 (from the fused head) as the reverse token."""
    p = _problem(beta, seed=5)
    args = (p, beta, add_tail, 1.2, 1.0, None, "argmax")
    _assert_equal(_ours_loss(*args), _trl_loss(*args), 1e-9, 1e-11)
    sampled = _ours_loss(p, beta, add_tail, 1.2, 1.0, None)[0]
    if add_tail:
        assert abs(sampled.item() - _ours_loss(*args)[0].item()) > 1e-6


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("beta", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("num_items", [7, torch.tensor(11.5)])
def test_num_items_in_batch(beta, add_tail, num_items):
    p = _problem(beta, k=1, seed=3)
    labels, res = p["labels"], p["result"]
    kept = labels != -100
    t1_ids, t1_lp = res["topk_token_ids"][..., 0], res["topk_logprobs"][..., 0].masked_fill(~kept, 0.0)
    actual = res["actual_logprobs"].masked_fill(~kept, 0.0)
    leaves = _leaves(p)
    lp = _student_logprobs(leaves["hidden"], leaves["weight"], leaves["bias"], 1.0, None, 1.4)
    obj = _trl_self(beta, add_tail)
    if beta > 0:
        theirs = obj._compute_sparse_top_1_divergence_loss(lp, t1_ids, t1_lp, p["tokens"], actual, labels,
                                                           num_items_in_batch=num_items)
    else:  # TRL's forward-KL path has no num_items_in_batch: its batch mean × kept tokens / num_items
        theirs = obj._compute_server_forward_kl_loss(res, lp, labels) * kept.sum() / num_items
    mine = _leaves(p)
    if beta > 0:
        ours = fkd_trl.server_top1_loss(mine["hidden"], mine["weight"], mine["bias"], t1_ids, t1_lp, p["tokens"],
                                        actual, labels, beta, temperature=1.4, add_tail_bucket=add_tail,
                                        num_items_in_batch=num_items)
    else:
        ours = fkd_trl.server_topk_loss(mine["hidden"], mine["weight"], mine["bias"], res["topk_token_ids"],
                                        res["topk_logprobs"], labels, temperature=1.4, add_tail_bucket=add_tail,
                                        num_items_in_batch=num_items)
    _assert_equal((ours, mine), (theirs, leaves), 1e-9, 1e-11)


def test_all_masked_and_missing_teacher_values():
    for beta in (0.5, 0.0):
        q = _problem(beta, k=1 if beta else 3)
        q["labels"].fill_(-100)
        for key in ("actual_logprobs", "topk_logprobs"):
            q["result"][key].fill_(-math.inf)
        theirs, ours = _trl_loss(q, beta, True, 1.0, 1.0, None), _ours_loss(q, beta, True, 1.0, 1.0, None)
        assert theirs[0].item() == 0.0 and ours[0].item() == 0.0
        g = torch.autograd.grad(ours[0], list(ours[1].values()))
        assert all(torch.isfinite(x).all() and torch.count_nonzero(x) == 0 for x in g)
    # a kept token without the teacher's log-prob: TRL and fastkd both refuse it
    for key, beta in (("actual_logprobs", 1.0), ("topk_logprobs", 0.5)):
        q = _problem(beta)
        kept = (q["labels"] != -100).nonzero()[0]
        q["result"][key][tuple(kept)] = -math.inf
        with pytest.raises(ValueError, match="missing"):
            _trl_loss(q, beta, True, 1.0, 1.0, None)
        with pytest.raises(ValueError, match="no log-prob of its"):
            _ours_loss(q, beta, True, 1.0, 1.0, None)
    q = _problem(0.5, k=2)
    with pytest.raises(ValueError, match="top-1"):
        _ours_loss(q, 0.5, True, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="logit_scale"):
        _ours_loss(_problem(0.5), 0.5, True, 1.0, -1.0, None)
    with pytest.raises(ValueError, match="reverse_kl_top_1_mode"):
        _ours_loss(_problem(0.5), 0.5, True, 1.0, 1.0, None, reverse_mode="greedy")


@pytest.mark.parametrize("divergence,mode", [("fkl", "topk_tail"), ("jsd", "topk"), ("rkl", "topk_tail")])
def test_fastkd_divergence_and_mode(divergence, mode):
    """divergence= / mode=: fastkd's own sparse loss on the server's support, against the float64 reference."""
    import fastkd.sparse.reference as SR

    p = _problem(0.0, k=3, seed=7)
    leaves = _leaves(p)
    ours = _ours_loss(p, 0.0, True, 1.3, 1.0, None, divergence=divergence, mode=mode)[0]
    valid = p["result"]["topk_logprobs"] > -math.inf
    ids = torch.where(valid, p["result"]["topk_token_ids"], -1)
    vals = torch.where(valid, p["result"]["topk_logprobs"], 0.0)
    logits = leaves["hidden"] @ leaves["weight"].T + leaves["bias"]
    per_tok = SR.sparse_distill_loss(logits, ids, vals, mode=mode, divergence=divergence, temperature=1.3, beta=0.0)
    kept = p["labels"] != -100
    ref = per_tok[kept].sum() / kept.sum()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-9, atol=1e-11)
    trl_default = _ours_loss(p, 0.0, True, 1.3, 1.0, None)[0]
    assert divergence == "fkl" or abs(trl_default.item() - ours.item()) > 1e-6


def test_patch_and_unpatch_restore_trl():
    original = Trainer.compute_loss
    cls = fkd_trl.patch_server_distillation_trainer(log_stats=True)
    try:
        assert cls is Trainer and Trainer.compute_loss is not original
        assert Trainer.compute_loss._fastkd_stats
        fkd_trl.patch_server_distillation_trainer()  # patching again replaces, never stacks
        assert Trainer.compute_loss._fastkd_original is original
    finally:
        fkd_trl.unpatch()
    assert Trainer.compute_loss is original


@pytest.mark.parametrize(("beta", "add_tail", "reverse_mode"), [(0.0, False, "sampled"), (0.0, True, "sampled"),
                                                                (0.5, True, "argmax")])
def test_dtensor_head_single_rank(tmp_path, beta, add_tail, reverse_mode):
    """An FSDP2-style DTensor head (Shard(0) on a 1-rank gloo mesh) goes through fastkd.core.sharding like the fused
    entry points: the plain head's loss, and a DTensor gradient equal to the plain head's."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch without distributed, or a process group already initialized")
    p = _problem(beta, k=1 if beta > 0 else 3)
    plain, leaves = _ours_loss(p, beta, add_tail, 1.3, 1.0, None, reverse_mode)
    (g_plain,) = torch.autograd.grad(plain * 1.7, [leaves["weight"]])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(p["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
        loss = fkd_trl.server_loss(p["hidden"], w, p["bias"], p["result"], p["tokens"], p["labels"], beta=beta,
                                   temperature=1.3, add_tail_bucket=add_tail, reverse_kl_top_1_mode=reverse_mode)
        (loss * 1.7).backward()
        assert isinstance(w.grad, DTensor)
        torch.testing.assert_close(loss.detach(), plain.detach())
        torch.testing.assert_close(w.grad.full_tensor(), g_plain)
    finally:
        dist.destroy_process_group()
