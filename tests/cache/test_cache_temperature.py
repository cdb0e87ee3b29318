"""Re-temperable sparse caches (temperatures=), stats(), and the one-pass extraction's memory bound."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd import cache as C
from fastkd.cache import CacheCorruptedError, TeacherCache, TeacherCacheDataset, TeacherCacheWriter
from fastkd.sparse.op import sparse_distill_loss

V, H, K = 300, 16, 8


def _teacher(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * 0.6
    b = torch.randn(V, generator=g) * 0.5
    hs = [torch.randn(n, H, generator=g) * 1.5 for n in (20, 17)]
    return w, b, hs


def _exact(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tau: float, ids: torch.Tensor):
    """float64 reference: log-probs at the ids and log tail mass at temperature tau."""
    z = (h.double() @ w.double().T + b.double()) / tau
    logp = torch.log_softmax(z, -1)
    at = logp.gather(1, ids)
    tail = torch.logsumexp(logp.scatter(1, ids, -math.inf), -1)
    return at, tail, logp


def _build(tmp_path, value_dtype: str, temps=(1.0, 2.0), chunk: int = 7):
    w, b, hs = _teacher()
    with TeacherCacheWriter(tmp_path, vocab_size=V, k=K, value_dtype=value_dtype, temperatures=temps,
                            shard_tokens=15) as wr:
        for h in hs:
            wr.add_from_hidden(h, w, b, chunk_size=chunk, input_ids=torch.arange(h.shape[0]))
    return TeacherCache(tmp_path), w, b, hs


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
def test_get_at_stored_temperatures_matches_float64(tmp_path, value_dtype):
    cache, w, b, hs = _build(tmp_path, value_dtype)
    assert cache.temperatures == [1.0, 2.0] and len(cache.index["shards"]) == 2
    st = cache.stats()
    for i, h in enumerate(hs):
        for tau in (1.0, 2.0):
            ex = cache.get(i, temperature=tau)
            ids = ex["teacher_ids"]
            at, tail, logp = _exact(h, w, b, tau, ids)
            # the stored ids are the exact top-k (same at every temperature)
            assert torch.equal(ids, logp.topk(K, -1).indices)
            verr = st["temperatures"][tau]["value_max_abs_error"]
            terr = st["temperatures"][tau]["tail_max_abs_error"]
            d_val = (ex["teacher_values"].double() - at).abs().max().item()
            d_tail = (ex["teacher_tail"].double() - tail).abs().max().item()
            assert d_val <= verr + 2e-5, (tau, d_val, verr)  # within the stored dtype's rounding (+ fp32 math)
            assert d_tail <= terr + 2e-5, (tau, d_tail, terr)
            # and the bound is not vacuous: at most a few ulps of the largest |value|
            eps = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24}[value_dtype]
            assert verr <= 4 * eps * max(1.0, at.abs().max().item() * 2)
    # T = 2 values are not the T = 1 ones (the test would pass trivially otherwise)
    assert not torch.allclose(cache.get(0, temperature=2.0)["teacher_values"], cache.get(0)["teacher_values"])


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_topk_tail_loss_from_retempered_cache_equals_exact(tmp_path, divergence):
    cache, w, b, hs = _build(tmp_path, "float32")
    tau = 2.0
    ex = cache.get(1, temperature=tau)
    at, tail, _ = _exact(hs[1], w, b, tau, ex["teacher_ids"])
    s = torch.randn(hs[1].shape[0], V, generator=torch.Generator().manual_seed(3)) * 2
    kw = dict(mode="topk_tail", divergence=divergence, temperature=tau)
    got = sparse_distill_loss(s, ex["teacher_ids"], ex["teacher_values"], teacher_tail=ex["teacher_tail"], **kw)
    ref = sparse_distill_loss(s.double(), ex["teacher_ids"], at, teacher_tail=tail, **kw)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_unstored_temperature_errors_or_renormalises(tmp_path):
    cache, *_ = _build(tmp_path, "float16")
    with pytest.raises(ValueError, match=r"temperature=3.0 was not stored.*approximate=True"):
        cache.get(0, temperature=3.0)
    with pytest.raises(ValueError, match="was not stored"):
        TeacherCacheDataset(cache, temperature=3.0)
    with pytest.raises(ValueError, match="positive"):
        cache.get(0, temperature=-1.0)
    ex = cache.get(0, temperature=3.0, approximate=True)
    raw = cache.get(0)["teacher_values"].double()
    torch.testing.assert_close(ex["teacher_values"].double(), torch.log_softmax(raw / 3.0, -1), rtol=0, atol=1e-5)
    assert torch.isneginf(ex["teacher_tail"]).all()
    ds = TeacherCacheDataset(cache, temperature=2.0)
    torch.testing.assert_close(ds[1]["teacher_values"], cache.get(1, temperature=2.0)["teacher_values"])
    batch = ds.collate([ds[0], ds[1]])
    assert batch["teacher_tail"].shape == (2, 20) and torch.isneginf(batch["teacher_tail"][1, 17:]).all()


def test_stats_against_float64(tmp_path):
    cache, w, b, hs = _build(tmp_path, "float16")
    qs = (0.0, 0.25, 0.5, 0.9, 1.0)
    st = cache.stats(quantiles=qs)
    assert set(st["temperatures"]) == {1.0, 2.0}
    for tau in (1.0, 2.0):
        masses = []
        for h in hs:
            z = (h.double() @ w.double().T + b.double()) / tau
            p = torch.softmax(z, -1)
            top = p.topk(K, -1).indices
            masses.append(1 - p.gather(1, top).sum(-1))  # TV(teacher, top-k renormalised) = tail mass
        ref = torch.quantile(torch.cat(masses), torch.tensor(qs, dtype=torch.float64))
        got = torch.tensor([st["temperatures"][tau]["tail_mass_quantiles"][q] for q in qs], dtype=torch.float64)
        rel = 2 * st["temperatures"][tau]["tail_max_abs_error"] + 1e-6  # log-space error → relative mass error
        torch.testing.assert_close(got, ref, rtol=rel, atol=1e-7)
    assert st["temperatures"][2.0]["tail_mass_quantiles"][0.5] > st["temperatures"][1.0]["tail_mass_quantiles"][0.5]
    # a cache without temperatures reports T = 1 from its tail
    with TeacherCacheWriter(tmp_path / "plain", vocab_size=V, k=K) as wr:
        wr.add_from_hidden(hs[0], w, b)
    plain = TeacherCache(tmp_path / "plain").stats(quantiles=(0.5,))
    assert set(plain["temperatures"]) == {1.0}
    ref0 = float(torch.quantile(_mass(hs[0], w, b), 0.5))
    assert plain["temperatures"][1.0]["tail_mass_quantiles"][0.5] == pytest.approx(ref0, rel=1e-2)


def _mass(h, w, b, tau=1.0):
    p = torch.softmax((h.double() @ w.double().T + b.double()) / tau, -1)
    return 1 - p.topk(K, -1).values.sum(-1)


def test_settings_checks_and_binding(tmp_path):
    w, b, hs = _teacher()
    with pytest.raises(ValueError, match="temperatures need"):
        TeacherCacheWriter(tmp_path / "a", vocab_size=V, k=K, store_tail=False, temperatures=(2.0,))
    with pytest.raises(ValueError, match="positive"):
        TeacherCacheWriter(tmp_path / "b", vocab_size=V, k=K, temperatures=(0.0,))
    with TeacherCacheWriter(tmp_path / "c", vocab_size=V, k=K, temperatures=(2.0,)) as wr:  # 1.0 added first
        assert wr.index["temperatures"] == [1.0, 2.0]
        with pytest.raises(ValueError, match="temperature=1.0"):
            wr.add_from_hidden(hs[0], w, b, temperature=2.0)
        with pytest.raises(ValueError, match=r"lse must be \(3, 2\)"):
            wr.add(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
        wr.add_from_hidden(hs[0], w, b)
    # an index edited to claim another temperature is refused by the shards' own metadata
    ix = json.loads((tmp_path / "c" / C.INDEX).read_text())
    ix["temperatures"] = [1.0, 3.0]
    (tmp_path / "c" / C.INDEX).write_text(json.dumps(ix))
    with pytest.raises(CacheCorruptedError, match="temperatures"):
        TeacherCache(tmp_path / "c")[0]
    ix["temperatures"] = [2.0, 1.0]
    (tmp_path / "c" / C.INDEX).write_text(json.dumps(ix))
    with pytest.raises(CacheCorruptedError, match="1.0 first"):
        TeacherCache(tmp_path / "c")


def test_version2_index_still_reads(tmp_path):
    w, b, hs = _teacher()
    with TeacherCacheWriter(tmp_path, vocab_size=V, k=K) as wr:
        wr.add_from_hidden(hs[0], w, b)
    ix = json.loads((tmp_path / C.INDEX).read_text())
    ix["version"] = 2
    del ix["temperatures"]
    (tmp_path / C.INDEX).write_text(json.dumps(ix))
    cache = TeacherCache(tmp_path)
    assert cache.temperatures == [] and cache[0]["teacher_ids"].shape == (20, K)
    with TeacherCacheWriter(tmp_path, vocab_size=V, k=K, resume=True) as wr:  # resumed as version 3
        wr.add_from_hidden(hs[1], w, b)
    assert json.loads((tmp_path / C.INDEX).read_text())["version"] == C.VERSION == 3
    assert len(TeacherCache(tmp_path)) == 2


class _LargestAlloc(TorchDispatchMode):
    """Records the largest tensor (bytes) any op returns (what a (N, V) logits tensor would show)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize(("values", "backend"), [("logprobs", "torch"), ("logprobs", "triton"), ("counts", "auto")])
def test_extraction_memory_bound_and_reference(tmp_path, values, backend):
    """add_from_hidden never materialises (N, V): the largest tensor is O(chunk · V), as in the fused loss
    (on either top-k backend; the Triton one under the interpreter)."""
    g = torch.Generator().manual_seed(5)
    n, v, h, chunk = 96, 700, 12, 8
    if backend == "triton":
        pytest.importorskip("triton")
        n = 72  # the interpreter is slow; 9 chunks (n · V must stay well above the head W.T view)
    w, b = torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    x = torch.randn(n, h, generator=g)
    temps = (1.0, 0.5, 4.0) if values == "logprobs" else ()
    wr = TeacherCacheWriter(tmp_path, vocab_size=v, k=5, values=values, temperatures=temps)
    with _LargestAlloc() as mode:
        wr.add_from_hidden(x, w, b, chunk_size=chunk, generator=torch.Generator().manual_seed(0),
                           topk_backend=backend)
    wr.close()
    # a chunk's fp32 logits (the interpreter copies the chunk's bytes), never n * v
    assert 4 * chunk * v <= mode.largest <= 2 * 4 * chunk * v, mode.largest
    assert mode.largest < 4 * n * v // 4
    if values == "logprobs":  # and the one-pass extraction equals the float64 reference at every temperature
        cache = TeacherCache(tmp_path)
        for tau in temps:
            ex = cache.get(0, temperature=tau)
            at, tail, _ = _exact(x, w, b, tau, ex["teacher_ids"])
            assert (ex["teacher_values"].double() - at).abs().max() <= cache.stats()["temperatures"][tau][
                "value_max_abs_error"] + 2e-5
            assert (ex["teacher_tail"].double() - tail).abs().max() < 2e-2


def test_trainer_reads_cache_at_its_temperature(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastkd.integrations.hf import DistillationTrainer

    g = torch.Generator().manual_seed(11)
    v = 97
    w = torch.randn(v, H, generator=g)
    rows = [torch.randint(0, v, (6 + i,), generator=g) for i in range(3)]
    with TeacherCacheWriter(tmp_path / "c", vocab_size=v, k=6, value_dtype="float32", temperatures=(2.0,)) as wr:
        for ids in rows:
            wr.add_from_hidden(torch.randn(ids.shape[0], H, generator=g), w, input_ids=ids)
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    tr = DistillationTrainer(model=student, teacher_cache=tmp_path / "c", temperature=2.0, divergence="fkl", args=args)
    assert tr.train_dataset.temperature == 2.0 and tr.sparse_options["mode"] == "topk_tail"
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    loss = tr.compute_loss(student, inputs)
    cache = TeacherCache(tmp_path / "c")
    tot, cnt = 0.0, 0
    for i, ids in enumerate(rows):
        ex = cache.get(i, temperature=2.0)
        ls = student(input_ids=ids[None]).logits[0, :-1].double()
        per = sparse_distill_loss(ls, ex["teacher_ids"][:-1], ex["teacher_values"][:-1].double(), mode="topk_tail",
                                  teacher_tail=ex["teacher_tail"][:-1].double(), temperature=2.0, reduction="sum")
        tot, cnt = tot + per, cnt + ids.shape[0] - 1
    torch.testing.assert_close(loss.double(), (tot / cnt).detach(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="was not stored"):
        DistillationTrainer(model=student, teacher_cache=tmp_path / "c", temperature=3.0, args=args)

