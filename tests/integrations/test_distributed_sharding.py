"""fastkd.core.sharding in one process (no process group): flat-shard messages, the module form, keep_in_graph.

The 2-rank engine tests are tests/integrations/test_distributed_engines.py; these are the fast-tier checks."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.core import sharding as S


def _heads(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(5, 7, 8, generator=g, dtype=torch.float64)
    return h, torch.randn(37, 8, generator=g, dtype=torch.float64), torch.randn(5, 7, 8, generator=g,
                                                                               dtype=torch.float64)


@pytest.mark.parametrize("weight", [torch.empty(0), torch.randn(37 * 8)])
def test_flat_student_shard_names_the_fix(weight):
    h, _, ht = _heads()
    with pytest.raises(ValueError, match="student_weight.*flat shard.*through.*summon_full_params"):
        fastkd.fused_linear_distill_loss(h.float(), weight, ht.float(), torch.randn(37, 8))


def test_zero3_partition_names_the_fix():
    h, w, ht = _heads()
    part = torch.empty(0, dtype=torch.float64)
    part.ds_status, part.ds_shape = type("S", (), {"name": "NOT_AVAILABLE"})(), (37, 8)
    with pytest.raises(ValueError, match="teacher_weight.*ZeRO-3.*GatheredParameters"):
        fastkd.fused_linear_distill_loss(h, w, ht, part)
    with pytest.raises(ValueError, match="student_weight.*ZeRO-3"):
        fastkd.fused_linear_sparse_distill_loss(h, part, torch.zeros(5, 7, 2, dtype=torch.long),
                                                torch.full((5, 7, 2), -1.0, dtype=torch.float64))


def test_plain_inputs_pass_through_unchanged():
    h, w, ht = _heads()
    heads = S.resolve_heads(h, w, teacher_hidden=ht, teacher_weight=w)
    assert heads.student_weight is w and heads.teacher_hidden is ht and heads.vocab_shard is None
    s, t, shard = S.resolve_logits(h, ht)
    assert s is h and t is ht and shard is None
    assert S.engine_of(torch.nn.Linear(2, 3)) is None


def test_module_form_equals_the_direct_call_and_restores_forward():
    """``through(head, ...)`` runs the loss as the head's forward (its hooks fire) and equals the direct
    call in loss and every gradient; the head's own forward is back afterwards, also after an error."""
    h, w, ht = _heads()
    wt = torch.randn(37, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    head = torch.nn.Linear(8, 37, dtype=torch.float64)
    kw = dict(labels=torch.randint(0, 37, (5, 7), generator=torch.Generator().manual_seed(2)), temperature=2.0,
              ce_weight=0.1, num_items_in_batch=21)
    calls = []
    head.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    h1 = h.clone().requires_grad_()
    loss = fastkd.nn.FusedLinearDistillLoss("fkl").through(head, h1, ht, wt, **kw)
    loss.backward()
    assert calls == ["pre"]
    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in (h, head.weight, head.bias))
    ref = fastkd.fused_linear_distill_loss(h2, w2, ht, wt, student_bias=b2, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for got, want in ((h1.grad, h2.grad), (head.weight.grad, w2.grad), (head.bias.grad, b2.grad)):
        torch.testing.assert_close(got, want)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(head(x), x @ head.weight.T + head.bias)
    with pytest.raises(ZeroDivisionError):
        S.call_as_forward(head, lambda _: 1 / 0, x)
    assert "forward" not in head.__dict__
    torch.testing.assert_close(head(x), x @ head.weight.T + head.bias)


def test_keep_in_graph_runs_the_output_hooks():
    """The model output tied to x gets a zero gradient in backward (its hooks run); x's gradient is unchanged."""
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    out = {"logits": (x[:, :0].sum(-1, keepdim=True) * 0 + x[:, :1]) @ w[:, :1].T}  # a stand-in model output
    fired = []
    out["logits"].register_hook(lambda g: fired.append(torch.count_nonzero(g).item()))
    y = S.keep_in_graph(x, out)
    (y * 2).sum().backward()
    assert fired == [0]
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    with torch.no_grad():
        assert S.keep_in_graph(x, out) is x


def test_shard_teacher_leaves_unsharded_pairs_alone():
    """No sharded student (plain, or a teacher that is already sharded): the teacher comes back as it was; the
    2-rank FSDP2 / FSDP1 / ZeRO-3 cases are tests/integrations/test_distributed_teacher.py."""
    teacher, student = torch.nn.Linear(8, 37), torch.nn.Linear(8, 37)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert S.shard_teacher(teacher, like=student) is teacher
    assert S.shard_teacher(teacher, like=student, shard=False) is teacher
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]) and type(v) is torch.Tensor
    zero3 = torch.nn.Linear(8, 37)
    for p in (*zero3.parameters(), *student.parameters()):
        p.ds_id = 0  # what ZeRO-3 leaves on its parameters: the teacher counts as already sharded
    assert S.engine_of(zero3) == "zero3" and S.shard_teacher(zero3, like=student) is zero3
