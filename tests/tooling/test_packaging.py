"""Packaging: the top-level kernels/ and bench/ folders are fastkd.kernels and fastkd.bench, never top-level
packages of their own — from a clone's root, from elsewhere, in an editable install and in a wheel.

Hugging Face's `kernels` (a transformers 5 dependency) is the package a top-level kernels/ would shadow; the
tests that need it skip when it is absent.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _py(code: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    full.pop("PYTHONSAFEPATH", None)  # the current directory must be on sys.path, as for a user
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_clone_root_never_shadows_a_top_level_kernels():
    # from the root, sys.path[0] is the clone: kernels/ and bench/ must be at most namespace portions
    code = ("import importlib.util as u, pathlib, sys\n"
            "root = pathlib.Path.cwd().resolve()\n"
            "for name in ('kernels', 'bench'):\n"
            "    spec = u.find_spec(name)\n"
            "    assert spec is None or spec.origin is None or not pathlib.Path(spec.origin).resolve()"
            ".is_relative_to(root / name), (name, spec.origin)\n"
            "import fastkd.kernels.distill, fastkd.bench.harness\n"
            "assert pathlib.Path(fastkd.kernels.distill.__file__).resolve().parent == root / 'kernels'\n"
            "print('ok')")
    out = _py(code, ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not (_has_dist("kernels") and _has_dist("transformers")),
                    reason="needs Hugging Face's kernels package and transformers")
def test_transformers_hub_kernels_import_from_clone_root():
    code = ("import kernels, transformers.integrations.hub_kernels\n"
            "from transformers import LlamaConfig\n"
            "from kernels import CUDAProperties\n"
            "print(kernels.__file__)")
    out = _py(code, ROOT)
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).resolve().is_relative_to(ROOT / "kernels")


def _build(hook: str, out_dir: Path) -> Path:
    """Run a PEP 517/660 setuptools hook in the current environment (what `pip --no-build-isolation` does)."""
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out_dir)!r}))"
    out = _py(code, ROOT, env={"FASTKD_SKIP_CUDA_BUILD": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out_dir / out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build("build_wheel", tmp)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"fastkd"}, tops  # no top-level kernels/ or bench/ in the wheel
    assert "fastkd/kernels/distill.py" in names and "fastkd/bench/harness.py" in names
    assert "fastkd/bench/model_h200.json" in names
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_wheel_imports_kernels_and_bench_from_elsewhere(wheel_site, tmp_path):
    code = ("import pathlib, fastkd, fastkd.kernels.distill, fastkd.bench.harness as h\n"
            f"site = pathlib.Path({str(wheel_site)!r}).resolve()\n"
            "assert pathlib.Path(fastkd.__file__).resolve().is_relative_to(site), fastkd.__file__\n"
            "assert pathlib.Path(fastkd.kernels.distill.__file__).resolve().is_relative_to(site)\n"
            "assert h.SOURCE_ROOT is None and h.RESULTS_DIR == pathlib.Path.cwd() / 'fastkd-bench-results'\n"
            "print(sorted(h.discover_families()))")
    out = _py(code, tmp_path, env={"PYTHONPATH": str(wheel_site)})
    assert out.returncode == 0, out.stderr
    assert "distill" in out.stdout and "sinkhorn" in out.stdout


def test_wheel_fastkd_bench_runs(wheel_site, tmp_path):
    env = {"PYTHONPATH": str(wheel_site)}
    help_ = subprocess.run([sys.executable, "-m", "fastkd", "bench", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, env={**os.environ, **env}, timeout=120)
    assert help_.returncode == 0 and "--families" in help_.stdout, help_.stderr
    model = subprocess.run([sys.executable, "-m", "fastkd", "bench", "--model", "h200", "--help"], cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert model.returncode == 0, model.stderr


def test_clone_root_source_with_a_wheel_installed_finds_its_kernels(wheel_site):
    # the clone's fastkd/ comes first from its root: fastkd.kernels must then be the clone's kernels/
    code = ("import pathlib, fastkd, fastkd.kernels.sparse as k\n"
            "root = pathlib.Path.cwd().resolve()\n"
            "assert pathlib.Path(fastkd.__file__).resolve().parent == root / 'fastkd'\n"
            "assert pathlib.Path(k.__file__).resolve().parent == root / 'kernels'\n"
            "print('ok')")
    out = _py(code, ROOT, env={"PYTHONPATH": str(wheel_site)})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_editable_build_without_isolation(tmp_path):
    # setuptools runs every egg_info writer, HF kernels' `kernels.lock` among them: with the root first on
    # sys.path that used to load kernels/ instead and fail (`No module named 'kernels._internals'`)
    wheel = _build("build_editable", tmp_path)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import site, sys, pathlib\n"
            f"site.addsitedir({str(site)!r})\n"
            "import fastkd.kernels.distill as k, fastkd.bench.harness as h\n"
            f"root = pathlib.Path({str(ROOT)!r})\n"
            "assert pathlib.Path(k.__file__).resolve().parent == root / 'kernels'\n"
            "assert h.SOURCE_ROOT == root\n"
            "print('ok')")
    out = _py(code, tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_triton_floor_is_declared_once_and_enforced(monkeypatch):
    import re

    import fastkd.core.registry as reg

    floor = ".".join(map(str, reg.TRITON_MIN))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert set(re.findall(r'"triton>=([\d.]+)"', pyproject)) == {floor}
    assert re.search(rf"^TRITON_MIN := {re.escape(floor)}\.\d+$", (ROOT / "Makefile").read_text(), re.M)
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    reg.triton_import_error.cache_clear()
    try:
        reason = reg.triton_import_error()
        assert reason and "3.5.1" in reason and floor in reason
        assert any("3.5.1" in r for r in reg.triton_reasons())
    finally:
        monkeypatch.undo()
        reg.triton_import_error.cache_clear()
    assert reg.triton_import_error() is None


def test_import_kernels_gives_modules_or_a_reason(monkeypatch):
    """A Triton backend's modules come from registry.import_kernels: the modules and no reason, or Nones and the
    reason naming what failed (a module that does not import, or a Triton below the floor)."""
    from fastkd.core import registry as reg

    pytest.importorskip("triton")
    mods, reason = reg.import_kernels("triton", "fastkd.kernels.onpolicy")
    assert reason is None and mods[1].__name__ == "fastkd.kernels.onpolicy"
    mods, reason = reg.import_kernels("triton", "fastkd.kernels.no_such_kernel")
    assert mods == (None, None) and "fastkd.kernels.no_such_kernel failed to import" in reason
    monkeypatch.setattr(reg, "triton_import_error", lambda: "triton 3.5.1 is older than the supported 3.6")
    assert reg.import_kernels("fastkd.kernels.sparse") == ((None,), "triton 3.5.1 is older than the supported 3.6")
