"""fastkd: a kernel-backed loss engine for knowledge distillation of large models.

Public functions are imported lazily so `import fastkd` stays cheap and never touches a GPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "distill_loss": "fastkd.ops.distill",
    "DIVERGENCES": "fastkd.ops.distill",
    "fused_linear_distill_loss": "fastkd.ops.fused_linear",
    "sparse_distill_loss": "fastkd.ops.sparse",
    "fused_linear_sparse_distill_loss": "fastkd.ops.sparse",
    "sinkhorn": "fastkd.ops.sinkhorn",
    "SinkhornResult": "fastkd.ops.sinkhorn",
    "sinkd_loss": "fastkd.ops.ot_losses",
    "uld_loss": "fastkd.ops.ot_losses",
    "TAIDSchedule": "fastkd.taid",
    "BackendUnavailableError": "fastkd.backends",
}
_SUBMODULES = {"nn", "reference", "backends", "ops", "cache", "integrations", "kernels", "cli"}

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
    from fastkd.backends import BackendUnavailableError
    from fastkd.ops.distill import DIVERGENCES, distill_loss
    from fastkd.ops.fused_linear import fused_linear_distill_loss
    from fastkd.ops.ot_losses import sinkd_loss, uld_loss
    from fastkd.ops.sinkhorn import SinkhornResult, sinkhorn
    from fastkd.ops.sparse import fused_linear_sparse_distill_loss, sparse_distill_loss
    from fastkd.taid import TAIDSchedule
