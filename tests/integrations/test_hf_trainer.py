"""DistillationTrainer (fused LM-head distillation inside transformers.Trainer) vs an unfused reference:
full student/teacher logits from the HF models + fastkd.distill.reference_loss in float64."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import fastkd.reference as R  # noqa: E402
from fastkd.integrations.hf import DistillationTrainer, hidden_states  # noqa: E402

V = 101


def tiny(hidden: int, layers: int, seed: int, dtype: torch.dtype = torch.float32, **cfg) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False, **cfg)
    return LlamaForCausalLM(config).to(dtype)


def batch(b: int = 3, t: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[-1, -2:] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def args(**kw) -> TrainingArguments:
    base = dict(output_dir="/tmp/fastkd_hf_test", report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=3, per_device_eval_batch_size=3, logging_steps=1,
                disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def reference_loss(student, teacher, inputs, num_items=None, softcap=None, scale=None, **kw):
    """Unfused: full logits from the HF forward, float64 reference loss on the shifted tokens."""
    ls = student(input_ids=inputs["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        lt = teacher(input_ids=inputs["input_ids"]).logits[:, :-1].double()
    ls = ls.double()
    if scale is not None:
        ls, lt = ls * scale, lt * scale
    ls, lt = R.apply_softcap(ls, softcap), R.apply_softcap(lt, softcap)
    return R.distill_loss(ls, lt, labels=inputs["labels"][:, 1:], num_items_in_batch=num_items, **kw)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("divergence,kw", [("fkl", {}), ("jsd", dict(beta=0.3, temperature=2.0)),
                                          ("rkl", dict(ce_weight=0.5)), ("tvd", dict(scale_by_t2=True)),
                                          ("ab", {})])  # ab: the trainer leaves alpha/beta to the table
def test_loss_and_grads_match_unfused(divergence, kw):
    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1)
    inputs = batch()
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(), divergence=divergence, **kw)
    loss = tr.compute_loss(student, inputs)
    loss.backward()
    g = grads_of(student)
    student.zero_grad()
    ref = reference_loss(student, teacher, inputs, divergence=divergence, **kw)
    ref.backward()
    g_ref = grads_of(student)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and "lm_head.weight" in g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=2e-3, atol=2e-6, msg=name)


def test_num_items_in_batch_and_hidden_states():
    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1)
    inputs = batch()
    h = hidden_states(student, inputs)
    torch.testing.assert_close(student.lm_head(h), student(input_ids=inputs["input_ids"]).logits)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args())
    loss = tr.compute_loss(student, inputs, num_items_in_batch=torch.tensor(7))
    ref = reference_loss(student, teacher, inputs, num_items=7)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("t_cfg,t_scale,t_cap", [
    (dict(final_logit_softcapping=3.0), 1.0, 3.0),  # the same softcap, the student alone scaled
    (dict(final_logit_softcapping=5.0, logit_scale=1.3), 1.3, 5.0),  # each side its own scale and softcap
    (dict(), 1.0, None),  # an uncapped teacher
    (dict(logits_scaling=4.0), 0.25, None),  # Granite-style: logits divided by logits_scaling
])
def test_softcap_and_logit_scale_per_model(t_cfg, t_scale, t_cap):
    student = tiny(16, 1, 0, final_logit_softcapping=3.0, logit_scale=0.7)
    teacher = tiny(24, 2, 1, **t_cfg)
    inputs = batch()
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(), divergence="rkl")
    loss = tr.compute_loss(student, inputs)
    loss.backward()
    g = grads_of(student)
    student.zero_grad()
    # Llama ignores these fields in its own forward, so the float64 reference applies each model's own to its
    # logits: scale, then softcap
    ls = student(input_ids=inputs["input_ids"]).logits[:, :-1].double() * 0.7
    with torch.no_grad():
        lt = teacher(input_ids=inputs["input_ids"]).logits[:, :-1].double() * t_scale
    ref = R.distill_loss(R.apply_softcap(ls, 3.0), R.apply_softcap(lt, t_cap), "rkl", labels=inputs["labels"][:, 1:])
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    g_ref = grads_of(student)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=2e-3, atol=2e-6, msg=name)
    # a check that can fail: the teacher's own post-processing matters
    wrong = R.distill_loss(R.apply_softcap(ls, 3.0), R.apply_softcap(lt / t_scale * 0.7, 3.0), "rkl",
                           labels=inputs["labels"][:, 1:])
    assert (wrong.detach() - ref.detach()).abs() > 1e-4


def test_teacher_in_another_dtype():
    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1, dtype=torch.float64)
    inputs = batch()
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(), divergence="fkl")
    loss = tr.compute_loss(student, inputs)
    ref = reference_loss(student, teacher, inputs)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    assert teacher.lm_head.weight.dtype == torch.float64  # the teacher itself is untouched


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, t: int = 9):
        self.rows = [{k: v[0] for k, v in batch(1, t, seed=i + 10).items()} for i in range(n)]
        for i, row in enumerate(self.rows):  # uneven numbers of target tokens per example
            row["labels"][: i % 5] = -100

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def test_training_lowers_loss_and_eval():
    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1)
    data = ListDataset(6)
    tr = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data, eval_dataset=data,
                             args=args(max_steps=12, learning_rate=3e-2, lr_scheduler_type="constant",
                                       warmup_steps=0), divergence="jsd", ce_weight=0.1)
    before = tr.evaluate()["eval_loss"]
    tr.train()
    after = tr.evaluate()["eval_loss"]
    assert after < 0.8 * before, (before, after)
    # eval_loss is the mean over eval batches of the per-batch loss, computed the same way as training
    loader = tr.get_eval_dataloader()
    losses = [tr.compute_loss(student, {k: v for k, v in b.items()}).item() for b in loader]
    assert abs(after - sum(losses) / len(losses)) < 1e-4


def test_gradient_accumulation_equivalence():
    teacher = tiny(24, 2, 1)
    data = ListDataset(4)
    params = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        student = tiny(16, 1, 0)
        tr = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                 args=args(max_steps=1, per_device_train_batch_size=bs,
                                           gradient_accumulation_steps=ga, optim="sgd", learning_rate=0.5,
                                           lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0),
                                 divergence="fkl", ce_weight=0.3)
        tr.train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    start = torch.cat([p.detach().flatten() for p in tiny(16, 1, 0).parameters()])
    assert (params[0] - start).abs().max() > 1e-3  # it moved
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(params[2], params[0], rtol=1e-4, atol=1e-6)


def test_bad_construction():
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=tiny(16, 1, 0), args=args())
    student = tiny(16, 1, 0)
    tr = DistillationTrainer(model=student, teacher_model=copy.deepcopy(student), args=args(),
                             divergence="nope")
    with pytest.raises(ValueError, match="divergence"):
        tr.compute_loss(student, batch())


@pytest.mark.parametrize("values", ["logprobs", "counts"])
def test_offline_teacher_cache(tmp_path, values):
    """Offline: the trainer reads a TeacherCache built from the teacher's hidden states; its loss equals the
    float64 sparse reference on the student's full logits and a few steps lower it."""
    cache_mod = pytest.importorskip("fastkd.cache")
    import fastkd.sparse.reference as RS

    student, teacher = tiny(16, 1, 0), tiny(24, 2, 1)
    rows = [batch(1, 9, seed=20 + i)["input_ids"][0][: 6 + i % 4] for i in range(6)]  # ragged lengths
    g = torch.Generator().manual_seed(5)
    with cache_mod.TeacherCache.create(tmp_path / "c", vocab_size=V, k=8, values=values,
                                       value_dtype="float32" if values == "logprobs" else None) as w:
        for ids in rows:
            with torch.no_grad():
                h = hidden_states(teacher, {"input_ids": ids[None]})[0]
            w.add_from_hidden(h, teacher.lm_head.weight.detach(), input_ids=ids, generator=g)
    tr = DistillationTrainer(model=student, teacher_cache=tmp_path / "c", divergence="fkl",
                             args=args(max_steps=10, learning_rate=3e-2, lr_scheduler_type="constant",
                                       warmup_steps=0, per_device_train_batch_size=3))
    mode = tr.sparse_options["mode"]
    assert mode == ("topk_tail" if values == "logprobs" else "sampled")
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    loss = tr.compute_loss(student, inputs)
    ls = student(input_ids=inputs["input_ids"]).logits[:, :-1].double()
    per_tok = RS.sparse_distill_loss(ls, inputs["teacher_ids"][:, :-1],
                                     inputs["teacher_values"][:, :-1].double(), values=values, mode=mode)
    keep = inputs["labels"][:, 1:] != -100
    ref = torch.where(keep, per_tok, 0.0).sum() / keep.sum()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    before = loss.item()
    tr.train()
    assert tr.compute_loss(student, inputs).item() < before
    with pytest.raises(ValueError, match="ce_weight"):
        DistillationTrainer(model=student, teacher_cache=tmp_path / "c", ce_weight=0.5, args=args())
