"""Build script: installs `fastkd` (with `kernels/` shipped as `fastkd.kernels`).

The optional CUDA extension `fastkd._C` (csrc/) is built by `fastkd_build.py` when nvcc is found;
without nvcc, or with FASTKD_SKIP_CUDA_BUILD=1, the package installs without it.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

packages = find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels"]
package_dir = {"fastkd": "fastkd", "fastkd.kernels": "kernels"}

ext_modules: list = []
cmdclass: dict = {}
try:
    from fastkd_build import cuda_extension_setup  # noqa: E402

    ext_modules, cmdclass = cuda_extension_setup()
except ImportError:  # the build helper is optional at this stage
    pass

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
