"""Hidden-state teacher caches (values="hidden"): offline dense KD from disk equals online distillation."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import fastkd  # noqa: E402
from fastkd import cache as C  # noqa: E402
from fastkd.cache import CacheCorruptedError, TeacherCache, TeacherCacheDataset, TeacherCacheWriter  # noqa: E402
from fastkd.distill.fused import fused_linear_distill_loss  # noqa: E402

V, HT, HS = 97, 24, 16


def _teacher(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=HT, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _rows(n: int = 4, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (7 + 3 * i,), generator=g) for i in range(n)]


@torch.no_grad()
def _hidden(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model.model(input_ids=ids[None]).last_hidden_state[0]


def _write(path, model, rows, dtype="bfloat16", shard_tokens=12, **kw) -> TeacherCache:
    with TeacherCacheWriter(path, values="hidden", hidden_size=HT, value_dtype=dtype,
                            lm_head=model.lm_head.weight.detach(), shard_tokens=shard_tokens, **kw) as w:
        for ids in rows:
            w.add_hidden(_hidden(model, ids), input_ids=ids)
    return TeacherCache(path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_offline_equals_online_every_divergence(tmp_path, dtype):
    teacher = _teacher()
    rows = _rows()
    cache = _write(tmp_path, teacher, rows, dtype)
    assert len(cache) == 4 and len(cache.index["shards"]) >= 2
    w_t, b_t = cache.lm_head()
    assert b_t is None and torch.equal(w_t, teacher.lm_head.weight.detach())
    h_on = torch.cat([_hidden(teacher, r) for r in rows])
    h_off = torch.cat([cache[i]["hidden"] for i in range(len(cache))])
    dt = getattr(torch, dtype)
    assert h_off.dtype == dt and torch.equal(h_off, h_on.to(dt))
    n = h_on.shape[0]
    g = torch.Generator().manual_seed(7)
    w_s = (torch.randn(V, HS, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::5] = -100
    for div in fastkd.DIVERGENCES:
        outs = []
        for h_t in (h_on, h_off.float(), h_on.to(dt).float()):
            h_s = (torch.randn(n, HS, generator=torch.Generator().manual_seed(8))).requires_grad_()
            loss = fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence=div, labels=labels, temperature=1.5,
                                             chunk_size=8)
            gh, gw = torch.autograd.grad(loss, (h_s, w_s))
            outs.append((loss.detach(), gh, gw))
        # offline == online on the rounded hidden states, bit for bit (same computation)
        for a, b in zip(outs[1], outs[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # and == online fp32 within the stored dtype's rounding
        tol = {"bfloat16": 3e-2, "float16": 4e-3}[dtype]
        for a, b in zip(outs[1], outs[0], strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(),
                                       msg=lambda m, d=div: f"{d}: {m}")
    # ~ H·2 bytes/token (+ offsets/ids, safetensors header)
    assert 2 * HT <= cache.bytes_per_token() < 2 * HT + 40


def test_dataset_collate_and_settings(tmp_path):
    teacher = _teacher()
    bias = torch.randn(V)
    with TeacherCacheWriter(tmp_path, values="hidden", lm_head=teacher.lm_head.weight.detach(), lm_head_bias=bias,
                            softcap=30.0, logit_scale=0.5) as w:
        for ids in _rows(3):
            w.add_from_hidden(_hidden(teacher, ids), teacher.lm_head.weight, input_ids=ids)
    cache = TeacherCache(tmp_path, verify=True)
    ix = cache.index
    assert (ix["values"], ix["value_dtype"], ix["hidden_size"], ix["softcap"], ix["logit_scale"]) == (
        "hidden", "bfloat16", HT, 30.0, 0.5)
    assert torch.equal(cache.lm_head()[1], bias)
    from fastkd.cache.hidden import head_bytes  # deterministic bytes: the SHA-256 identifies the head on resume

    assert len({head_bytes(teacher.lm_head.weight, bias) for _ in range(8)}) == 1
    ds = TeacherCacheDataset(cache)
    b = ds.collate([ds[0], ds[2]])
    assert b["teacher_hidden"].shape == (2, 13, HT) and b["mask"].sum().item() == 7 + 13
    assert (b["teacher_hidden"][0, 7:] == 0).all() and (b["input_ids"][0, 7:] == 0).all()
    with pytest.raises(ValueError, match="lm_head"):
        TeacherCacheWriter(tmp_path / "x", values="hidden", hidden_size=HT)
    with pytest.raises(ValueError, match="hidden_size=8"):
        TeacherCacheWriter(tmp_path / "x", values="hidden", hidden_size=8, lm_head=torch.randn(V, HT))
    with pytest.raises(ValueError, match="value_dtype"):
        TeacherCacheWriter(tmp_path / "x", values="hidden", lm_head=torch.randn(V, HT), value_dtype="uint8")
    with TeacherCacheWriter(tmp_path / "y", values="hidden", lm_head=torch.randn(V, HT)) as w:
        with pytest.raises(ValueError, match=r"hidden must be \(T, 24\)"):
            w.add_hidden(torch.randn(3, 5))
        with pytest.raises(ValueError, match="add_hidden"):
            w.add(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="needs a log-prob cache"):
        TeacherCache(tmp_path).get(0, temperature=2.0)


def test_crash_resume_and_head_binding(tmp_path):
    teacher = _teacher()
    rows = _rows(6)
    head = teacher.lm_head.weight.detach()
    kw = dict(values="hidden", lm_head=head, shard_tokens=30)
    with pytest.raises(RuntimeError, match="boom"), TeacherCacheWriter(tmp_path, **kw) as w:
        for i, ids in enumerate(rows):
            if i == 4:
                raise RuntimeError("boom")
            w.add_hidden(_hidden(teacher, ids), input_ids=ids)
    done = len(TeacherCache(tmp_path))
    assert 0 < done < 4  # the complete shards only
    with pytest.raises(ValueError, match="settings differ"):
        TeacherCacheWriter(tmp_path, values="hidden", lm_head=head + 1, resume=True)
    with TeacherCacheWriter(tmp_path, resume=True, **kw) as w:
        for ids in rows[w.n_examples:]:
            w.add_hidden(_hidden(teacher, ids), input_ids=ids)
    cache = TeacherCache(tmp_path, verify=True)
    assert len(cache) == 6
    for i, ids in enumerate(rows):
        assert torch.equal(cache[i]["input_ids"], ids)
        assert torch.equal(cache[i]["hidden"], _hidden(teacher, ids).bfloat16())


def test_corruption_is_detected(tmp_path):
    teacher = _teacher()
    _write(tmp_path, teacher, _rows(3))
    head_file = tmp_path / "lm_head.safetensors"
    data = bytearray(head_file.read_bytes())
    data[-3] ^= 0x40
    head_file.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptedError, match="SHA-256"):
        TeacherCache(tmp_path).lm_head()
    with pytest.raises(CacheCorruptedError, match="SHA-256"):
        TeacherCache(tmp_path, verify=True)
    # an index pointing at another head: the shards are bound to the head they were written with
    ix = json.loads((tmp_path / C.INDEX).read_text())
    ix["lm_head"]["sha256"] = "0" * 64
    (tmp_path / C.INDEX).write_text(json.dumps(ix))
    with pytest.raises(CacheCorruptedError, match="lm_head"):
        TeacherCache(tmp_path)[0]
    for bad, what in ((lambda d: d.update(hidden_size=0), "hidden_size"),
                      (lambda d: d["lm_head"].update(file="../x"), "plain file"),
                      (lambda d: d.update(value_dtype="uint8"), "value_dtype")):
        broken = json.loads(json.dumps(ix))
        bad(broken)
        (tmp_path / C.INDEX).write_text(json.dumps(broken))
        with pytest.raises(CacheCorruptedError, match=what):
            TeacherCache(tmp_path)
    # a symlinked head is refused
    (tmp_path / C.INDEX).write_text(json.dumps(ix))
    os.replace(head_file, tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", head_file)
    with pytest.raises(CacheCorruptedError, match="regular file"):
        TeacherCache(tmp_path)
    # a truncated shard
    os.unlink(head_file)
    os.replace(tmp_path / "real.bin", head_file)
    shard = tmp_path / ix["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheCorruptedError, match="truncated"):
        TeacherCache(tmp_path)


def test_trainer_on_hidden_cache(tmp_path):
    """DistillationTrainer(teacher_cache=<hidden cache>) gives the online trainer's loss (up to bf16 rounding)
    and trains."""
    from fastkd.integrations.hf import DistillationTrainer

    teacher = _teacher()
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=HS, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                           tie_word_embeddings=False))
    rows = [r[:7] for r in _rows(6)]  # equal lengths: no padding in the online batch either
    _write(tmp_path / "c", teacher, rows, "float16")
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, save_strategy="no",
                             per_device_train_batch_size=3, max_steps=6, learning_rate=3e-2, disable_tqdm=True,
                             lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                             dataloader_num_workers=0)
    off = DistillationTrainer(model=student, teacher_cache=tmp_path / "c", divergence="jsd", temperature=2.0,
                              ce_weight=0.3, args=args)
    on = DistillationTrainer(model=student, teacher_model=teacher, divergence="jsd", temperature=2.0, ce_weight=0.3,
                             args=args)
    inputs = off.data_collator([off.train_dataset[i] for i in range(3)])
    assert inputs["teacher_hidden"].shape == (3, 7, HT)
    l_off = off.compute_loss(student, inputs)
    l_on = on.compute_loss(student, {k: v for k, v in inputs.items() if k != "teacher_hidden"})
    torch.testing.assert_close(l_off, l_on, rtol=3e-3, atol=1e-5)
    before = l_off.item()
    off.train()
    assert off.compute_loss(student, inputs).item() < before


def test_cli_values_hidden(tmp_path):
    from fastkd.cache.cli import main

    cfg = _teacher().config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps([int(x) for x in r]) for r in _rows(3)))
    out = tmp_path / "c"
    assert main(["--config", str(tmp_path / "config.json"), "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
                 "--values", "hidden", "--device", "cpu", "--no-progress"]) == 0
    cache = TeacherCache(out, verify=True)
    assert cache.values_kind == "hidden" and len(cache) == 3 and cache[1]["hidden"].shape == (10, HT)
    assert cache.lm_head()[0].shape == (V, HT)
    assert main(["--config", str(tmp_path / "config.json"), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "t"), "--k", "5", "--temperatures", "1,2", "--device", "cpu",
                 "--no-progress"]) == 0
    assert TeacherCache(tmp_path / "t").temperatures == [1.0, 2.0]
    base = ["--config", str(tmp_path / "config.json"), "--data", str(tmp_path / "d.jsonl"), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "e1"), "--values", "counts", "--k", "4"]) == 1
    assert main([*base, "--out", str(tmp_path / "e2"), "--values", "hidden", "--k", "4"]) == 1
    assert main([*base, "--out", str(tmp_path / "l"), "--values", "logprobs", "--no-progress"]) == 0
    assert TeacherCache(tmp_path / "l").k == 32
