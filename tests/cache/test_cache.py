"""fastkd.cache (TeacherCache writer/reader, Dataset) and the ``fastkd cache-teacher`` CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

import fastkd
from fastkd import cache as C
from fastkd.cache import CacheCorruptedError, CacheLockedError, TeacherCache, TeacherCacheWriter
from fastkd.cache import cli as cache_cli
from fastkd.cache import format as cache_format
from fastkd.cache import io as cache_io
from fastkd.distill import reference as ref_dense


@pytest.mark.parametrize(
    "vocab,fmt",
    [
        (100, "int16"),
        (40000, "uint16"),
        (128256, "packed"),
        (151936, "packed"),
        (1000, "int32"),
        (1000, "packed"),
    ],
)
def test_id_encodings_round_trip(vocab, fmt):
    ids = torch.randint(-1, vocab, (9, 7))
    ids[0], ids[1] = vocab - 1, -1
    f = C.choose_id_format(vocab, "auto" if fmt in ("int16", "uint16") or vocab > 2**16 else fmt)
    assert f == fmt
    stored = C.encode_ids(ids, f, C.id_bits(vocab))
    assert torch.equal(C.decode_ids(stored, f, C.id_bits(vocab), 7), ids)
    if f == "packed":
        assert stored.dtype == torch.uint8 and stored.shape[1] == math.ceil(7 * C.id_bits(vocab) / 8)


def test_id_format_too_small():
    with pytest.raises(ValueError, match="id_format='int16'"):
        C.choose_id_format(40000, "int16")


def _examples(n=7, vocab=500, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = 3 + (i * 5) % 11
        lp = torch.log_softmax(torch.randn(t, vocab, generator=g) * 3, -1)
        top = lp.topk(k, -1)
        out.append((top.indices, top.values, torch.randint(0, vocab, (t,), generator=g)))
    return out


def test_round_trip_shards_and_dataset(tmp_path):
    exs = _examples()
    with TeacherCache.create(tmp_path, vocab_size=500, k=8, shard_tokens=15, meta={"teacher": "t"}) as w:
        for ids, vals, inp in exs:
            w.add(ids, vals, input_ids=inp)  # k' = 6 < 8: padded with −1
    cache = TeacherCache(tmp_path, verify=True)
    assert len(cache) == len(exs) and len(cache.index["shards"]) > 2
    assert cache.n_tokens == sum(e[0].shape[0] for e in exs) and cache.index["meta"]["teacher"] == "t"
    for i in (0, 3, -1):
        ids, vals, inp = exs[i]
        x = cache[i]
        assert torch.equal(x["teacher_ids"][:, :6], ids) and (x["teacher_ids"][:, 6:] == -1).all()
        torch.testing.assert_close(x["teacher_values"][:, :6], vals, atol=2e-2, rtol=1e-3)  # fp16 storage
        assert torch.equal(x["input_ids"], inp)
        tail = torch.log1p(-vals.exp().sum(-1))
        torch.testing.assert_close(x["teacher_tail"], tail, atol=5e-3, rtol=5e-3)
    with pytest.raises(IndexError):
        cache[len(exs)]
    ds = cache.dataset()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate)
    batch = next(iter(loader))
    lens = [exs[i][0].shape[0] for i in range(3)]
    assert batch["teacher_ids"].shape == (3, max(lens), 8)
    assert batch["mask"].sum(1).tolist() == lens
    assert (batch["teacher_ids"][~batch["mask"]] == -1).all()
    assert (batch["input_ids"][~batch["mask"]] == 0).all()


def test_bytes_per_token_is_compact(tmp_path):
    exs = _examples(n=4, vocab=128256 // 100, k=32)
    with TeacherCache.create(tmp_path / "a", vocab_size=128256, k=32, shard_tokens=10**6) as w:
        for ids, vals, _ in exs:
            w.add(ids, vals)
    bpt = TeacherCache(tmp_path / "a").bytes_per_token()
    payload = math.ceil(32 * 17 / 8) + 32 * 2 + 2  # 17-bit ids, fp16 values, fp16 tail
    assert payload <= bpt < payload + 40  # plus offsets and the safetensors header per shard


def test_topk_and_samples_from_hidden_chunked():
    g = torch.Generator().manual_seed(1)
    h, w, b = (
        torch.randn(37, 16, generator=g),
        torch.randn(300, 16, generator=g),
        torch.randn(300, generator=g),
    )
    ids, lp, tail = C.topk_from_hidden(h, w, b, k=10, temperature=1.5, chunk_size=8)
    full = torch.log_softmax(((h @ w.t() + b) / 1.5).double(), -1)
    top = full.topk(10, -1)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(lp.double(), top.values, atol=1e-5, rtol=1e-5)
    exact_tail = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(tail.double(), exact_tail, atol=1e-5, rtol=1e-5)
    ids, counts = C.sample_from_hidden(
        h, w, b, num_samples=12, chunk_size=8, generator=torch.Generator().manual_seed(0)
    )
    assert (counts.sum(-1) == 12).all() and ((ids >= 0) == (counts > 0)).all()
    srt = ids.sort(-1).values
    assert not ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()


def test_cache_feeds_the_sparse_loss(tmp_path):
    """A cache holding every id reproduces the dense forward KL; topk_tail with the stored tail is finite."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(2 * 9, 8, generator=g), torch.randn(40, 8, generator=g)
    with TeacherCache.create(tmp_path, vocab_size=40, k=40, value_dtype="float32") as wr:
        wr.add_from_hidden(h[:9], w, chunk_size=4)
        wr.add_from_hidden(h[9:], w, chunk_size=4)
    ds = TeacherCache(tmp_path).dataset()
    batch = ds.collate([ds[0], ds[1]])
    z = torch.randn(2, 9, 40, dtype=torch.float64)
    got = fastkd.sparse_distill_loss(
        z, batch["teacher_ids"], batch["teacher_values"].double(), reduction="none"
    )
    exp = ref_dense.per_token(z.view(-1, 40), (h @ w.t()).double(), "fkl").view(2, 9)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    with TeacherCache.create(tmp_path / "k4", vocab_size=40, k=4) as wr:
        wr.add_from_hidden(h, w)
    x = TeacherCache(tmp_path / "k4")[0]
    loss = fastkd.sparse_distill_loss(
        z.view(-1, 40),
        x["teacher_ids"],
        x["teacher_values"].double(),
        teacher_tail=x["teacher_tail"].double(),
        mode="topk_tail",
    )
    assert torch.isfinite(loss)


def test_crash_midway_and_resume(tmp_path, monkeypatch):
    exs = _examples(n=10)
    with (
        pytest.raises(KeyboardInterrupt),
        TeacherCache.create(tmp_path, vocab_size=500, k=6, shard_tokens=12) as w,
    ):
        for i, (ids, vals, _) in enumerate(exs):
            if i == 6:
                raise KeyboardInterrupt  # the process dies with examples still buffered
            w.add(ids, vals)
    done = TeacherCache(tmp_path)
    assert 0 < len(done) < 6
    for i in range(len(done)):
        assert torch.equal(done[i]["teacher_ids"], exs[i][0])
    # a crash between writing a shard and committing the index leaves an orphan the index does not list
    w = TeacherCacheWriter(tmp_path, vocab_size=500, k=6, shard_tokens=12, resume=True)
    start = w.n_examples
    real_write = cache_io.fsync_write

    def dying_write(path, data):
        if path.name == C.INDEX:
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(cache_io, "fsync_write", dying_write)
    with pytest.raises(OSError, match="disk full"), w:  # the failed writer releases its lock on exit
        for ids, vals, _ in exs[start:]:
            w.add(ids, vals)
    monkeypatch.setattr(cache_io, "fsync_write", real_write)
    assert len(TeacherCache(tmp_path)) == start  # still the committed prefix, still readable
    with pytest.raises(FileExistsError, match="resume=True"):
        TeacherCacheWriter(tmp_path, vocab_size=500, k=6)
    with pytest.raises(ValueError, match="settings differ"):
        TeacherCacheWriter(tmp_path, vocab_size=500, k=7, resume=True)
    with TeacherCacheWriter(tmp_path, vocab_size=500, k=6, shard_tokens=12, resume=True) as w:
        assert w.n_examples == start
        for ids, vals, _ in exs[w.n_examples :]:
            w.add(ids, vals)
    full = TeacherCache(tmp_path, verify=True)
    assert len(full) == len(exs)
    for i, (ids, vals, _) in enumerate(exs):
        assert torch.equal(full[i]["teacher_ids"], ids)
        torch.testing.assert_close(full[i]["teacher_values"], vals, atol=2e-2, rtol=1e-3)


def _small_cache(path):
    with TeacherCache.create(path, vocab_size=500, k=6, shard_tokens=12) as w:
        for ids, vals, _ in _examples(n=4):
            w.add(ids, vals)
    return sorted(path.glob("shard-*.safetensors"))


def test_corrupted_files(tmp_path):
    shards = _small_cache(tmp_path)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheCorruptedError, match=f"{shards[1].name} is truncated"):
        TeacherCache(tmp_path)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    shards[1].write_bytes(bytes(flipped))
    cache = TeacherCache(tmp_path)  # same size: only the checksum notices, on first use by default
    with pytest.raises(CacheCorruptedError, match=f"{shards[1].name} fails its CRC-32 check"):
        cache[len(cache) - 1]
    with pytest.raises(CacheCorruptedError, match="CRC-32"):
        TeacherCache(tmp_path, verify=True)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][1]["crc32"] = zlib.crc32(bytes(flipped))  # a consistent CRC: SHA-256 (verify) still sees it
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheCorruptedError, match="SHA-256"):
        TeacherCache(tmp_path, verify=True)
    shards[1].write_bytes(b"\x00" * len(data))  # header length 0: safetensors refuses it
    cache = TeacherCache(tmp_path)
    with pytest.raises(CacheCorruptedError, match=shards[1].name):
        cache[len(cache) - 1]
    shards[1].unlink()
    with pytest.raises(CacheCorruptedError, match="missing"):
        TeacherCache(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(CacheCorruptedError, match="not valid JSON"):
        TeacherCache(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CacheCorruptedError, match="not a fastkd-teacher-cache"):
        TeacherCache(tmp_path)
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        TeacherCache(tmp_path / "nothing")


def test_writer_bad_inputs(tmp_path):
    w = TeacherCacheWriter(tmp_path, vocab_size=50, k=4)
    ids, vals = torch.randperm(50)[:12].view(3, 4), -2 - torch.rand(3, 4)  # distinct ids, valid log-probs
    with pytest.raises(ValueError, match=r"ids must be in \[0, 50\)"):
        w.add(ids + 50, vals)
    with pytest.raises(ValueError, match="k=4"):
        w.add(torch.randint(0, 50, (3, 5)), torch.randn(3, 5))
    with pytest.raises(ValueError, match="ids and values"):
        w.add(ids, vals[:, :3])
    with pytest.raises(ValueError, match="tail must have shape"):
        w.add(ids, vals, tail=torch.zeros(2))
    with pytest.raises(ValueError, match="vocab_size is 50"):
        w.add_from_hidden(torch.randn(3, 8), torch.randn(60, 8))
    c = TeacherCacheWriter(tmp_path / "c", vocab_size=50, k=4, values="counts")
    with pytest.raises(ValueError, match="counts must be in"):
        c.add(ids, -torch.ones(3, 4))
    with pytest.raises(ValueError, match="whole numbers"):
        c.add(ids, torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="value_dtype"):
        TeacherCacheWriter(tmp_path / "d", vocab_size=50, k=4, value_dtype="int32")
    with pytest.raises(ValueError, match="values must be"):
        TeacherCacheWriter(tmp_path / "e", vocab_size=50, k=4, values="probs")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg.save_pretrained(d)
    torch.manual_seed(0)
    return d, LlamaForCausalLM(cfg).eval()


def test_build_cache_from_tiny_llama(tiny_llama, tmp_path):
    _, model = tiny_llama
    examples = [torch.randint(0, 257, (n,)).tolist() for n in (5, 9, 3, 7)]
    summary = cache_cli.build_cache(
        model,
        examples,
        tmp_path / "c",
        k=16,
        batch_size=3,
        chunk_size=4,
        value_dtype="float32",
        progress=False,
    )
    assert summary["examples"] == 4 and summary["tokens"] == 24
    cache = TeacherCache(tmp_path / "c")
    for i, ex in enumerate(examples):
        with torch.no_grad():
            logits = model(torch.tensor([ex])).logits[0].double()
        top = torch.log_softmax(logits, -1).topk(16, -1)
        x = cache[i]
        assert torch.equal(x["input_ids"], torch.tensor(ex))
        torch.testing.assert_close(x["teacher_values"].double(), top.values, atol=1e-4, rtol=1e-4)
        # ids may swap only between (near-)tied logits
        same = x["teacher_ids"] == top.indices
        assert same.float().mean() > 0.95
    s = cache_cli.build_cache(model, examples, tmp_path / "s", samples=8, progress=False)
    x = TeacherCache(tmp_path / "s")[1]
    assert s["values"] == "counts" and (x["teacher_values"].sum(-1) == 8).all()


def test_cli_config_jsonl_resume(tiny_llama, tmp_path, capsys):
    d, _ = tiny_llama
    data = tmp_path / "toks.jsonl"
    data.write_text("\n".join(json.dumps(torch.randint(0, 257, (4 + i,)).tolist()) for i in range(6)))
    base = [
        "--config",
        str(d / "config.json"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "c"),
        "--k",
        "8",
        "--device",
        "cpu",
        "--shard-tokens",
        "10",
        "--no-progress",
    ]
    assert cache_cli.main([*base, "--limit", "3"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert cache_cli.main(base) == 1  # exists without --resume: a clear error, exit code 1
    assert "resume" in capsys.readouterr().err
    assert cache_cli.main([*base, "--resume"]) == 0
    assert "wrote 3 examples (6 in total" in capsys.readouterr().out
    assert len(TeacherCache(tmp_path / "c", verify=True)) == 6
    assert cache_cli.main([*base[:3], str(tmp_path / "missing.jsonl"), *base[4:]]) == 1


# ------------------------------------------------------------------------------------------------------
# untrusted caches (issue 13 item 7) and concurrent writers (item 8)
# ------------------------------------------------------------------------------------------------------


def _edit_index(path, fn):
    index = json.loads((path / "index.json").read_text())
    fn(index)
    (path / "index.json").write_text(json.dumps(index))


def _open_and_read_all(path, verify=False):
    cache = TeacherCache(path, verify=verify)
    for i in range(len(cache)):
        cache[i]
    return cache


@pytest.mark.parametrize("name", ["../outside.safetensors", "/dev/zero", "sub/shard.safetensors", "..", ""])
def test_cache_refuses_file_names_outside_the_directory(tmp_path, name):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    _small_cache(cache_dir)
    (tmp_path / "outside.safetensors").write_bytes(b"x" * 12345)  # a file the index must not reveal or read
    _edit_index(cache_dir, lambda ix: ix["shards"][0].update(file=name))
    with pytest.raises(CacheCorruptedError, match="only plain file names") as err:
        TeacherCache(cache_dir)
    assert "12345" not in str(err.value) and str(tmp_path / "outside") not in str(err.value)


def test_cache_refuses_symlinks(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    shards = _small_cache(cache_dir)
    outside = tmp_path / "elsewhere" / "secret.bin"
    outside.parent.mkdir()
    outside.write_bytes(shards[0].read_bytes())  # same bytes, so only the link itself is wrong
    shards[0].unlink()
    shards[0].symlink_to(outside)
    with pytest.raises(CacheCorruptedError, match="not a regular file") as err:
        TeacherCache(cache_dir)
    assert "secret" not in str(err.value) and "elsewhere" not in str(err.value)
    index = cache_dir / "index.json"
    real = index.read_bytes()
    index.unlink()
    index.symlink_to("/dev/zero")  # was an unbounded read
    with pytest.raises(CacheCorruptedError, match="index.json is a symbolic link"):
        TeacherCache(cache_dir)
    index.unlink()
    index.write_bytes(real)


def test_cache_oversized_index_is_refused_before_reading(tmp_path, monkeypatch):
    _small_cache(tmp_path)
    monkeypatch.setattr(cache_io, "MAX_INDEX_BYTES", 100)
    monkeypatch.setattr(cache_io.read_file, "__defaults__", (None, 100))
    with pytest.raises(CacheCorruptedError, match="more than the 100"):
        TeacherCache(tmp_path)


@pytest.mark.parametrize("edit,match", [
    (lambda ix: ix.update(shards={"a": 1}), "shards must be a list"),
    (lambda ix: ix["shards"][0].pop("bytes"), r"shard entry 0: missing required key 'bytes'"),
    (lambda ix: ix["shards"][0].update(bytes=None), r"bytes must be an int"),
    (lambda ix: ix["shards"][0].update(n_examples="2"), r"n_examples must be an int"),
    (lambda ix: ix["shards"].__setitem__(0, 7), "shard entry 0 is not an object"),
    (lambda ix: ix.update(n_examples=-1), "n_examples is -1 but the shards hold"),
    (lambda ix: ix["shards"][0].update(n_examples=-2), "n_examples must be an int >= 0"),
    (lambda ix: ix.pop("k"), "missing required key 'k'"),
    (lambda ix: ix.update(k=0), "k must be a positive int"),
    (lambda ix: ix.update(vocab_size=100), "id_bits must be 7"),
    (lambda ix: ix.update(id_format="nope"), "id_format 'nope'"),
    (lambda ix: ix.update(value_dtype="uint8"), "value_dtype 'uint8'"),
    (lambda ix: ix["shards"][1].update(sha256="zz"), "sha256 must be"),
    (lambda ix: ix["shards"].append(dict(ix["shards"][0])), "name the same file"),
    (lambda ix: ix.update(version=1), "format version 1"),
])
def test_cache_malformed_index(tmp_path, edit, match):
    _small_cache(tmp_path)
    _edit_index(tmp_path, edit)
    with pytest.raises(CacheCorruptedError, match=match):
        _open_and_read_all(tmp_path)


def test_cache_shards_are_bound_to_position_and_settings(tmp_path):
    _small_cache(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())

    def swap(ix):
        ix["shards"][0], ix["shards"][1] = ix["shards"][1], ix["shards"][0]
        ix["shards"][0]["n_examples"], ix["shards"][1]["n_examples"] = (
            ix["shards"][1]["n_examples"], ix["shards"][0]["n_examples"])

    _edit_index(tmp_path, swap)
    with pytest.raises(CacheCorruptedError, match="position"):
        _open_and_read_all(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(index))
    _edit_index(tmp_path, lambda ix: ix.update(id_format="uint16"))  # same int16 storage, other decoding
    with pytest.raises(CacheCorruptedError, match="id_format"):
        _open_and_read_all(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(index))
    _edit_index(tmp_path, lambda ix: ix.update(vocab_size=300, id_bits=9))  # would return ids >= V
    with pytest.raises(CacheCorruptedError, match="vocab_size"):
        _open_and_read_all(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert len(_open_and_read_all(tmp_path, verify=True)) == 4


def _craft_shard(path, position, change):
    """Rewrite shard ``position`` with tensors changed by ``change`` and an index that agrees (hashes, size)."""
    import hashlib

    from safetensors.torch import load, save

    index = json.loads((path / "index.json").read_text())
    entry = index["shards"][position]
    f = path / entry["file"]
    tensors = load(f.read_bytes())
    change(tensors, index)
    data = save(tensors, metadata=cache_format.shard_metadata(position, index))
    f.write_bytes(data)
    entry.update(bytes=len(data), crc32=zlib.crc32(data), sha256=hashlib.sha256(data).hexdigest())
    (path / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("change,match", [
    (lambda t, ix: t.__setitem__("offsets", t["offsets"].flip(0).contiguous()), "offsets must rise"),
    (lambda t, ix: t.__setitem__("values", t["values"][:-1].contiguous()), "values must be"),
    (lambda t, ix: t.__setitem__("ids", t["ids"].to(torch.int32)), "ids must be"),
    (lambda t, ix: t.__setitem__("ids", torch.full_like(t["ids"], 600)), r"ids span \[600, 600\]"),
    (lambda t, ix: t.__setitem__("extra", torch.zeros(3)), "tensors"),
    (lambda t, ix: t.pop("values"), "tensors"),
])
def test_cache_crafted_shard_with_consistent_hashes(tmp_path, change, match):
    _small_cache(tmp_path)
    _craft_shard(tmp_path, 1, change)
    with pytest.raises(CacheCorruptedError, match=match):
        TeacherCache(tmp_path, verify=True)
    with pytest.raises(CacheCorruptedError, match=match):
        _open_and_read_all(tmp_path)


def test_two_writers_in_one_process(tmp_path):
    w1 = TeacherCacheWriter(tmp_path, vocab_size=500, k=6)
    with pytest.raises(CacheLockedError, match="another TeacherCacheWriter"):
        TeacherCacheWriter(tmp_path, vocab_size=500, k=6, resume=True)
    w1.close()
    with TeacherCacheWriter(tmp_path, vocab_size=500, k=6, resume=True):  # free again after close
        pass
    a, b = cache_io.tmp_name("index.json"), cache_io.tmp_name("index.json")
    assert a != b and str(os.getpid()) in a and a.endswith(".tmp")


_RACE = r"""
import os, sys, time, torch
from fastkd.cache import TeacherCacheWriter, CacheLockedError
tag, path = int(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
while not os.path.exists(path + ".start"):  # both processes imported: start together
    time.sleep(0.01)
try:
    with TeacherCacheWriter(path, vocab_size=500, k=2, shard_tokens=3, resume=True) as w:
        print("locked", flush=True)
        for i in range(6):
            w.add(torch.tensor([[tag, tag + 100]] * 2), torch.full((2, 2), -1.0))
            time.sleep(0.2)
    print("wrote")
except CacheLockedError as e:
    print("refused:", e)
"""


def test_two_writer_processes_race(tmp_path):
    """Two processes resume one cache at once: one writes, the other is refused; nothing is mixed."""
    with TeacherCacheWriter(tmp_path, vocab_size=500, k=2, shard_tokens=3):
        pass  # an empty cache both resume
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tag), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for tag in (7, 9)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    open(str(tmp_path) + ".start", "w").close()
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    texts = [out for out, _ in outs]
    assert sorted("wrote" in t for t in texts) == [False, True], texts
    assert any("refused: " in t and "another TeacherCacheWriter" in t for t in texts)
    winner = 7 if "wrote" in texts[0] else 9
    cache = _open_and_read_all(tmp_path, verify=True)
    assert len(cache) == 6
    mine = torch.tensor([[winner, winner + 100]] * 2)
    assert all(torch.equal(cache[i]["teacher_ids"], mine) for i in range(len(cache)))
