"""Backend registry and dispatch.

Every op family (``distill``, ``fused_linear``, ``sparse``, ``sinkhorn``, ...) has implementations on one or
more backends: ``torch`` (chunked PyTorch, always available), ``triton`` (kernels/, CUDA tensors or any
tensor under ``TRITON_INTERPRET=1``) and ``cuda`` (the optional ``fastkd._C`` extension). A backend module
registers an implementation with its capabilities as attributes of the :class:`Impl` (the toolchain it
needs, the inputs that must be on its device, the dtypes it takes, an import error) plus an optional
``limits(**inputs) -> list[str]`` for what is particular to it (a size limit, an unsupported option);
:func:`not_supported_reasons` turns them into the reasons it cannot run some inputs (an empty list: it can).

Dispatch: ``backend="auto"`` (or the ``FASTKD_BACKEND`` environment variable when the argument is
``"auto"``) takes the first implementation in the op's auto order whose reasons are empty. An explicitly
requested backend that cannot run raises one :class:`BackendUnavailableError` listing every reason.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

BACKENDS = ("torch", "triton", "cuda")
logger = logging.getLogger("fastkd")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs; the message lists every reason."""


REQUIRES = ("triton", "cuda_ext")  # toolchains a backend may need (checked by triton_reasons / cuda_ext_reasons)


@dataclass(frozen=True)
class Impl:
    """One op family's implementation on one backend, with its declared capabilities.

    requires: "triton", "cuda_ext" or None (the toolchain, checked with the inputs named in ``tensors``: on
    its device); dtypes: the dtypes of the inputs named in ``dtype_inputs`` it takes (None: any);
    import_error: why its kernels did not import (then the only reason); limits: a callable ``(**inputs) ->
    list[str]`` for reasons particular to this backend.
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    limits: Callable[..., list[str]] | None = None
    doc: str = field(default="", compare=False)
    requires: str | None = None
    tensors: tuple[str, ...] = ()
    dtypes: tuple[Any, ...] | None = None
    dtype_inputs: tuple[str, ...] = ()
    import_error: str | None = None

    def not_supported_reasons(self, **inputs: Any) -> list[str]:
        """Why this backend cannot run ``inputs`` ([] = it can): :func:`not_supported_reasons`."""
        return not_supported_reasons(self, **inputs)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def not_supported_reasons(impl: Impl, **inputs: Any) -> list[str]:
    """The reasons ``impl`` cannot run ``inputs``, from its declared capabilities, then its ``limits``."""
    if impl.import_error is not None:
        return [impl.import_error]
    tensors = [inputs.get(name) for name in impl.tensors]
    reasons = (triton_reasons(*tensors) if impl.requires == "triton"
               else cuda_ext_reasons(*tensors) if impl.requires == "cuda_ext" else [])
    if impl.dtypes is not None:
        for name in impl.dtype_inputs:
            t = inputs.get(name)
            if t is not None and t.dtype not in impl.dtypes:
                hint = "" if impl.backend == "torch" else "; backend='torch' takes any float dtype"
                reasons.append(f"{name} dtype {_dtype_name(t.dtype)} is not supported by the {impl.backend} backend "
                               f"of {impl.op!r} ({', '.join(map(_dtype_name, impl.dtypes))}{hint})")
    if impl.limits is not None:
        reasons += impl.limits(**inputs)
    return reasons


_REGISTRY: dict[str, dict[str, Impl]] = {}
# Auto order per op: the fastest backend first. Ops not listed use _DEFAULT_ORDER.
_DEFAULT_ORDER = ("triton", "torch")
_AUTO_ORDER: dict[str, tuple[str, ...]] = {}
# Modules that register backends for an op; imported on first dispatch of that op.
_BACKEND_MODULES: dict[str, list[str]] = {}


def register(
    op: str,
    backend: str,
    fn: Callable[..., Any],
    limits: Callable[..., list[str]] | None = None,
    *,
    requires: str | None = None,
    tensors: tuple[str, ...] = (),
    dtypes: tuple[Any, ...] | None = None,
    dtype_inputs: tuple[str, ...] = (),
    import_error: str | None = None,
) -> Impl:
    """Register ``fn`` as ``op``'s implementation on ``backend`` with its capabilities (:class:`Impl`);
    re-registering replaces it. Returns the :class:`Impl`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if requires is not None and requires not in REQUIRES:
        raise ValueError(f"requires must be one of {REQUIRES} or None, got {requires!r}")
    impl = Impl(op, backend, fn, limits, fn.__doc__ or "", requires, tuple(tensors),
                None if dtypes is None else tuple(dtypes), tuple(dtype_inputs), import_error)
    _REGISTRY.setdefault(op, {})[backend] = impl
    return impl


def declare(op: str, modules: list[str], auto_order: tuple[str, ...] | None = None) -> None:
    """Declare the backend modules of ``op`` (imported lazily) and its auto-dispatch order."""
    _BACKEND_MODULES[op] = list(modules)
    _load.cache_clear()  # a select() before this declare must not keep an empty load cached
    if auto_order is not None:
        _AUTO_ORDER[op] = tuple(auto_order)


_LOAD_ERRORS: dict[str, str] = {}


@cache
def _load(op: str) -> None:
    # Backend modules must import cleanly without their toolchains (they register with reasons instead).
    # A module that does not exist yet simply registers nothing; any other failure is kept for `info`.
    for module in _BACKEND_MODULES.get(op, []):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                _LOAD_ERRORS[module] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            _LOAD_ERRORS[module] = f"{type(exc).__name__}: {exc}"


def implementations(op: str) -> dict[str, Impl]:
    """All registered implementations of ``op`` keyed by backend name."""
    _load(op)
    return dict(_REGISTRY.get(op, {}))


def requested_backend(backend: str | None) -> str:
    """Resolve the ``backend`` argument against ``FASTKD_BACKEND`` and validate it."""
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get("FASTKD_BACKEND", "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


def auto_choice(op: str, **inputs: Any) -> tuple[Impl, list[tuple[str, str]]]:
    """What ``backend="auto"`` picks for ``op`` on ``inputs``, and why it passed over the others.

    Returns ``(impl, skipped)`` with ``skipped`` = ``[(backend, reason), ...]`` in auto order: a backend that
    is not registered, a non-torch backend on CPU tensors (auto never picks an interpreter or a GPU backend
    for them), or one whose ``not_supported_reasons`` are non-empty. Raises :class:`BackendUnavailableError`
    when nothing (not even torch) is registered.
    """
    impls = implementations(op)
    on_gpu = any(getattr(v, "is_cuda", False) for v in inputs.values())
    order = _AUTO_ORDER.get(op, _DEFAULT_ORDER)
    skipped: list[tuple[str, str]] = []
    chosen: Impl | None = None
    for candidate in order:
        impl = impls.get(candidate)
        if impl is None:
            skipped.append((candidate, "not registered"))
            continue
        if candidate != "torch" and not on_gpu:
            skipped.append((candidate, "inputs are not CUDA tensors (auto picks it for CUDA tensors only)"))
            continue
        reasons = impl.not_supported_reasons(**inputs)
        if reasons:
            skipped.append((candidate, "; ".join(reasons)))
            continue
        chosen = impl
        break
    if chosen is None:
        if "torch" not in impls:
            raise BackendUnavailableError(f"no backend is registered for {op!r}")
        chosen = impls["torch"]
    skipped += [(b, f'not in the auto order {order} (opt in with backend="{b}")')
                for b in impls if b not in order]
    return chosen, skipped


def select(op: str, backend: str | None = "auto", **inputs: Any) -> Impl:
    """Pick the implementation of ``op`` for ``inputs`` (see the module docstring).

    With ``backend="auto"`` every backend passed over is logged at DEBUG level on the ``"fastkd"`` logger
    with its reason (``logging.getLogger("fastkd").setLevel(logging.DEBUG)`` to see why Triton was not used).
    """
    name = requested_backend(backend)
    if name == "auto":
        impl, skipped = auto_choice(op, **inputs)
        if skipped and logger.isEnabledFor(logging.DEBUG):
            for candidate, reason in skipped:
                logger.debug("fastkd auto dispatch of %r: skipped %s: %s", op, candidate, reason)
            logger.debug("fastkd auto dispatch of %r: using %s", op, impl.backend)
        return impl
    impls = implementations(op)
    impl = impls.get(name)
    if impl is None:
        raise BackendUnavailableError(f"backend {name!r} does not implement {op!r}")
    reasons = impl.not_supported_reasons(**inputs)
    if reasons:
        hint = ""
        if name != "torch" and not any(getattr(v, "is_cuda", False) for v in inputs.values()):
            hint = ' (for CPU tensors use backend="auto" or "torch": it runs everywhere)'
        raise BackendUnavailableError(
            f"backend {name!r} cannot run {op!r} on these inputs: " + "; ".join(reasons) + hint
        )
    return impl


# ---------------------------------------------------------------------------------------------------------
# Availability helpers shared by backend modules
# ---------------------------------------------------------------------------------------------------------


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TRITON_MIN = (3, 6)  # the oldest Triton the kernels are compiled and tested with (pyproject's floor)


def _version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0", "3.10.0+git1a2b" or "3.6.0rc1"."""
    found = re.match(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


@cache
def triton_import_error() -> str | None:
    """None when a supported ``triton`` imports, else the reason it does not."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "0")
    if _version_tuple(version) < TRITON_MIN:
        floor = ".".join(map(str, TRITON_MIN))
        return f"triton {version} is older than the supported {floor} (pip install 'triton>={floor}')"
    return None


def import_kernels(*modules: str) -> tuple[tuple[Any, ...], str | None]:
    """A Triton backend's modules (``"triton"``, ``"fastkd.kernels.sparse"``, ...) and None; or Nones and the
    reason they are unavailable: no supported Triton (:func:`triton_import_error`), or a module that fails to
    import under it (a broken install, a kernel that does not compile). The backend declares the reason as its
    ``import_error``."""
    error = triton_import_error()
    if error is None:
        try:
            return tuple(importlib.import_module(m) for m in modules), None
        except Exception as exc:
            error = f"{modules[-1]} failed to import ({type(exc).__name__}: {exc})"
    return (None,) * len(modules), error


def triton_reasons(*tensors: Any) -> list[str]:
    """Reasons the Triton backend cannot run on ``tensors`` (device checks, toolchain)."""
    reasons = []
    err = triton_import_error()
    if err:
        reasons.append(err)
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not triton_interpret():
            reasons.append(f"tensor on {t.device.type} (Triton needs CUDA tensors, or TRITON_INTERPRET=1)")
            break
    return reasons


def cuda_ext_reasons(*tensors: Any) -> list[str]:
    """Reasons the CUDA C++ extension backend cannot run on ``tensors``."""
    reasons = []
    try:
        from fastkd import _cpp_lib
    except ImportError:
        _cpp_lib = None
    err = "the fastkd._C extension loader is missing" if _cpp_lib is None else _cpp_lib.load_error()
    if err:
        reasons.append(err)
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            reasons.append(f"tensor on {t.device.type} (the cuda backend needs CUDA tensors)")
            break
    return reasons


def status(op: str, **inputs: Any) -> dict[str, list[str]]:
    """Each backend's reasons for ``op`` on ``inputs`` ([] = available); used by ``fastkd info``."""
    impls = implementations(op)
    return {
        name: (impls[name].not_supported_reasons(**inputs) if name in impls else ["not implemented"])
        for name in BACKENDS
    }
