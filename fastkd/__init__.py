"""fastkd: a kernel-backed loss engine for knowledge distillation of large models.

Public functions are imported lazily so `import fastkd` stays cheap and never touches a GPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "distill_loss": "fastkd.distill.op",
    "DIVERGENCES": "fastkd.core.divergences",
    "fused_linear_distill_loss": "fastkd.distill.fused",
    "sparse_distill_loss": "fastkd.sparse.op",
    "fused_linear_sparse_distill_loss": "fastkd.sparse.op",
    "student_topk": "fastkd.sparse.student_ids",
    "student_topk_from_hidden": "fastkd.sparse.student_ids",
    "union_ids": "fastkd.sparse.student_ids",
    "sinkhorn": "fastkd.ot.sinkhorn",
    "SinkhornResult": "fastkd.ot.sinkhorn",
    "sinkd_loss": "fastkd.ot.losses",
    "uld_loss": "fastkd.ot.losses",
    "TAIDSchedule": "fastkd.distill.taid",
    "BackendUnavailableError": "fastkd.core.registry",
}
_SUBMODULES = {"nn", "reference", "core", "distill", "sparse", "ot", "cache", "integrations", "kernels", "cli"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"fastkd.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


if TYPE_CHECKING:  # for type checkers and IDEs
    # ruff: noqa: F401
    from fastkd.core.divergences import DIVERGENCES
    from fastkd.core.registry import BackendUnavailableError
    from fastkd.distill.fused import fused_linear_distill_loss
    from fastkd.distill.op import distill_loss
    from fastkd.distill.taid import TAIDSchedule
    from fastkd.ot.losses import sinkd_loss, uld_loss
    from fastkd.ot.sinkhorn import SinkhornResult, sinkhorn
    from fastkd.sparse.op import fused_linear_sparse_distill_loss, sparse_distill_loss
    from fastkd.sparse.student_ids import student_topk, student_topk_from_hidden, union_ids
