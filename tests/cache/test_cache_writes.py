"""fastkd.cache writes and index checks: ``TeacherCacheWriter.add`` refuses what the losses would refuse on
read (``validate``), every required ``index.json`` key is checked (missing or of a wrong type gives
``CacheCorruptedError`` naming it), and a writer killed after each write phase loses and duplicates nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from fastkd.cache import CacheCorruptedError, TeacherCache, TeacherCacheWriter

V, K = 50, 3


def _valid(t=4, k=K, seed=0):
    """Distinct ids and log-probs of a real distribution over V (its top-k), tail = the rest."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(t, V, generator=g, dtype=torch.float64) * 2, -1)
    top = lp.topk(k, -1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    return top.indices, top.values.float(), tail.float()


def _with(x, idx, value):
    x = x.clone()
    x[idx] = value
    return x


# ------------------------------------------------------------------------------------------------------
# validated writes
# ------------------------------------------------------------------------------------------------------

ids0, vals0, tail0 = _valid()
BAD_VALUES = [  # (ids, values, tail, match): each is stored silently without validation
    (_with(ids0, (1, 2), int(ids0[1, 0])), vals0, tail0, r"ids has a duplicated id within one token \(token 1\)"),
    (ids0, _with(vals0, (2, 1), math.nan), tail0, r"values holds 1 NaN or \+inf log-probs \(token 2\)"),
    (ids0, _with(vals0, (0, 0), math.inf), tail0, r"values holds 1 NaN or \+inf"),
    (ids0, _with(vals0, (3, 2), 0.5), tail0, r"values holds 1 log-probs > 0"),
    (ids0, _with(vals0, 1, math.log(0.6)), tail0, r"values sum to a probability mass above 1 in 1 tokens"),
    (ids0, vals0, _with(tail0, 2, math.nan), r"tail holds 1 NaN or \+inf"),
    (ids0, vals0, _with(tail0, 0, 0.5), r"tail holds 1 log masses > 0"),
    (ids0, vals0, _with(tail0, 0, math.inf), r"tail holds 1 NaN or \+inf"),
]


@pytest.mark.parametrize("ids,vals,tail,match", BAD_VALUES)
def test_add_refuses_what_the_losses_refuse(tmp_path, ids, vals, tail, match):
    with TeacherCacheWriter(tmp_path, vocab_size=V, k=K) as w:
        with pytest.raises(ValueError, match=match):
            w.add(ids, vals, tail)
        assert w.n_examples == 0  # nothing buffered
        w.add(ids0, vals0, tail0)
    assert len(TeacherCache(tmp_path)) == 1


@pytest.mark.parametrize("ids,vals,tail,match", BAD_VALUES)
def test_validate_false_skips_the_data_checks(tmp_path, ids, vals, tail, match):
    with TeacherCacheWriter(tmp_path, vocab_size=V, k=K, validate=False, value_dtype="float32") as w:
        w.add(ids, vals, tail)
    x = TeacherCache(tmp_path)[0]  # stored as given: the opt-out trusts the caller
    assert torch.equal(x["teacher_ids"], ids)
    assert torch.equal(x["teacher_values"].isnan(), vals.isnan())


def test_add_structural_checks_run_with_or_without_validate(tmp_path):
    for validate in (True, False):
        w = TeacherCacheWriter(tmp_path / str(validate), vocab_size=V, k=K, validate=validate)
        with pytest.raises(ValueError, match=r"ids must be in \[0, 50\) or -1, got \[0, 50\]"):
            w.add(_with(ids0, (0, 0), V), vals0)
        with pytest.raises(ValueError, match=r"ids must be in \[0, 50\) or -1, got \[-2"):
            w.add(_with(ids0, (0, 0), -2), vals0)
        with pytest.raises(ValueError, match="ids must be an integer tensor, got torch.float32"):
            w.add(ids0.float(), vals0)
        with pytest.raises(ValueError, match="ids must be a torch.Tensor, got list"):
            w.add(ids0.tolist(), vals0)
        with pytest.raises(ValueError, match="values must be a floating-point tensor, got torch.int64"):
            w.add(ids0, vals0.long())
        with pytest.raises(ValueError, match="tail must be a floating-point tensor"):
            w.add(ids0, vals0, tail0.long())
        with pytest.raises(ValueError, match=r"tail must have shape \(4,\)"):
            w.add(ids0, vals0, tail0[:3])
        with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
            w.add(ids0, vals0, tail0, input_ids=torch.zeros(4))
        with pytest.raises(ValueError, match="input_ids are stored as int32"):
            w.add(ids0, vals0, tail0, input_ids=torch.full((4,), 2**31))
        w.add(ids0, vals0, tail0, input_ids=torch.arange(4))  # the failed calls fixed nothing
        with pytest.raises(ValueError, match="every example or for none"):
            w.add(ids0, vals0, tail0)
        w.close()
    with pytest.raises(ValueError, match="validate must be a bool"):
        TeacherCacheWriter(tmp_path / "x", vocab_size=V, k=K, validate=1)


def test_add_accepts_zero_mass_and_padding(tmp_path):
    """−inf log-probs (probability 0) and −inf tails are valid; padding slots are not checked (zeroed)."""
    ids = _with(ids0, (0, 2), -1)
    vals = _with(_with(vals0, (0, 2), math.nan), (1, 1), -math.inf)  # NaN at a padding slot: not a value
    tail = _with(tail0, 3, -math.inf)
    with TeacherCacheWriter(tmp_path, vocab_size=V, k=K) as w:
        w.add(ids, vals, tail)
        w.add(torch.full((2, K), -1), torch.zeros(2, K))  # all padding: no mass, no error
    x = TeacherCache(tmp_path)[0]
    assert x["teacher_values"][0, 2] == 0 and x["teacher_values"][1, 1] == -math.inf
    assert x["teacher_tail"][3] == -math.inf


def test_counts_and_temperatures_and_hidden_are_validated(tmp_path):
    c = TeacherCacheWriter(tmp_path / "c", vocab_size=V, k=K, values="counts")
    with pytest.raises(ValueError, match="duplicated id"):
        c.add(_with(ids0, (0, 1), int(ids0[0, 0])), torch.ones(4, K))
    with pytest.raises(ValueError, match="whole numbers"):
        c.add(ids0, _with(torch.ones(4, K), (0, 0), math.nan))
    with pytest.raises(ValueError, match="values must be a real-valued tensor"):
        c.add(ids0, torch.ones(4, K, dtype=torch.bool))
    c.close()
    t = TeacherCacheWriter(tmp_path / "t", vocab_size=V, k=K, temperatures=(1.0, 2.0))
    lse, tails = torch.randn(4, 2), torch.stack([tail0, tail0 - 1], -1)
    with pytest.raises(ValueError, match="lse holds 1 non-finite"):
        t.add(ids0, vals0, tail0, lse=_with(lse, (1, 1), math.inf), tails=tails)
    with pytest.raises(ValueError, match="tails holds 1 log masses > 0"):
        t.add(ids0, vals0, tail0, lse=lse, tails=_with(tails, (2, 1), 0.1))
    with pytest.raises(ValueError, match="tails must be a floating-point tensor"):
        t.add(ids0, vals0, tail0, lse=lse, tails=tails.long())
    t.add(ids0, vals0, tail0, lse=lse, tails=tails)
    t.close()
    w = torch.randn(V, 8)
    h = TeacherCacheWriter(tmp_path / "h", values="hidden", lm_head=w)
    with pytest.raises(ValueError, match="hidden holds 1 non-finite"):
        h.add_hidden(_with(torch.randn(5, 8), (4, 7), math.nan))
    h.add_hidden(torch.randn(5, 8))
    h.close()
    nocheck = TeacherCacheWriter(tmp_path / "h2", values="hidden", lm_head=w, validate=False)
    nocheck.add_hidden(_with(torch.randn(5, 8), (4, 7), math.nan))
    nocheck.close()


def test_add_from_hidden_validates_the_teacher(tmp_path):
    """The extraction path runs the same checks: a NaN hidden state gives NaN log-probs, refused."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(6, 8, generator=g), torch.randn(V, 8, generator=g)
    b = torch.full((V,), -math.inf)
    b[:2] = 0.0  # two finite logits: the third top-k value is -inf (probability 0), valid
    with TeacherCacheWriter(tmp_path, vocab_size=V, k=K) as wr:
        wr.add_from_hidden(h, w, b)
        with pytest.raises(ValueError, match="NaN"):
            wr.add_from_hidden(_with(h, (2, 3), math.nan), w, b)
    x = TeacherCache(tmp_path, verify=True)[0]
    assert (x["teacher_values"][:, 2] == -math.inf).all() and (x["teacher_tail"] == -math.inf).all()


# ------------------------------------------------------------------------------------------------------
# every required index key
# ------------------------------------------------------------------------------------------------------

TOP = ("format", "version", "vocab_size", "values", "value_dtype", "has_input_ids", "meta", "shards", "n_examples",
       "n_tokens")
SPARSE = ("k", "id_format", "id_bits", "store_tail", "temperatures")
HIDDEN = ("hidden_size", "softcap", "logit_scale", "lm_head")
SHARD = ("file", "n_examples", "n_tokens", "bytes", "crc32", "sha256")
HEAD = ("file", "bytes", "crc32", "sha256", "dtype", "bias")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("caches")
    with TeacherCacheWriter(d / "sparse", vocab_size=V, k=K, temperatures=(1.0, 2.0), shard_tokens=4) as w:
        for s in range(2):
            ids, vals, tail = _valid(seed=s)
            w.add(ids, vals, tail, input_ids=torch.arange(4), lse=torch.randn(4, 2),
                  tails=torch.stack([tail, tail], -1))
    with TeacherCacheWriter(d / "hidden", values="hidden", lm_head=torch.randn(V, 8), shard_tokens=4) as w:
        w.add_hidden(torch.randn(4, 8), input_ids=torch.arange(4))
    return {kind: json.loads((d / kind / "index.json").read_text()) for kind in ("sparse", "hidden")}, d


def _read_all(path):
    cache = TeacherCache(path, verify=True)
    for i in range(len(cache)):
        cache[i]
    if cache.values_kind == "hidden":
        cache.lm_head()


def _edits():
    for kind, keys in (("sparse", TOP + SPARSE), ("hidden", TOP + HIDDEN)):
        for key in keys:
            yield kind, (key,)
        for key in SHARD:
            yield kind, ("shards", 0, key)
    for key in HEAD:
        yield "hidden", ("lm_head", key)


def _check_edit(caches, tmp_path, kind, where, edit):
    import shutil

    indexes, root = caches
    shutil.copytree(root / kind, tmp_path / kind)
    ix = json.loads(json.dumps(indexes[kind]))
    *parents, key = where
    d = ix
    for p in parents:
        d = d[p]
    edit(d, key)
    (tmp_path / kind / "index.json").write_text(json.dumps(ix))
    with pytest.raises(CacheCorruptedError, match="shard" if key == "shards" else key) as err:
        _read_all(tmp_path / kind)
    return str(err.value)


@pytest.mark.parametrize("kind,where", list(_edits()), ids=lambda x: x if isinstance(x, str) else ".".join(map(str, x)))
def test_every_required_index_key_missing(caches, tmp_path, kind, where):
    msg = _check_edit(caches, tmp_path, kind, where, lambda d, key: d.pop(key))
    assert f"missing required key {where[-1]!r}" in msg


@pytest.mark.parametrize("value", [["x"], "x", None, -1.5, {"a": 1}])  # null has_input_ids: not once examples exist
@pytest.mark.parametrize("kind,where", list(_edits()), ids=lambda x: x if isinstance(x, str) else ".".join(map(str, x)))
def test_every_required_index_key_of_a_wrong_type(caches, tmp_path, kind, where, value):
    if where[-1] in ("softcap", "logit_scale") and value is None:
        pytest.skip("null is a valid softcap / logit_scale")
    if where[-1] == "file" and value == "x":
        pytest.skip("a plain file name is of the right type (a missing file is tested elsewhere)")
    if where[-1] == "meta" and isinstance(value, dict):
        pytest.skip("any object is a valid meta")
    _check_edit(caches, tmp_path, kind, where, lambda d, key: d.__setitem__(key, value))


# ------------------------------------------------------------------------------------------------------
# crash safety: a writer killed after each phase of each file write
# ------------------------------------------------------------------------------------------------------

N_EXAMPLES = 8  # two examples of two tokens per shard: four shards

_KILLED_WRITER = r"""
import os, signal, sys, torch
from fastkd.cache import TeacherCacheWriter, io
path, kind, phase, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seen = 0

def after_phase(p, name):
    global seen
    if p == phase and (name == "index.json") == (kind == "index"):
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)

io.after_phase = after_phase
with TeacherCacheWriter(path, vocab_size=500, k=2, shard_tokens=4, resume=True) as w:
    for i in range(w.n_examples, int(sys.argv[5])):
        w.add(torch.tensor([[i, 250 + i]] * 2), torch.full((2, 2), -1.0))
print("not killed")
"""

# (file, phase, n-th time): kill then; committed = examples the index lists after the kill
CRASH_POINTS = [
    ("shard", "written", 1, 0),  # the first temporary file written, nothing committed yet
    ("shard", "written", 2, 2),
    ("shard", "fsynced", 2, 2),
    ("shard", "renamed", 2, 2),  # the shard is in place, the index does not list it: an orphan
    ("index", "written", 2, 2),
    ("index", "fsynced", 2, 2),
    ("index", "renamed", 2, 4),  # the index update: the second shard is committed
]


def test_writer_killed_at_every_write_phase_loses_and_duplicates_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = []
    for n, (kind, phase, nth, _) in enumerate(CRASH_POINTS):  # all at once: one import wait, not seven
        cmd = [sys.executable, "-c", _KILLED_WRITER, str(tmp_path / str(n)), kind, phase, str(nth), str(N_EXAMPLES)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for n, (p, (kind, phase, nth, committed)) in enumerate(zip(procs, CRASH_POINTS)):
        out, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (kind, phase, nth, p.returncode, out, err)
        path = tmp_path / str(n)
        if committed == 0:
            assert not (path / "index.json").exists()
        else:
            assert len(TeacherCache(path, verify=True)) == committed, (kind, phase)
        assert any(path.glob("*.tmp")) == (phase != "renamed"), (kind, phase)  # the kill left its temporary
        with TeacherCacheWriter(path, vocab_size=500, k=2, shard_tokens=4, resume=True) as w:
            assert w.n_examples == committed
            assert not any(path.glob("*.tmp"))  # the resumed writer removed the dead one's temporaries
            for i in range(w.n_examples, N_EXAMPLES):
                w.add(torch.tensor([[i, 250 + i]] * 2), torch.full((2, 2), -1.0))
        cache = TeacherCache(path, verify=True)
        firsts = [int(cache[i]["teacher_ids"][0, 0]) for i in range(len(cache))]
        assert firsts == list(range(N_EXAMPLES)), (kind, phase, firsts)  # 0 lost, 0 duplicated, in order
        for i in range(len(cache)):
            assert torch.equal(cache[i]["teacher_ids"], torch.tensor([[i, 250 + i]] * 2))
