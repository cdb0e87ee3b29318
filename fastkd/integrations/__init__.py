"""Optional integrations with training frameworks, imported lazily (each needs its own extra).

- :mod:`fastkd.integrations.trl`: ``generalized_jsd_loss`` (TRL GKDTrainer drop-in) and
  ``patch_gkd_trainer()``.
- :mod:`fastkd.integrations.hf`: ``DistillationTrainer``, a ``transformers.Trainer`` that distills
  through the fused LM-head path.
- :mod:`fastkd.integrations.distributed`: vocabulary-parallel losses for tensor-parallel LM heads.

Nothing here is imported by ``import fastkd``; ``import fastkd.integrations`` imports no framework.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_SUBMODULES = ("trl", "hf", "distributed")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        module = importlib.import_module(f"fastkd.integrations.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastkd.integrations' has no attribute {name!r}")
