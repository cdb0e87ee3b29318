"""End to end: a tiny trl.DistillationTrainer run on CPU (tiny Llama student and teacher, an in-memory word-level
tokenizer, greedy on-policy generation, a few steps) gives the same loss curve patched with fastkd as TRL's own."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl.trainer.distillation_trainer", reason="trl (>= 1.x DistillationTrainer) not installed")
tokenizers = pytest.importorskip("tokenizers")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from fastkd.integrations import trl as fkd_trl  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def _model(hidden: int, seed: int, **cfg) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1, **cfg)
    return LlamaForCausalLM(config)


def _run(tmp_path, patched: bool, **patch_kw) -> list[float]:
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (5,), generator=g).tolist()) for _ in range(8)]
    args = DistillationConfig(output_dir=str(tmp_path / ("p" if patched else "u")), report_to=[], use_cpu=True,
                              per_device_train_batch_size=2, max_steps=3, logging_steps=1, learning_rate=5e-2,
                              max_completion_length=4, temperature=1.3, beta=0.5, save_strategy="no", seed=0,
                              disable_tqdm=True, generation_kwargs={"do_sample": False})
    trainer = DistillationTrainer(model=_model(16, 0), teacher_model=_model(24, 1, final_logit_softcapping=5.0),
                                  args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=_tokenizer())
    if patched:
        fkd_trl.patch_distillation_trainer(**patch_kw)
    try:
        trainer.train()
    finally:
        fkd_trl.unpatch()
    return trainer.state.log_history


def test_patched_trainer_same_loss_curve(tmp_path):
    theirs = _run(tmp_path, False)
    ours = _run(tmp_path, True, log_stats=True)
    steps = [(a, b) for a, b in zip(theirs, ours, strict=True) if "loss" in a]
    assert len(steps) == 3
    for a, b in steps:
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(a["loss"])) + 1e-6, (a, b)
        assert abs(float(a["entropy"]) - float(b["entropy"])) <= 1e-4 * abs(float(a["entropy"])) + 1e-5
        assert {"fastkd/teacher_entropy", "fastkd/top1_agree", "fastkd/kl"} <= set(b)
