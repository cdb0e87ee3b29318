"""The `fastkd` command: info, check, bench argument errors, cache-teacher."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from fastkd import cli, info


def test_python_m_fastkd_info_lists_every_op_and_backend():
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "fastkd", "info"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("fastkd", "torch", "triton", "python", "distill", "fused_linear", "sparse", "sinkhorn",
                 "CUDA extension", "cpu", "geomloss", "transformers", "trl", "liger-kernel", "pot",
                 "auto dispatch"):
        assert word in proc.stdout
    if not __import__("torch").cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0":
        assert "Triton needs CUDA tensors" in proc.stdout  # the reason, not just "no"


@pytest.mark.host_device
def test_backend_status_reasons_on_cpu():
    st = info.backend_status("distill", info.default_device())
    assert st["torch"] == []
    assert set(st) == {"torch", "triton", "cuda"}
    assert all(isinstance(r, list) for r in st.values())


@pytest.mark.host_device
def test_check_passes_and_prints_errors(capsys):
    assert cli.main(["check", "--ops", "distill,sinkhorn"]) == 0
    out = capsys.readouterr().out
    assert "pass" in out and "distill" in out and "FAIL" not in out


@pytest.mark.host_device
def test_check_fails_with_exit_1_on_a_wrong_backend(monkeypatch, capsys):
    def bad(backend, device, gen):
        return [info.CheckResult("distill", backend, "rigged", 0.5, 1e-4)]

    def raises(backend, device, gen):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(info._CHECKS, "distill", bad)
    assert cli.main(["check", "--ops", "distill"]) == 1
    assert "FAIL" in capsys.readouterr().out
    monkeypatch.setitem(info._CHECKS, "distill", raises)
    results, _ = info.run_checks(info.default_device(), ("distill",))
    assert results and not results[0].ok and "kernel exploded" in results[0].error
    assert math.isnan(results[0].max_err)


@pytest.mark.parametrize("argv", [[], ["nosuch"], ["bench", "--budget", "-1"], ["bench", "--threads", "x"],
                                  ["bench", "--quick", "--design"], ["check", "--device", "tpu"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_values_exit_nonzero_with_a_message(capsys):
    assert cli.main(["bench", "--families", "nosuch"]) == 2
    assert "unknown bench families" in capsys.readouterr().out
    assert cli.main(["bench", "--quick", "--families", "distill", "--modes", "sideways"]) == 2
    assert "--modes" in capsys.readouterr().out
    assert cli.main(["check", "--ops", "bogus"]) == 2
    assert "unknown ops" in capsys.readouterr().out
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli.main(["check", "--device", "cuda"])


def test_cache_teacher_is_registered(capsys):
    parser = cli.build_parser()
    assert "cache-teacher" in parser._subparsers._group_actions[0].choices
    try:
        import fastkd.cache.cli  # noqa: F401
    except ImportError:
        assert cli.main(["cache-teacher", "--out", "x"]) == 2
        assert "fastkd.cache.cli is not available" in capsys.readouterr().err


def test_auto_dispatch_says_why_it_skipped_a_backend(caplog):
    import logging

    import torch

    import fastkd
    from fastkd.core import registry

    s, t = torch.randn(3, 7), torch.randn(3, 7)
    with caplog.at_level(logging.DEBUG, logger="fastkd"):
        fastkd.distill_loss(s, t, "fkl")
    text = caplog.text
    assert "skipped triton" in text and "not CUDA tensors" in text and "using torch" in text
    chosen, skipped = info.auto_choice("distill", torch.device("cpu"))
    assert chosen == "torch" and dict(skipped)["triton"]
    import fastkd.ot.sinkhorn  # noqa: F401  (declares the sinkhorn backends)

    impl, why = registry.auto_choice("sinkhorn", cost=torch.rand(1, 3, 3))
    assert impl.backend == "torch" and [b for b, _ in why][:1] == ["triton"]


def test_explicit_gpu_backend_on_cpu_tensors_suggests_auto(monkeypatch):
    import torch

    import fastkd

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at dispatch: CPU tensors are then not Triton's
    with pytest.raises(fastkd.BackendUnavailableError, match='backend="auto"'):
        fastkd.distill_loss(torch.randn(2, 5), torch.randn(2, 5), "fkl", backend="triton")
    with pytest.raises(fastkd.BackendUnavailableError, match='backend="auto"'):
        fastkd.distill_loss(torch.randn(2, 5), torch.randn(2, 5), "fkl", backend="cuda")


def test_bench_help_comes_from_bench_and_bench_never_imports_the_cli(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--families" in out and "--no-plot" in out and "docs/DESIGN.md" in out
    # a fresh interpreter: importing every bench module must not import fastkd.cli (no import circle)
    code = ("import sys, fastkd.bench.harness, fastkd.bench.plot, fastkd.bench.bench_distill, "
            "fastkd.bench.bench_fused_linear, fastkd.bench.bench_sparse, fastkd.bench.bench_sinkhorn; "
            "print('fastkd.cli' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_cache_teacher_help_is_plain_text(capsys):
    pytest.importorskip("fastkd.cache.cli")
    from fastkd.cache.cli import plain_text

    with pytest.raises(SystemExit) as exc:
        cli.main(["cache-teacher", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "add_from_hidden" in out and "--model" in out
    assert ":meth:" not in out and "``" not in out and ":class:" not in out
    assert plain_text(":meth:`~a.b.C.d`, :class:`x <a.X>`, ``y``") == "d, x, y"
