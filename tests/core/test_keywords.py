"""The shared keyword arguments are written once (fastkd.core.docs): every public loss that takes one has its
default, documents it once from the shared piece, and the params record's fields agree with them.

Not covered: the OT losses (``sinkd_loss``, ``uld_loss``: their ``temperature`` is the cost's, default 2.0) and
the on-policy estimators (their own keyword set, :mod:`fastkd.onpolicy`).
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

LOSSES = {
    "distill_loss": (fastkd.distill_loss, docs.DENSE_KEYWORDS),
    "fused_linear_distill_loss": (fastkd.fused_linear_distill_loss, docs.DENSE_KEYWORDS),
    "sparse_distill_loss": (fastkd.sparse_distill_loss, docs.SPARSE_KEYWORDS),
    "fused_linear_sparse_distill_loss": (fastkd.fused_linear_sparse_distill_loss, docs.SPARSE_KEYWORDS),
    "vocab_parallel_distill_loss": (VP.vocab_parallel_distill_loss, docs.VOCAB_PARALLEL_KEYWORDS),
    "vocab_parallel_fused_linear_distill_loss": (VP.vocab_parallel_fused_linear_distill_loss,
                                                 docs.VOCAB_PARALLEL_KEYWORDS),
}


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
