"""The README's usage example runs as written."""

from __future__ import annotations

import pathlib
import re


def test_readme_usage_block_runs():
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_points_inside_the_repo_and_documents_the_namespace_pitfall():
    root = pathlib.Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    assert "../shared" not in text and "docs/DESIGN.md" in text and (root / "docs" / "DESIGN.md").is_file()
    assert "namespace package" in text and "-P" in text and "make bench" in text and ".png" in text


def test_a_folder_named_fastkd_in_cwd_shadows_the_install_and_python_P_avoids_it(tmp_path):
    # the README's warning, reproduced: the folder holding a clone named `fastkd` has `fastkd/` in it
    import os
    import subprocess
    import sys

    if sys.version_info < (3, 11):
        import pytest

        pytest.skip("python -P needs Python 3.11")
    clone = tmp_path / "fastkd"
    (clone / "bench").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    code = "import fastkd; print(hasattr(fastkd, 'distill_loss'))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    plain = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    safe = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert plain.stdout.strip() == "False"  # the empty namespace package won
    assert safe.returncode == 0 and safe.stdout.strip() == "True", safe.stderr
