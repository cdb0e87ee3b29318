"""Defensive loader of the optional CUDA C++ extension ``fastkd._C`` (csrc/).

Order: the extension built at install time (``import fastkd._C``); else, when nvcc, the csrc/ sources and a
CUDA device are present, a JIT build on first use (:func:`lib`, called by the ``cuda`` backends only with
CUDA tensors — never at import) into ``$FASTKD_CACHE_DIR`` (default ``~/.cache/fastkd``), keyed by a hash of
the sources, arch list, nvcc version and Python ABI. ``FASTKD_CUDA_JIT=0`` disables the JIT build.

:func:`load_error` (used by :func:`fastkd.core.registry.cuda_ext_reasons`) returns None when the extension is
usable (loaded, or JIT-buildable) and otherwise one line saying why; :func:`build_info` feeds ``fastkd info``.
Nothing here imports torch.cuda state at import time.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

# Element-type codes of csrc/fastkd.h (enum DType), the one table every cuda backend uses.
DTYPE_CODES: dict[str, int] = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}


def dtype_code(dtype: Any) -> int:
    """The csrc/ code of a ``torch.dtype`` (KeyError for a dtype the extension has no code for)."""
    return DTYPE_CODES[str(dtype).removeprefix("torch.")]


_LOCK = threading.Lock()
_MODULE: ModuleType | None = None
_SOURCE: str | None = None  # "prebuilt" | "jit"
_IMPORT_ERROR: str | None = None
_JIT_ERROR: str | None = None
_TRIED_IMPORT = False

_REPO = Path(__file__).resolve().parent.parent  # source checkout (editable installs): csrc/ lives here


def reset() -> None:
    """Forget every load attempt (tests)."""
    global _MODULE, _SOURCE, _IMPORT_ERROR, _JIT_ERROR, _TRIED_IMPORT
    with _LOCK:
        _MODULE = _SOURCE = _IMPORT_ERROR = _JIT_ERROR = None
        _TRIED_IMPORT = False


def _try_import() -> None:
    global _MODULE, _SOURCE, _IMPORT_ERROR, _TRIED_IMPORT
    if _TRIED_IMPORT:
        return
    _TRIED_IMPORT = True
    if os.environ.get("FASTKD_DISABLE_CUDA_EXT", "0") not in ("", "0"):
        _IMPORT_ERROR = "fastkd._C is disabled by FASTKD_DISABLE_CUDA_EXT"
        return
    try:
        _MODULE = importlib.import_module("fastkd._C")
        _SOURCE = "prebuilt"
    except ImportError as exc:
        _IMPORT_ERROR = f"fastkd._C is not built ({type(exc).__name__}: {exc})"
    except Exception as exc:  # a broken binary (wrong CUDA runtime, ABI): keep the reason
        _IMPORT_ERROR = f"fastkd._C failed to load ({type(exc).__name__}: {exc})"


def _build_helper() -> ModuleType | None:
    """The top-level fastkd_build.py of a source checkout (not installed in wheels)."""
    path = _REPO / "fastkd_build.py"
    if not path.is_file() or not (_REPO / "csrc").is_dir():
        return None
    spec = importlib.util.spec_from_file_location("_fastkd_build", path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def jit_unavailable_reason() -> str | None:
    """None when a JIT build can be attempted, else why not (no GPU, no nvcc, no sources, disabled)."""
    if os.environ.get("FASTKD_CUDA_JIT", "1") in ("", "0"):
        return "JIT build disabled (FASTKD_CUDA_JIT=0)"
    if not (_REPO / "csrc").is_dir() or not (_REPO / "fastkd_build.py").is_file():
        return "no csrc/ sources to JIT-build from (wheel install)"
    helper = _build_helper()
    if helper is None or helper.find_nvcc() is None:
        return "nvcc not found for a JIT build (set CUDA_HOME)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device to JIT-build for"
    return None


def load_error() -> str | None:
    """None when ``fastkd._C`` is loaded or can be JIT-built on first use; else one line saying why not."""
    with _LOCK:
        _try_import()
        if _MODULE is not None:
            return None
        if _JIT_ERROR is not None:
            return f"{_IMPORT_ERROR}; JIT build failed: {_JIT_ERROR}"
    why = jit_unavailable_reason()
    return None if why is None else f"{_IMPORT_ERROR}; {why}"


def _cache_dir() -> Path:
    base = os.environ.get("FASTKD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastkd")
    return Path(base) / "ext"


def _jit_archs(helper: ModuleType) -> list[str]:
    spec = os.environ.get("FASTKD_CUDA_ARCHS")
    if spec:
        return helper.parse_archs(spec)
    import torch

    major, minor = torch.cuda.get_device_capability()
    return [f"{major}{minor}"]


def _jit_build() -> ModuleType:
    helper = _build_helper()
    if helper is None:
        raise RuntimeError("no csrc/ sources to JIT-build from")
    archs = _jit_archs(helper)
    nvcc = helper.find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    h = hashlib.sha256()
    for src in sorted(helper.sources()) + sorted((_REPO / "csrc").glob("*.h*")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(";".join(archs).encode())
    h.update(helper.nvcc_version(nvcc).encode())
    h.update(sys.version.encode())
    out_dir = _cache_dir() / h.hexdigest()[:16]
    out = out_dir / ("_C" + helper.ext_suffix())
    if not out.is_file():
        import fcntl

        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "lock", "w") as lock:  # one builder per cache entry across processes
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.is_file():
                tmp = out_dir / ("_C.tmp" + helper.ext_suffix())
                helper.build(tmp, out_dir / "build", archs)
                os.replace(tmp, out)
    spec = importlib.util.spec_from_file_location("fastkd._C", out)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {out}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["fastkd._C"] = mod
    return mod


def lib() -> ModuleType:
    """The loaded ``fastkd._C`` module, JIT-building it if needed; RuntimeError saying why it cannot."""
    global _MODULE, _SOURCE, _JIT_ERROR
    with _LOCK:
        _try_import()
        if _MODULE is not None:
            return _MODULE
        if _JIT_ERROR is not None:
            raise RuntimeError(f"fastkd._C is unavailable: {_IMPORT_ERROR}; JIT build failed: {_JIT_ERROR}")
    why = jit_unavailable_reason()
    if why is not None:
        raise RuntimeError(f"fastkd._C is unavailable: {_IMPORT_ERROR}; {why}")
    with _LOCK:
        if _MODULE is None:
            try:
                _MODULE = _jit_build()
                _SOURCE = "jit"
            except Exception as exc:
                _JIT_ERROR = f"{type(exc).__name__}: {exc}"
                raise RuntimeError(f"fastkd._C JIT build failed: {exc}") from exc
        return _MODULE


def build_info() -> dict[str, Any]:
    """Loader state and, when loaded, the module's compiled-in metadata (archs, nvcc, build time)."""
    err = load_error()
    state = "loaded" if _MODULE is not None else ("JIT-build on first use" if err is None else "unavailable")
    info: dict[str, Any] = {"state": state}
    if _MODULE is not None:
        info["source"] = _SOURCE
        info["path"] = getattr(_MODULE, "__file__", None)
        try:
            info.update(_MODULE.build_info())
        except Exception as exc:
            info["build_info_error"] = f"{type(exc).__name__}: {exc}"
    elif err:
        info["error"] = err
    return info
