"""`make gpu-check`'s own steps (bench/gpu_check.py --dry-run), on the CPU, in a venv as bare as the GPU image can
be: no hypothesis, no pybind11, no ninja. The venv sees this environment's other packages (torch, triton, pip,
setuptools) through a folder of links to them, named in a .pth file."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_HIDDEN = ("hypothesis", "pybind11", "ninja", "_hypothesis")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("bare")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    sp = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip())
    view = env_dir / "outer-site-packages"
    view.mkdir()
    for outer in site.getsitepackages():
        for entry in Path(outer).iterdir():
            name = entry.name.lower()
            if name.startswith(_HIDDEN) or name.endswith(".pth") or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry)
    (sp / "zz_outer.pth").write_text(f"{view}\n")
    return py


@pytest.mark.slow
def test_gpu_check_dry_run_in_a_bare_venv(bare_python, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    probe = subprocess.run([bare_python, "-c", "import torch, triton\ntry:\n import hypothesis\nexcept ImportError:"
                            "\n print('hidden')"], capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0 and "hidden" in probe.stdout, probe.stderr
    out = subprocess.run([bare_python, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    if subprocess.run(["which", "nvcc"], capture_output=True).returncode == 0:
        assert "missing pybind11" in text  # named up front, and the install still succeeds
    for step in ("install", "info", "pytest-gpu", "suite"):
        assert (tmp_path / f"{step}.rc").read_text().strip() in ("0", "5"), step
    pytest_log = (tmp_path / "pytest-gpu.log").read_text()
    assert "skipped" in pytest_log and "error" not in pytest_log.lower().split("skipped")[-1]


def test_gpu_check_refuses_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU" in out.stdout


def test_a_silent_hanging_step_is_stopped_at_its_timeout(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "bench" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    assert gc._run("hang", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, 1.5) == 124
    assert (tmp_path / "hang.rc").read_text().strip() == "124"
    assert gc._run("fails", [sys.executable, "-c", "print('x'); raise SystemExit(3)"], tmp_path, 30) == 3
    assert (tmp_path / "fails.log").read_text().strip() == "x"
