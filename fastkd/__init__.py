"""fastkd: a kernel-backed loss engine for knowledge distillation of large models.

Public functions are imported lazily so `import fastkd` stays cheap and never touches a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Top-level folders of the source tree that are fastkd's subpackages: a wheel installs kernels/ as
# fastkd/kernels/ and bench/ as fastkd/bench/. Neither folder has an __init__.py, so from a clone's root
# (current directory on sys.path) it is at most a namespace portion, which never shadows an installed
# regular package of the same name (Hugging Face's `kernels`, which transformers imports). When this
# package runs from a source tree (a clone or an editable install) they are registered here.
_SOURCE_SUBPACKAGES = {"kernels": "distill.py", "bench": "harness.py"}


def _register_source_subpackages() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    for name, marker in _SOURCE_SUBPACKAGES.items():
        full = f"{__name__}.{name}"
        folder = os.path.join(root, name)
        if full in sys.modules or os.path.isdir(os.path.join(here, name)):
            continue  # installed from a wheel, or already registered
        if not os.path.isfile(os.path.join(folder, marker)):
            continue
        spec = importlib.util.spec_from_loader(full, None, is_package=True)
        spec.submodule_search_locations = [folder]
        sys.modules[full] = importlib.util.module_from_spec(spec)


_register_source_subpackages()

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
    "logprobs_from_hidden": "fastkd.onpolicy.op",
    "on_policy_distill_loss": "fastkd.onpolicy.estimators",
    "sinkhorn": "fastkd.ot.sinkhorn",
    "SinkhornResult": "fastkd.ot.sinkhorn",
    "sinkd_loss": "fastkd.ot.losses",
    "uld_loss": "fastkd.ot.losses",
    "TAIDSchedule": "fastkd.distill.taid",
    "BackendUnavailableError": "fastkd.core.registry",
}
_SUBMODULES = {"nn", "reference", "core", "distill", "sparse", "ot", "cache", "integrations", "onpolicy", "kernels",
               "bench", "cli"}

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
    from fastkd.onpolicy.estimators import on_policy_distill_loss
    from fastkd.onpolicy.op import logprobs_from_hidden
    from fastkd.ot.losses import sinkd_loss, uld_loss
    from fastkd.ot.sinkhorn import SinkhornResult, sinkhorn
    from fastkd.sparse.op import fused_linear_sparse_distill_loss, sparse_distill_loss
    from fastkd.sparse.student_ids import student_topk, student_topk_from_hidden, union_ids
