"""Build script: installs `fastkd` (with the top-level `kernels/` and `bench/` shipped as `fastkd.kernels` and
`fastkd.bench`).

The optional CUDA extension `fastkd._C` (csrc/) is built by `fastkd_build.py` when nvcc is found;
without nvcc, or with FASTKD_SKIP_CUDA_BUILD=1, the package installs without it.
"""

from __future__ import annotations

import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# kernels/ and bench/ have no __init__.py (so that a clone's root on sys.path never shadows an installed
# top-level `kernels` or `bench`): they are listed here by hand and become namespace subpackages of fastkd.
packages = find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels", "fastkd.bench"]
package_dir = {"fastkd": "fastkd", "fastkd.kernels": "kernels", "fastkd.bench": "bench"}
package_data = {"fastkd.bench": ["*.json", "data/*.csv", "data/*.json"]}

# The build helper is loaded from its file, not through sys.path: putting this folder first on sys.path
# would let kernels/ stand in for Hugging Face's `kernels` while setuptools loads its egg-info writer.
_spec = importlib.util.spec_from_file_location("fastkd_build", os.path.join(HERE, "fastkd_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
ext_modules, cmdclass = _build.cuda_extension_setup()

setup(packages=packages, package_dir=package_dir, package_data=package_data, ext_modules=ext_modules,
      cmdclass=cmdclass)
