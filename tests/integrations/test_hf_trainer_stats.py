"""DistillationTrainer logs the masked means of the loss statistics (issue 16) through Trainer.log, equal to
the float64 reference stats of the full logits; the loss is unchanged by log_stats."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_trainer import ListDataset, args, batch, tiny  # noqa: E402

import fastkd.reference as R  # noqa: E402
from fastkd.core.stats import STATS_KEYS  # noqa: E402
from fastkd.integrations.hf import DistillationTrainer  # noqa: E402


def _reference_means(student, teacher, inputs, temperature):
    ls = student(input_ids=inputs["input_ids"]).logits[:, :-1].double().detach()
    with torch.no_grad():
        lt = teacher(input_ids=inputs["input_ids"]).logits[:, :-1].double()
    labels = inputs["labels"][:, 1:]
    st = R.distill_stats(ls, lt, temperature=temperature, labels=labels)
    keep = (labels != -100).reshape(-1)
    return {k: (v.reshape(-1).sum() / keep.sum()).item() for k, v in st.items()}


def test_logged_means_match_reference_and_loss_is_unchanged():
    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1)
    inputs = batch()
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(), divergence="jsd", temperature=1.5)
    plain = DistillationTrainer(model=student, teacher_model=teacher, args=args(), divergence="jsd",
                                temperature=1.5, log_stats=False)
    loss = tr.compute_loss(student, inputs)
    assert torch.equal(loss, plain.compute_loss(student, inputs))
    assert plain._stats_sums == {}
    tr.compute_loss(student, inputs)  # two micro-batches: the mean over both (the same batch twice)
    tr.log({"loss": loss.item()})
    logged = tr.state.log_history[-1]
    ref = _reference_means(student, teacher, inputs, 1.5)
    for k in STATS_KEYS:
        assert logged[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    assert tr._stats_sums == {}  # cleared by log()
    tr.log({"loss": 0.0})  # nothing recorded since: no stale stats
    assert "kl" not in tr.state.log_history[-1]


def test_training_and_eval_logs_carry_the_stats():
    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1)
    data = ListDataset(6)
    tr = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data, eval_dataset=data,
                             args=args(max_steps=2, learning_rate=1e-2, logging_steps=1), divergence="fkl")
    tr.train()
    train_logs = [h for h in tr.state.log_history if "loss" in h and "kl" in h]
    assert len(train_logs) == 2
    assert all(0.0 <= h["top1_agree"] <= 1.0 and h["teacher_entropy"] > 0 and h["kl"] >= 0 for h in train_logs)
    tr.evaluate()
    last = tr.state.log_history[-1]
    assert "eval_loss" in last and all(f"eval_{k}" in last for k in STATS_KEYS) and "kl" not in last


def test_selection_logs_means_over_the_selected_tokens():
    """loss_kwargs select='teacher_entropy_top' (the fused pre-pass path: stats exist only on the selected
    tokens): the logged means are over the selected tokens, equal to the float64 reference."""
    import math

    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1)
    inputs = batch()
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(), divergence="fkl",
                             loss_kwargs={"select": "teacher_entropy_top", "fraction": 0.5})
    tr.compute_loss(student, inputs)
    tr.log({"loss": 0.0})
    logged = tr.state.log_history[-1]
    ls = student(input_ids=inputs["input_ids"]).logits[:, :-1].double().detach()
    with torch.no_grad():
        lt = teacher(input_ids=inputs["input_ids"]).logits[:, :-1].double()
    labels = inputs["labels"][:, 1:]
    st = {k: v.reshape(-1) for k, v in R.distill_stats(ls, lt, labels=labels).items()}
    keep = (labels != -100).reshape(-1)
    k = math.ceil(0.5 * int(keep.sum()))
    ent = torch.where(keep, st["teacher_entropy"], -math.inf)
    sel = torch.zeros_like(keep)
    sel[torch.argsort(ent, descending=True, stable=True)[:k]] = True
    for name in STATS_KEYS:
        assert logged[name] == pytest.approx((st[name][sel].sum() / k).item(), rel=1e-4, abs=1e-6), name
