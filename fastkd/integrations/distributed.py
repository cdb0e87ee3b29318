"""Vocabulary-parallel losses, kept importable from their former home.

The losses live with their families: :mod:`fastkd.distill.vocab_parallel` (dense logits and the fused LM head)
and, where present, :mod:`fastkd.onpolicy.vocab_parallel` (vocabulary-parallel log-probs). DTensor and
sharded-parameter handling is :mod:`fastkd.core.sharding`.
"""

from __future__ import annotations

import importlib

from fastkd.distill.vocab_parallel import (  # noqa: F401
    VP_DIVERGENCES,
    vocab_parallel_distill_loss,
    vocab_parallel_fused_linear_distill_loss,
)

__all__ = ["vocab_parallel_distill_loss", "vocab_parallel_fused_linear_distill_loss", "VP_DIVERGENCES"]

try:  # the on-policy family's vocabulary-parallel log-probs, when that module exists
    _onpolicy_vp = importlib.import_module("fastkd.onpolicy.vocab_parallel")
except ModuleNotFoundError as e:
    if e.name not in ("fastkd.onpolicy", "fastkd.onpolicy.vocab_parallel"):
        raise
else:
    globals().update({name: getattr(_onpolicy_vp, name) for name in _onpolicy_vp.__all__})
    __all__ += list(_onpolicy_vp.__all__)
