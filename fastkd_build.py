"""Build helper for the optional CUDA extension ``fastkd._C`` (csrc/).

Used three ways (stdlib imports only at module level, so importing it is cheap):

* ``setup.py`` calls :func:`cuda_extension_setup` → ``(ext_modules, cmdclass)``. It returns ``([], {})`` when
  ``FASTKD_SKIP_CUDA_BUILD=1`` or nvcc is not found; otherwise a ``build_ext`` that compiles csrc/ with ninja
  and, if compiling fails, warns and installs the package without the extension (never breaks pip).
* :mod:`fastkd._cpp_lib` calls :func:`build` to JIT-compile the extension into a cache directory.
* CI: ``python fastkd_build.py --check`` compiles every csrc/*.cu (and the bindings) for sm_90 into a
  temporary directory, object files only (no GPU needed), and exits non-zero on any error.

Environment: ``FASTKD_CUDA_ARCHS`` (default ``"90"``; e.g. ``"80;90a"``, ``"9.0+PTX"``), ``MAX_JOBS``
(default: from CPU count and free memory), ``CUDA_HOME`` (where to find nvcc), ``FASTKD_SKIP_CUDA_BUILD=1``.
Build metadata (arch list, nvcc version, UTC build time) is compiled into the module:
``fastkd._C.build_info()``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "90"
EXT_NAME = "fastkd._C"
_MEM_PER_JOB_GB = 1.5  # peak resident memory of one nvcc job on these sources


def sources(csrc: Path = CSRC) -> list[Path]:
    """Every translation unit of the extension: csrc/*.cu plus csrc/bindings.cpp."""
    return sorted(csrc.glob("*.cu")) + [csrc / "bindings.cpp"]


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, or /usr/local/cuda/bin (None when absent)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str) -> str:
    """'13.0' style release of ``nvcc`` ('unknown' if it cannot be parsed)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def parse_archs(spec: str | None = None) -> list[str]:
    """Normalise an arch list: "90", "9.0", "sm_90a", "90a;80", "8.0 9.0+PTX" → ["90", "80", "90+PTX"].

    Separators: ';', ',' or whitespace. Raises ValueError naming FASTKD_CUDA_ARCHS on a malformed entry.
    """
    spec = DEFAULT_ARCHS if spec is None or not spec.strip() else spec
    out: list[str] = []
    for raw in re.split(r"[;,\s]+", spec.strip()):
        if not raw:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)?([af]?)(\+PTX)?", raw, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"FASTKD_CUDA_ARCHS: cannot parse arch {raw!r} "
                             f"(expected e.g. '90', '9.0', '90a', '9.0+PTX')")
        major_minor = m.group(1) + (m.group(2) or "")
        if len(major_minor) < 2:
            raise ValueError(f"FASTKD_CUDA_ARCHS: arch {raw!r} needs a minor version (e.g. '90')")
        arch = major_minor + m.group(3).lower() + ("+PTX" if m.group(4) else "")
        if int(major_minor) < 70:
            raise ValueError(f"FASTKD_CUDA_ARCHS: arch {raw!r} is older than sm_70 (not supported)")
        if arch not in out:
            out.append(arch)
    if not out:
        raise ValueError(f"FASTKD_CUDA_ARCHS is empty: {spec!r}")
    return out


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags: SASS per arch, plus PTX for entries marked +PTX (forward compatibility)."""
    flags = []
    for arch in archs:
        base = arch.removesuffix("+PTX")
        flags.append(f"-gencode=arch=compute_{base},code=sm_{base}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{base},code=compute_{base}")
    return flags


def max_jobs(cpu_count: int | None = None, avail_gb: float | None = None) -> int:
    """Parallel compile jobs: $MAX_JOBS, else min(CPUs, available memory / 1.5 GB), at least 1."""
    env = os.environ.get("MAX_JOBS")
    if env:
        try:
            return max(1, int(env))
        except ValueError as exc:
            raise ValueError(f"MAX_JOBS must be an integer, got {env!r}") from exc
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if avail_gb is None:
        avail_gb = _available_memory_gb()
    by_mem = int(avail_gb // _MEM_PER_JOB_GB) if avail_gb is not None else cpus
    return max(1, min(cpus, by_mem))


def _available_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # pip package; provides the binary

        cand = Path(ninja.BIN_DIR) / "ninja"
        return str(cand) if cand.is_file() else None
    except ImportError:
        return None


def _ninja_escape(s: str) -> str:
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def compile_flags(archs: list[str], nvcc_ver: str, opt: str = "-O3") -> list[str]:
    """nvcc flags shared by every translation unit (metadata macros go to the bindings only)."""
    return [opt, "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo",
            *gencode_flags(archs)]


def write_ninja(build_dir: Path, srcs: list[Path], nvcc: str, flags: list[str], bind_flags: list[str],
                output: Path | None) -> Path:
    """Write build.ninja: one object per source, then (if ``output``) one shared library."""
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        "flags = " + " ".join(flags),
        "rule cu",
        "  command = $nvcc $flags $extra -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "rule link",
        "  command = $nvcc -shared $in -o $out -Xcompiler -fPIC",
        "  description = LINK $out",
    ]
    objs = []
    for src in srcs:
        obj = build_dir / (src.name + ".o")
        objs.append(obj)
        lines.append(f"build {_ninja_escape(str(obj))}: cu {_ninja_escape(str(src))}")
        if src.suffix == ".cpp":
            lines.append("  extra = " + " ".join(bind_flags))
    if output is not None:
        deps = " ".join(_ninja_escape(str(o)) for o in objs)
        lines.append(f"build {_ninja_escape(str(output))}: link {deps}")
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


def _bindings_flags(archs: list[str], nvcc_ver: str) -> list[str]:
    import pybind11  # build-time dependency (pyproject build-system requires it)

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{pybind11.get_include()}",
        f"'-DFASTKD_BUILD_ARCHS=\"{';'.join(archs)}\"'",
        f"'-DFASTKD_NVCC_VERSION=\"{nvcc_ver}\"'",
        f"'-DFASTKD_BUILD_TIME=\"{stamp}\"'",
    ]


def run_ninja(build_dir: Path, jobs: int, verbose: bool = False) -> None:
    """Run ninja in ``build_dir``; raises RuntimeError with the compiler output on failure."""
    ninja = find_ninja()
    if ninja is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    proc = subprocess.run([ninja, "-C", str(build_dir), f"-j{jobs}"], capture_output=not verbose, text=True)
    if proc.returncode != 0:
        log = (proc.stdout or "") + (proc.stderr or "")
        raise RuntimeError(f"building {EXT_NAME} failed (ninja exit {proc.returncode}):\n{log[-8000:]}")


def build(output: Path, build_dir: Path, archs: list[str] | None = None, verbose: bool = False) -> Path:
    """Compile csrc/ into the shared library ``output`` (e.g. fastkd/_C.cpython-311-x86_64-linux-gnu.so)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = archs or parse_archs(os.environ.get("FASTKD_CUDA_ARCHS"))
    ver = nvcc_version(nvcc)
    build_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_ninja(build_dir, sources(), nvcc, compile_flags(archs, ver), _bindings_flags(archs, ver), output)
    run_ninja(build_dir, max_jobs(), verbose)
    return output


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def missing_build_tools() -> list[str]:
    """What the extension build needs and this environment lacks (nvcc, pybind11, ninja), as install hints."""
    missing = []
    if find_nvcc() is None:
        missing.append("nvcc (set CUDA_HOME or put nvcc on PATH)")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        missing.append("pybind11 (pip install pybind11)")
    if find_ninja() is None:
        missing.append("ninja (pip install ninja)")
    return missing


def cuda_extension_setup() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup.py; ([], {}) when the CUDA build is skipped or impossible.

    A missing build tool skips the extension with one line naming it (pip installs with
    ``--no-build-isolation`` do not provide the build-system requirements); a compile error warns and installs
    without the extension. Neither breaks ``pip install``, editable installs included.
    """
    if os.environ.get("FASTKD_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return [], {}
    if find_nvcc() is None:
        return [], {}
    missing = missing_build_tools()
    if missing:
        print(f"WARNING: fastkd: {EXT_NAME} not built: missing {', '.join(missing)}", file=sys.stderr)
        return [], {}
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    class NinjaBuildExt(build_ext):
        """Builds fastkd._C with ninja; a compile failure warns and installs without the extension."""

        def build_extensions(self):  # noqa: D102
            self._not_built: set[str] = set()
            super().build_extensions()
            # an extension that failed is dropped, so that no later step (the editable install's copy into the
            # source tree, the wheel's file list) looks for its output
            failed = self.__dict__.get("_not_built", set())
            self.extensions = [e for e in self.extensions if e.name not in failed]

        def build_extension(self, ext):  # noqa: D102
            if ext.name != EXT_NAME:
                return super().build_extension(ext)
            out = Path(self.get_ext_fullpath(ext.name)).resolve()
            tmp = Path(self.build_temp).resolve() / "fastkd_C"
            try:
                build(out, tmp, verbose=bool(self.verbose and self.verbose > 1))
            except Exception as exc:  # never break `pip install` because of the optional extension
                self.__dict__.setdefault("_not_built", set()).add(ext.name)
                warnings.warn(f"fastkd: building the CUDA extension failed; installing without it "
                              f"(the 'cuda' backend will report why). {exc}", stacklevel=1)
                print(f"WARNING: fastkd: {EXT_NAME} not built: {exc}", file=sys.stderr)

    # sources=[] would make setuptools skip the extension; list the real ones for its dependency check.
    ext = Extension(EXT_NAME, sources=[str(p.relative_to(ROOT)) for p in sources()])
    return [ext], {"build_ext": NinjaBuildExt}


def check(archs: list[str] | None = None, jobs: int | None = None) -> int:
    """Compile every source to an object file for sm_90 (no link, no GPU); return a process exit code."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("fastkd_build --check: nvcc not found", file=sys.stderr)
        return 2
    archs = archs or ["90"]
    ver = nvcc_version(nvcc)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastkd_check_") as tmp:
        build_dir = Path(tmp)
        srcs = sources()
        write_ninja(build_dir, srcs, nvcc, compile_flags(archs, ver), _bindings_flags(archs, ver), None)
        try:
            run_ninja(build_dir, jobs or max_jobs(), verbose=True)
        except RuntimeError as exc:
            print(f"fastkd_build --check: FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"fastkd_build --check: compiled {len(srcs)} sources for {';'.join(archs)} with nvcc {ver} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compile every source for sm_90 (objects only)")
    ap.add_argument("--build", metavar="OUT_DIR", help="build the extension into OUT_DIR")
    ap.add_argument("--archs", help="arch list (default: FASTKD_CUDA_ARCHS or 90)")
    args = ap.parse_args(argv)
    archs = parse_archs(args.archs) if args.archs else None
    if args.check:
        return check(archs)
    if args.build:
        out = Path(args.build) / ("_C" + ext_suffix())
        build(out, Path(args.build) / "build", archs, verbose=True)
        print(out)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
