"""End to end: a tiny trl.DistillationTrainer run on CPU (tiny Llama student and teacher, an in-memory word-level
tokenizer, greedy on-policy generation, a few steps) gives the same loss curve patched with fastkd as TRL's own; so
does the server-teacher ServerDistillationTrainer, its vLLM server replaced by a local teacher's top-k."""

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


# ---- the server-teacher trainer: its vLLM server replaced by a local teacher's top-k --------------------------


class _NoServer:
    """Stands in for trl's VLLMClient (vLLM is not installed; the teacher call is replaced as well)."""

    def __init__(self, *args, **kwargs):
        pass


def _run_server(tmp_path, monkeypatch, patched: bool, beta: float, top_k: int, add_tail: bool, **patch_kw):
    import math

    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    teacher = _model(24, 1).double().eval()

    def teacher_topk(self, inputs, start):
        """What the server returns, from the local teacher: the completion window [start, L), −inf outside."""
        with torch.no_grad():
            logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        # a confident teacher (logits × 6), in float64 like the models (a real server sends float32, in which TRL
        # computes the teacher's tail bucket; fastkd in the student's compute dtype)
        lp = torch.log_softmax(logits[:, start - 1:-1] * 6.0 / self.temperature, dim=-1)
        out = inputs["labels"][:, start:] == -100
        top_lp, top_ids = lp.topk(self.loss_top_k, dim=-1)
        actual = lp.gather(-1, inputs["input_ids"][:, start:, None])[..., 0]
        return {"actual_logprobs": actual.masked_fill(out, -math.inf),
                "topk_logprobs": top_lp.masked_fill(out[..., None], -math.inf),
                "topk_token_ids": top_ids.masked_fill(out[..., None], 0)}

    monkeypatch.setattr("trl.generation.vllm_client.VLLMClient", _NoServer)
    monkeypatch.setattr(ServerDistillationTrainer, "_get_teacher_token_logprobs_from_server", teacher_topk)
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(n),), generator=g).tolist())
               for n in torch.randint(3, 7, (6,), generator=g)]  # uneven prompts: left padding
    args = ServerDistillationConfig(
        output_dir=str(tmp_path / ("p" if patched else "u")), report_to=[], use_cpu=True,
        per_device_train_batch_size=3, max_steps=2, logging_steps=1, learning_rate=5e-2, max_completion_length=4,
        temperature=1.3, beta=beta, loss_top_k=top_k, loss_add_tail=add_tail, save_strategy="no", seed=0,
        disable_tqdm=True, generation_kwargs={"do_sample": False}, teacher_model_server_url="http://stand-in",
        optim="sgd")  # SGD: Adam's first step would turn a rounding-level gradient difference into a full update
    student = _model(16, 0).double()
    init = student.lm_head.weight.detach().clone()
    # the LM head run with grad enabled: the loss's (B, L, V) logits (generation runs without grad)
    student.head_calls = []
    student.lm_head.register_forward_hook(
        lambda _m, _i, out: student.head_calls.append(tuple(out.shape)) if torch.is_grad_enabled() else None)
    trainer = ServerDistillationTrainer(model=student, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                                        processing_class=_tokenizer())
    if patched:
        fkd_trl.patch_server_distillation_trainer(**patch_kw)
    try:
        trainer.train()
    finally:
        fkd_trl.unpatch()
    return [row for row in trainer.state.log_history if "loss" in row], trainer.model, init


@pytest.mark.parametrize("beta,top_k,add_tail", [(0.5, 1, True), (0.0, 3, False), (1.0, 1, True)])
def test_server_trainer_patched_equals_unpatched(tmp_path, monkeypatch, beta, top_k, add_tail):
    """Two steps of the real ServerDistillationTrainer, float64 models: TRL's own float32 loss carries a rounding
    error of ~1e-4 relative on this problem (its divergence cancels terms of order 1 down to ~1e-3)."""
    theirs, m_theirs, init = _run_server(tmp_path, monkeypatch, False, beta, top_k, add_tail)
    ours, m_ours, _ = _run_server(tmp_path, monkeypatch, True, beta, top_k, add_tail, log_stats=True)
    assert len(theirs) == len(ours) == 2
    for a, b in zip(theirs, ours, strict=True):
        assert float(a["loss"]) > 1e-3
        # the logged loss went through Trainer's float32 accumulator: a few float32 ulps
        assert abs(float(a["loss"]) - float(b["loss"])) <= 5e-7 * abs(float(a["loss"])), (a, b)
        assert abs(float(a["grad_norm"]) - float(b["grad_norm"])) <= 1e-9 * float(a["grad_norm"]), (a, b)
        assert {"fastkd/student_entropy", "fastkd/teacher_entropy", "fastkd/top1_agree"} <= set(b)
    for (name, x), (_, y) in zip(m_theirs.named_parameters(), m_ours.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=name)  # the same two SGD steps
    assert not torch.equal(m_ours.lm_head.weight, init)  # the steps did train
    assert len(m_theirs.head_calls) == 2 and m_ours.head_calls == []  # fastkd never builds the logits
