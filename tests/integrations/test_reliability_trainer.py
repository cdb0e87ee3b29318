"""Bad input to ``fastkd.integrations.hf.DistillationTrainer`` and the ``fastkd.nn`` modules (Triton backend in the
interpreter): each a clear exception naming the argument, before any silent result."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, TrainingArguments  # noqa: E402

import fastkd.nn as FN  # noqa: E402
from fastkd.distill import triton_impl as TD  # noqa: E402
from fastkd.integrations.hf import DistillationTrainer  # noqa: E402

needs_triton = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")


def _config(vocab: int, seed: int = 0) -> LlamaConfig:
    torch.manual_seed(seed)
    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=False)


def _lm(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    return LlamaForCausalLM(_config(vocab, seed))


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                             per_device_train_batch_size=2, disable_tqdm=True, dataloader_num_workers=0)


def _batch(vocab: int = 37, b: int = 2, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


TRITON = {"backend": "triton"}


@needs_triton
def test_trainer_teacher_of_another_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="teacher_model.*vocabulary.*vocab_size"):
        DistillationTrainer(model=_lm(37), teacher_model=_lm(41, seed=1), args=_args(tmp_path),
                            loss_kwargs=TRITON)


@needs_triton
def test_trainer_teacher_of_padded_vocabulary_with_vocab_size(tmp_path):
    """Padding columns only: vocab_size= makes it legal (DESIGN.md), the loss runs."""
    tr = DistillationTrainer(model=_lm(37), teacher_model=_lm(41, seed=1), args=_args(tmp_path),
                             loss_kwargs={**TRITON, "vocab_size": 37})
    loss = tr.compute_loss(tr.model, _batch())
    assert torch.isfinite(loss)


@needs_triton
def test_trainer_teacher_without_lm_head(tmp_path):
    with pytest.raises(TypeError, match="teacher_model"):
        DistillationTrainer(model=_lm(37), teacher_model=LlamaModel(_config(37)), args=_args(tmp_path),
                            loss_kwargs=TRITON)


@needs_triton
def test_trainer_student_without_lm_head(tmp_path):
    with pytest.raises(TypeError, match="model"):
        DistillationTrainer(model=LlamaModel(_config(37)), teacher_model=_lm(37), args=_args(tmp_path),
                            loss_kwargs=TRITON)


@needs_triton
def test_trainer_teacher_cache_of_another_vocabulary(tmp_path):
    from fastkd.cache import TeacherCacheWriter

    path = tmp_path / "cache"
    w = TeacherCacheWriter(str(path), k=4, vocab_size=50, values="logprobs")
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        logp = torch.log_softmax(torch.randn(7, 50, generator=g), -1)
        top = logp.topk(4, dim=-1)
        w.add(top.indices, top.values, input_ids=torch.randint(0, 37, (7,), generator=g))
    w.close()
    with pytest.raises(ValueError, match="teacher_cache.*vocabulary"):
        DistillationTrainer(model=_lm(37), teacher_cache=str(path), args=_args(tmp_path), loss_kwargs=TRITON)


@needs_triton
def test_trainer_labels_of_the_wrong_shape(tmp_path):
    tr = DistillationTrainer(model=_lm(37), teacher_model=_lm(37, seed=1), args=_args(tmp_path), loss_kwargs=TRITON)
    inputs = _batch()
    inputs["labels"] = inputs["labels"][:, :-2]
    with pytest.raises(ValueError, match="labels"):
        tr.compute_loss(tr.model, inputs)


# ---- fastkd.nn on the Triton backend -------------------------------------------------------------------------

def _logits(seed: int, v: int = 37):
    torch.manual_seed(seed)
    return torch.randn(4, v) * 2, torch.randn(4, v) * 2


@needs_triton
@pytest.mark.parametrize("seed", [1, 2])
def test_nn_distill_loss_bad_inputs(seed):
    s, t = _logits(seed)
    mod = FN.DistillLoss("jsd", backend="triton")
    with pytest.raises(ValueError, match="vocab_size"):
        mod(s, torch.randn(4, 41))
    with pytest.raises(ValueError, match="labels"):
        mod(s, t, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_logits"):
        mod(s, t.requires_grad_(True))
    with pytest.raises(ValueError, match="beta"):
        FN.DistillLoss("jsd", backend="triton", beta=1.5)(s, t.detach())


@needs_triton
def test_nn_fused_linear_distill_loss_bad_inputs():
    torch.manual_seed(1)
    h, hw, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(37, 8)
    mod = FN.FusedLinearDistillLoss(backend="triton")
    with pytest.raises(ValueError, match="vocab"):
        mod(h, w, hw, torch.randn(41, 8))
    with pytest.raises(ValueError, match="labels"):
        mod(h, w, hw, torch.randn(37, 8), labels=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_hidden|hidden"):
        mod(h, w, torch.randn(3, 8), torch.randn(37, 8))


@needs_triton
def test_nn_sparse_distill_loss_bad_inputs():
    s, t = _logits(1)
    ids = torch.topk(t, 5).indices
    vals = torch.log_softmax(t, -1).gather(-1, ids)
    mod = FN.SparseDistillLoss(backend="triton")
    with pytest.raises(ValueError, match="teacher_ids"):
        mod(s, ids + 40, vals)
    with pytest.raises(ValueError, match="labels"):
        mod(s, ids, vals, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_tail"):
        FN.SparseDistillLoss(backend="triton", mode="topk_tail")(s, ids, vals, teacher_tail=torch.full((4,), 0.5))
