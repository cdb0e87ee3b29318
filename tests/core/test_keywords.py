"""The shared keyword arguments are written once (fastkd.core.docs): every public loss that takes one has its
default, documents it once from the shared piece, and the params record's fields agree with them.

Not covered: the OT losses (``sinkd_loss``, ``uld_loss``: their ``temperature`` is the cost's, default 2.0). The
on-policy functions take the pieces whose meaning is theirs (``on_policy_distill_loss``: mask, reduction,
num_items_in_batch) and write out the rest (temperature: the student's only; backend: no "cuda").
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import fastkd
from fastkd.core import docs
from fastkd.core.divergences import HYPER_NAMES
from fastkd.core.params import DistillParams, SparseParams
from fastkd.distill import vocab_parallel as VP
from fastkd.onpolicy import estimators as OE
from fastkd.onpolicy import vocab_parallel as OVP

LOSSES = {
    "distill_loss": (fastkd.distill_loss, docs.DENSE_KEYWORDS),
    "fused_linear_distill_loss": (fastkd.fused_linear_distill_loss, docs.DENSE_KEYWORDS),
    "sparse_distill_loss": (fastkd.sparse_distill_loss, docs.SPARSE_KEYWORDS),
    "fused_linear_sparse_distill_loss": (fastkd.fused_linear_sparse_distill_loss, docs.SPARSE_KEYWORDS),
    "vocab_parallel_distill_loss": (VP.vocab_parallel_distill_loss, docs.VOCAB_PARALLEL_KEYWORDS),
    "vocab_parallel_fused_linear_distill_loss": (VP.vocab_parallel_fused_linear_distill_loss,
                                                 docs.VOCAB_PARALLEL_KEYWORDS),
    "on_policy_distill_loss": (fastkd.on_policy_distill_loss, OE.SHARED_KEYWORDS),
}
ONPOLICY = {"logprobs_from_hidden": fastkd.logprobs_from_hidden,
            "on_policy_distill_loss": fastkd.on_policy_distill_loss,
            "vocab_parallel_logprobs_from_hidden": OVP.vocab_parallel_logprobs_from_hidden,
            "iw_opd_weights": OE.iw_opd_weights}


@pytest.mark.parametrize("name", ONPOLICY)
def test_onpolicy_keywords_have_the_shared_defaults_and_one_entry(name):
    """The on-policy functions: a shared keyword name has its shared default, is keyword-only and one Args entry
    (``name:`` opening an entry line or after ``; `` in one; from the piece where the meaning is the same, written
    out where it differs), or is documented by reference ("Other arguments: as ...")."""
    fn = ONPOLICY[name]
    params = inspect.signature(fn).parameters
    doc = fn.__doc__
    by_reference = "Other arguments: as " in doc
    for kw in docs.KEYWORDS.values():
        p = params.get(kw.name)
        if p is None or p.kind is not p.KEYWORD_ONLY and p.default is p.empty:
            continue  # absent, or a required argument of the function's own (iw_opd_weights' mask)
        assert p.default == kw.default and p.kind is p.KEYWORD_ONLY, (name, kw.name, p)
        entries = re.findall(rf"(?:^ {{8}}|; ){kw.name}:", doc, flags=re.M)
        assert len(entries) == 1 or not entries and by_reference, (name, kw.name, entries)
    assert set(getattr(fn, "__shared_keywords__", ())) <= set(params)


@pytest.mark.parametrize("name", LOSSES)
def test_shared_keywords_have_the_shared_defaults(name):
    fn, shared = LOSSES[name]
    params = inspect.signature(fn).parameters
    for kw in docs.KEYWORDS.values():
        if kw.name in params:
            assert params[kw.name].default == kw.default, (name, kw.name, params[kw.name].default)
            assert params[kw.name].kind is inspect.Parameter.KEYWORD_ONLY, (name, kw.name)
    assert set(shared) <= set(params), (name, set(shared) - set(params))


@pytest.mark.parametrize("name", LOSSES)
def test_shared_keywords_are_documented_once_from_the_pieces(name):
    fn, shared = LOSSES[name]
    assert fn.__shared_keywords__ == shared
    doc = fn.__doc__
    assert "{shared}" not in doc
    assert docs.args_doc(*shared) in doc
    for n in shared:
        # an Args entry naming n (alone or in a group) stands once
        entries = re.findall(rf"^ {{8}}(?:[\w, ]*\b)?{n}\b[\w, ]*:", doc, flags=re.M)
        assert len(entries) == 1, (name, n, entries)


def test_params_records_agree_with_the_shared_keywords():
    """The record's fields that are public keywords have the keywords' defaults; every hyperparameter of the table
    is a shared keyword and a parameter of the dense losses."""
    for record in (DistillParams, SparseParams):
        for f in dataclasses.fields(record):
            if f.name in docs.KEYWORDS and f.name != "beta" or f.name in HYPER_NAMES:
                assert f.default == docs.KEYWORDS[f.name].default, (record.__name__, f.name, f.default)
    for name in HYPER_NAMES:
        assert name in docs.KEYWORDS
        for fn in (fastkd.distill_loss, fastkd.fused_linear_distill_loss):
            assert name in inspect.signature(fn).parameters


def test_none_beta_is_the_tables_default_for_every_family():
    """beta=None (the shared default) resolves to the jsd value the sparse / vocab-parallel losses had as a literal."""
    assert DistillParams("jsd").beta == SparseParams(divergence="jsd").beta == 0.5


def test_shared_keywords_builds_the_signature_and_binds_calls(monkeypatch):
    """A new shared option is one KEYWORDS entry: a function built with shared_keywords takes it with its default
    and its piece documents it."""
    monkeypatch.setitem(docs.KEYWORDS, "new_option", docs.Keyword("new_option", 3, "int"))

    @docs.shared_keywords("temperature", "new_option")
    def loss(x, *, own: int = 1, **kw):
        """Doc.

        Args:
            x: input.
            {shared}
        """
        return x, own, kw

    sig = inspect.signature(loss)
    assert list(sig.parameters) == ["x", "own", "temperature", "new_option"]
    assert sig.parameters["new_option"].default == 3
    assert loss(1) == (1, 1, {"temperature": 1.0, "new_option": 3})
    assert loss(1, own=2, new_option=5)[1:] == (2, {"temperature": 1.0, "new_option": 5})
    with pytest.raises(TypeError, match="bogus"):
        loss(1, bogus=2)
    assert "temperature: T > 0" in loss.__doc__ and "{shared}" not in loss.__doc__


def test_shared_doc_needs_its_marker():
    with pytest.raises(ValueError, match="shared"):
        @docs.shared_doc("temperature")
        def f():
            """No marker."""


MAIN = ("distill_loss", "fused_linear_distill_loss", "sparse_distill_loss", "fused_linear_sparse_distill_loss")


@pytest.mark.parametrize("name", MAIN)
def test_public_losses_take_the_shared_keywords_from_one_place(name):
    """The shared keyword parameters of the public losses are generated from docs.KEYWORDS (not written out): the
    function the user calls passes them to its implementation as ``options``; a misspelt one is a TypeError naming
    it, and the implementation declares none of them itself."""
    fn = getattr(fastkd, name)
    impl = inspect.unwrap(fn).__impl__
    own = inspect.signature(impl).parameters
    assert not set(own) & set(fn.__shared_keywords__), name
    assert any(p.kind is p.VAR_KEYWORD for p in own.values())
    with pytest.raises(TypeError, match="temperatur\\b|'temperatur'"):
        fn(None, None, None, temperatur=2.0) if "hidden" not in name else fn(None, None, temperatur=2.0)


def test_generated_signature_passes_every_argument_on():
    """Positional, own keyword and shared keyword arguments reach the implementation unchanged."""
    @docs.shared_keywords("reduction", "beta")
    def loss(a, b=2, *, own=3, **options):
        """Doc.

        Args:
            {shared}
        """
        return a, b, own, options

    assert loss(1) == (1, 2, 3, {"reduction": "mean", "beta": None})
    assert loss(1, 5, own=6, beta=0.25, reduction="sum") == (1, 5, 6, {"reduction": "sum", "beta": 0.25})
    assert loss(a=1, b=5) == (1, 5, 3, {"reduction": "mean", "beta": None})
    with pytest.raises(TypeError):
        loss(1, 2, 3)  # own is keyword-only, as written
    with pytest.raises(TypeError, match="itself"):
        @docs.shared_keywords("beta")
        def clash(a, *, beta=None, **options):
            """{shared}"""


_NEW_HYPER = '''
import inspect, dataclasses, torch, fastkd
from fastkd.core.params import DistillParams
from fastkd.distill import op as distill_op
sig = inspect.signature(fastkd.distill_loss).parameters
assert sig["gamma"].default is None and sig["gamma"].kind is inspect.Parameter.KEYWORD_ONLY
assert "gamma" in inspect.signature(fastkd.fused_linear_distill_loss).parameters
assert "gamma = test-only weight (0.25)" in " ".join(fastkd.distill_loss.__doc__.split())
assert [f.name for f in dataclasses.fields(DistillParams)][-1] == "gamma" and DistillParams().gamma == 0.25
assert "float? gamma" in distill_op._SCHEMA
g = torch.Generator().manual_seed(0)
s = torch.randn(5, 13, generator=g, requires_grad=True)
t = torch.randn(5, 13, generator=g)
a = fastkd.distill_loss(s, t, "jsd", gamma=0.75, backend="torch")
b = fastkd.distill_loss(s, t, "jsd", backend="torch")
assert torch.equal(a, b)
try:
    fastkd.distill_loss(s, t, gamma=1.5, backend="torch")
except ValueError as e:
    assert "gamma" in str(e)
else:
    raise AssertionError("gamma=1.5 accepted")
print("ok")
'''


def test_a_new_hyperparameter_is_one_edit(tmp_path):
    """Add one Hyper to a copy of the package's divergence table: the params record's field, the dense losses'
    keyword parameter, its documentation, the custom op's scalar and the range check all follow (the torch
    backend runs; a divergence that uses it would add its math to the kernels)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(fastkd.__file__).resolve().parent.parent
    shutil.copytree(root / "fastkd", tmp_path / "fastkd", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    table = tmp_path / "fastkd" / "core" / "divergences.py"
    src = table.read_text()
    line = "HYPERS: dict[str, Hyper] = {h.name: h for h in (BETA, ALPHA, MU, T)}"
    assert src.count(line) == 1
    table.write_text(src.replace(line, 'GAMMA = Hyper("gamma", 0.25, 0.0, 1.0, doc="test-only weight")\n'
                                       + line.replace("T)}", "T, GAMMA)}")))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _NEW_HYPER], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_a_familys_own_keyword_set_with_pass_through():
    """shared_keywords(keywords=...) takes another family's set (no shared pieces); pass_through keeps a ``**``
    parameter whose entries reach the implementation beside the named ones. The three server-teacher losses take
    TRL's keyword set from one place this way."""
    own = {"gain": docs.Keyword("gain", 2.0, "float")}

    @docs.shared_keywords("gain", keywords=own, pass_through=True)
    def loss(x, **options):
        """No pieces."""
        return x, options

    assert loss(1) == (1, {"gain": 2.0})
    assert loss(1, gain=3.0, other=4) == (1, {"gain": 3.0, "other": 4})
    assert loss.__doc__ == "No pieces."
    from fastkd.integrations import trl as fkd_trl

    for fn in (fkd_trl.server_loss, fkd_trl.server_top1_loss, fkd_trl.server_topk_loss):
        params = inspect.signature(fn).parameters
        for kw in fkd_trl.SERVER_KEYWORDS.values():
            assert params[kw.name].default == kw.default and params[kw.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert "{server}" not in fn.__doc__ and "add_tail_bucket" in fn.__doc__
