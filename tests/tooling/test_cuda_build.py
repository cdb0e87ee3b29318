"""CPU-side tests of the CUDA extension plumbing: build helper (fastkd_build.py), loader (fastkd._cpp_lib),
backend registration and reasons. A real nvcc compile of one .cu runs only with FASTKD_TEST_NVCC=1."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastkd
from fastkd import _cpp_lib
from fastkd.core.params import DIVERGENCE_CODES, DistillParams
from fastkd.core.registry import BackendUnavailableError, cuda_ext_reasons

ROOT = Path(__file__).resolve().parents[2]


def _load_build_helper():
    spec = importlib.util.spec_from_file_location("fastkd_build_under_test", ROOT / "fastkd_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _load_build_helper()


@pytest.fixture
def no_ext(monkeypatch):
    """The loader in a state without the extension (whatever this machine has)."""
    monkeypatch.setenv("FASTKD_DISABLE_CUDA_EXT", "1")
    monkeypatch.setenv("FASTKD_CUDA_JIT", "0")
    _cpp_lib.reset()
    yield
    _cpp_lib.reset()


# ---------------------------------------------------------------------------------------------------------
# build helper
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "want"), [
    (None, ["90"]), ("", ["90"]), ("90", ["90"]), ("9.0", ["90"]), ("sm_90a", ["90a"]),
    ("90a;80", ["90a", "80"]), ("8.0 9.0+PTX", ["80", "90+PTX"]), ("90,90", ["90"]),
    ("compute_100a", ["100a"]), ("12.0", ["120"])])
def test_parse_archs(spec, want):
    assert B.parse_archs(spec) == want


@pytest.mark.parametrize("spec", ["nine", "9", "60", "90b", ";;"])
def test_parse_archs_rejects(spec):
    with pytest.raises(ValueError, match="FASTKD_CUDA_ARCHS"):
        B.parse_archs(spec)


def test_gencode_flags():
    assert B.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert B.gencode_flags(["80", "90+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]


def test_max_jobs(monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    assert B.max_jobs(cpu_count=16, avail_gb=4.0) == 2  # memory-bound: 1.5 GB per nvcc job
    assert B.max_jobs(cpu_count=2, avail_gb=100.0) == 2
    assert B.max_jobs(cpu_count=8, avail_gb=0.5) == 1
    monkeypatch.setenv("MAX_JOBS", "5")
    assert B.max_jobs(cpu_count=1, avail_gb=0.1) == 5
    monkeypatch.setenv("MAX_JOBS", "lots")
    with pytest.raises(ValueError, match="MAX_JOBS"):
        B.max_jobs()


def test_sources_and_ninja_file(tmp_path):
    srcs = B.sources()
    names = {p.name for p in srcs}
    assert {"distill.cu", "sparse.cu", "sinkhorn.cu", "bindings.cpp"} <= names
    path = B.write_ninja(tmp_path, srcs, "/opt/cuda/bin/nvcc", B.compile_flags(["90a"], "13.0"),
                         ["-I/inc", "-DX=1"], tmp_path / "_C.so")
    text = path.read_text()
    assert "-gencode=arch=compute_90a,code=sm_90a" in text and "-std=c++17" in text
    for src in srcs:
        assert f"build {tmp_path / (src.name + '.o')}: cu {src}" in text.replace("$:", ":")
    assert "extra = -I/inc -DX=1" in text  # bindings-only flags
    assert re.search(r"build .*_C\.so: link", text)


def test_setup_hook_skips_cheaply(monkeypatch):
    monkeypatch.setenv("FASTKD_SKIP_CUDA_BUILD", "1")
    assert B.cuda_extension_setup() == ([], {})
    monkeypatch.setenv("FASTKD_SKIP_CUDA_BUILD", "0")
    monkeypatch.setattr(B, "find_nvcc", lambda: None)
    assert B.cuda_extension_setup() == ([], {})


def test_setup_hook_build_failure_warns_and_installs(monkeypatch, tmp_path):
    from setuptools import Distribution

    monkeypatch.delenv("FASTKD_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(B, "find_nvcc", lambda: "/nonexistent/nvcc")
    exts, cmdclass = B.cuda_extension_setup()
    assert [e.name for e in exts] == ["fastkd._C"] and "build_ext" in cmdclass

    def boom(*a, **k):
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(B, "build", boom)
    cmd = cmdclass["build_ext"](Distribution({"ext_modules": exts}))
    cmd.build_temp = str(tmp_path / "tmp")
    cmd.build_lib = str(tmp_path / "lib")
    cmd.ensure_finalized()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cmd.build_extension(exts[0])  # must not raise
    assert any("nvcc exploded" in str(w.message) for w in caught)


def test_cli_without_arguments_prints_help():
    out = subprocess.run([sys.executable, str(ROOT / "fastkd_build.py")], capture_output=True, text=True)
    assert out.returncode == 2 and "--check" in out.stdout


def test_enum_codes_match_the_header():
    header = (ROOT / "csrc" / "fastkd.h").read_text()
    kernel = (ROOT / "csrc" / "distill.cu").read_text()  # the divergence enum lives with its only user
    enum = dict(re.findall(r"k(\w+) = (\d+)", kernel.split("enum Divergence")[1].split("};")[0]))
    assert {k.lower(): int(v) for k, v in enum.items()} == DIVERGENCE_CODES
    dtypes = dict(re.findall(r"k(Float32|BFloat16|Float16|Float64) = (\d+)", header))
    assert {k.lower(): int(v) for k, v in dtypes.items()} == _cpp_lib.DTYPE_CODES
    assert _cpp_lib.dtype_code(torch.bfloat16) == 1 and _cpp_lib.dtype_code(torch.float64) == 3


# ---------------------------------------------------------------------------------------------------------
# loader and backends without the extension
# ---------------------------------------------------------------------------------------------------------


def test_load_error_and_build_info_without_extension(no_ext):
    err = _cpp_lib.load_error()
    assert err is not None and "FASTKD_DISABLE_CUDA_EXT" in err and "FASTKD_CUDA_JIT=0" in err
    info = _cpp_lib.build_info()
    assert info["state"] == "unavailable" and info["error"] == err
    with pytest.raises(RuntimeError, match="unavailable"):
        _cpp_lib.lib()


def test_jit_reasons(monkeypatch):
    monkeypatch.setenv("FASTKD_CUDA_JIT", "1")
    if B.find_nvcc() is None:
        assert "nvcc" in _cpp_lib.jit_unavailable_reason()
    elif not torch.cuda.is_available():
        assert "no CUDA device" in _cpp_lib.jit_unavailable_reason()
    monkeypatch.setenv("FASTKD_CUDA_JIT", "0")
    assert "disabled" in _cpp_lib.jit_unavailable_reason()


def test_cuda_ext_reasons_list_extension_and_device(no_ext):
    x = torch.randn(2, 5)
    reasons = cuda_ext_reasons(x)
    assert len(reasons) == 2 and "fastkd._C" in reasons[0] and "tensor on cpu" in reasons[1]


def test_distill_backend_cuda_raises_with_reasons(no_ext):
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    with pytest.raises(BackendUnavailableError) as exc:
        fastkd.distill_loss(s, t, backend="cuda")
    msg = str(exc.value)
    assert "backend 'cuda'" in msg and "fastkd._C" in msg and "tensor on cpu" in msg


@pytest.mark.host_device
def test_backend_modules_import_and_report(no_ext):
    from fastkd.core import registry
    from fastkd.core.params import SparseParams
    from fastkd.core.registry import implementations
    from fastkd.distill import cuda_impl as cuda_distill
    from fastkd.ot import cuda_impl as cuda_sinkhorn
    from fastkd.ot.sinkhorn import SinkhornParams
    from fastkd.sparse import cuda_impl as cuda_sparse

    assert implementations("distill")["cuda"].fn is cuda_distill.distill_forward
    s = torch.randn(4, 9, dtype=torch.float64)
    r = cuda_distill.distill_reasons(student=s, teacher=s, params=DistillParams())
    assert any("float64" in x for x in r) and any("cpu" in x for x in r)
    # the topk_tail vocabulary limit is the extension's own SPARSE_MAX_TAIL_VOCAB (no copy of the constant)
    wide = torch.empty(2, 1001, dtype=torch.float16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_sparse, "cuda_ext_reasons", lambda *t: [])
        mp.setattr(registry, "cuda_ext_reasons", lambda *t: [])  # the generic reasons' toolchain check
        mp.setattr(_cpp_lib, "lib", lambda: SimpleNamespace(SPARSE_MAX_TAIL_VOCAB=1000))
        r = cuda_sparse.sparse_reasons(student=wide, ids=torch.zeros(2, 3, dtype=torch.long),
                                       params=SparseParams(mode="topk_tail"))
        assert r == ["mode='topk_tail' supports vocabularies up to 1000 on the cuda backend (shared-memory id "
                     "bitmap), got 1001"]
        assert cuda_sparse.sparse_reasons(student=wide[:, :1000], ids=torch.zeros(2, 3, dtype=torch.long),
                                          params=SparseParams(mode="topk_tail")) == []
    cost = torch.rand(2, 30000, 3)
    r = cuda_sinkhorn.sinkhorn_reasons(a=torch.rand(2, 30000), cost=cost, params=SinkhornParams(unroll=True))
    assert any("unroll" in x for x in r) and any("shared memory" in x for x in r)
    r = cuda_sinkhorn.sinkhorn_reasons(cost=cost.half(), params=SinkhornParams())
    assert any("float16" in x for x in r)


def test_auto_dispatch_never_picks_cuda():
    from fastkd.core.registry import select

    s = torch.randn(2, 7)
    assert select("distill", "auto", student=s, teacher=s, params=DistillParams()).backend != "cuda"


# ---------------------------------------------------------------------------------------------------------
# real compile (opt-in: FASTKD_TEST_NVCC=1 and nvcc present)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("FASTKD_TEST_NVCC") != "1" or B.find_nvcc() is None,
                    reason="set FASTKD_TEST_NVCC=1 (needs nvcc) for a real compile")
def test_real_nvcc_compile_of_one_source(tmp_path):
    src = ROOT / "csrc" / "sinkhorn.cu"  # the smallest translation unit
    nvcc = B.find_nvcc()
    B.write_ninja(tmp_path, [src], nvcc, B.compile_flags(["90"], B.nvcc_version(nvcc)), [], None)
    B.run_ninja(tmp_path, jobs=1)
    obj = tmp_path / "sinkhorn.cu.o"
    assert obj.is_file() and obj.stat().st_size > 1000
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { this_is_not_cuda; }\n")
    B.write_ninja(tmp_path, [bad], nvcc, B.compile_flags(["90"], "x"), [], None)
    with pytest.raises(RuntimeError, match="this_is_not_cuda"):
        B.run_ninja(tmp_path, jobs=1)


def test_setup_hook_drops_a_failed_extension_and_skips_without_build_tools(monkeypatch, tmp_path, capsys):
    from setuptools import Distribution

    monkeypatch.delenv("FASTKD_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(B, "find_nvcc", lambda: "/nonexistent/nvcc")
    monkeypatch.setattr(B, "missing_build_tools", lambda: [])
    exts, cmdclass = B.cuda_extension_setup()
    monkeypatch.setattr(B, "build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("nvcc exploded")))
    cmd = cmdclass["build_ext"](Distribution({"ext_modules": exts}))
    cmd.build_temp, cmd.build_lib = str(tmp_path / "tmp"), str(tmp_path / "lib")
    cmd.ensure_finalized()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmd.build_extensions()
    # nothing later (the editable install's copy, the wheel's file list) may look for the missing output
    assert cmd.extensions == [] and cmd.get_outputs() == []
    monkeypatch.setattr(B, "missing_build_tools", lambda: ["pybind11 (pip install pybind11)"])
    assert B.cuda_extension_setup() == ([], {})
    assert "missing pybind11" in capsys.readouterr().err
