"""examples/distill_tiny.py --quick runs end to end and prints every student row."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


def test_distill_tiny_quick():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(root / "examples" / "distill_tiny.py"), "--quick"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("student: CE only", "student: fastkd fused KD+CE", "student: fastkd sparse top-8 cache",
                "student: fastkd ULD"):
        assert row in out.stdout, out.stdout[-2000:]
