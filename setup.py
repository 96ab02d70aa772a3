"""Build hook for `pip install`: the native CPU library built with CMake, when it can be.

pyproject.toml holds all the metadata; this file only adds one optional extension,
``fastfvae/libfastfvae_native.so``, whose build runs the project's CMakeLists.txt
(``cmake -S . -B <build-temp> -DCMAKE_BUILD_TYPE=Release`` + ``cmake --build``) against the
torch of the environment being installed into. `fastfvae.ops.native` loads it from there.

The library is an optimisation (the torch reference runs without it), so the install never
fails because of it: without cmake, a C++ compiler or an importable torch, with
``FASTFVAE_BUILD_NATIVE=0``, or when CMake fails, the pure-Python package is installed, a
one-line warning says why (pip 26.3 and newer show it; older pip only with ``-v``), and the
reason is written to ``fastfvae/native_build_skipped.txt`` for ``fastfvae info`` to report.

Finding torch: pip runs this build with the interpreter it installs into, but build
isolation hides that environment's site-packages behind ``PYTHONPATH`` (a sitecustomize that
drops them from sys.path) and ``PYTHONNOUSERSITE``. Torch is not a build requirement (pip
would install a second, possibly different torch into the isolated environment, and the
library must match the torch it is loaded into), so the interpreter is asked for torch as
the build runs and, failing that, without those two variables, which is the target
environment as it will be used. A frontend that builds in a separate venv (``python -m
build``, uv) finds no torch there: the build is skipped with that reason unless
``--no-build-isolation`` is given.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = "fastfvae"
EXTENSION = f"{PACKAGE}.libfastfvae_native"
LIB_NAME = "libfastfvae_native.so"
SKIPPED_NAME = "native_build_skipped.txt"
BUILD_ENV = "FASTFVAE_BUILD_NATIVE"
HAND_BUILD = "cmake -S . -B build && cmake --build build"
COMPILERS = ("c++", "g++", "clang++")
# What pip's build isolation sets to hide the target environment's site-packages.
ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE")
TORCH_QUERY = "import torch, torch.utils; print(torch.__version__); print(torch.utils.cmake_prefix_path)"


def skip_reason(environ, which=shutil.which, source: Path = ROOT) -> str | None:
    """Why the library cannot or should not be built here (None: go ahead and build)."""
    if environ.get(BUILD_ENV, "").strip() == "0":
        return f"{BUILD_ENV}=0"
    if not (source / "CMakeLists.txt").is_file():
        return f"no CMakeLists.txt in {source}"
    if which("cmake") is None:
        return "cmake not found on PATH"
    cxx = environ.get("CXX", "").strip()
    if cxx:
        if which(shlex.split(cxx)[0]) is None:
            return f"the compiler CXX={cxx} is not found"
    elif not any(which(name) for name in COMPILERS):
        return f"no C++ compiler ({', '.join(COMPILERS)} or $CXX) on PATH"
    return None


def find_torch(environ, python: str = sys.executable, run=subprocess.run) -> tuple[dict, str, str] | None:
    """(environment, torch version, torch's CMake prefix) of the torch `python` imports, or None.

    Asked as the build runs first (no isolation, or torch in the build environment), then
    with `ISOLATION_VARS` removed (the target environment behind pip's build isolation).
    """
    as_is = dict(environ)
    outside = {k: v for k, v in environ.items() if k not in ISOLATION_VARS}
    for env in ([as_is, outside] if outside != as_is else [as_is]):
        proc = run([python, "-c", TORCH_QUERY], env=env, capture_output=True, text=True, timeout=600)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and len(lines) >= 2:
            return env, lines[-2].strip(), lines[-1].strip()
    return None


def first_error(output: str) -> str:
    """The first line of build output that names an error (with the line after a bare heading)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if re.search(r"\berror\b", line, re.IGNORECASE):
            if line.endswith(":") and i + 1 < len(lines):
                line = f"{line} {lines[i + 1]}"
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def notice(reason: str, editable: bool) -> str:
    """The one line an install prints when it leaves the library out."""
    after = "" if editable else f" in the source tree, then set FASTFVAE_NATIVE_LIB=$PWD/build/{LIB_NAME}"
    return (f"fastfvae: native CPU library not built ({reason}); CPU ops use the torch reference. "
            f"To build it by hand: {HAND_BUILD}{after}")


class BuildNative(build_ext):
    """build_ext for the one CMake-built extension: builds it, or records why not."""

    def get_ext_filename(self, fullname: str) -> str:
        # Asked with the full dotted name and with its last part alone. A plain library name:
        # torch.ops.load_library takes any path, and no Python import suffix applies.
        if fullname in (EXTENSION, EXTENSION.rpartition(".")[2]):
            return os.path.join(*fullname.split(".")[:-1], LIB_NAME)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext) -> None:
        if ext.name != EXTENSION:
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name))  # in build_lib (copied to the source when editable)
        target.parent.mkdir(parents=True, exist_ok=True)
        skipped = target.with_name(SKIPPED_NAME)
        try:
            reason = self.build_native(target)
        except (OSError, subprocess.SubprocessError) as exc:  # cmake vanished, a full disk, ...
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            skipped.unlink(missing_ok=True)
            return
        target.unlink(missing_ok=True)
        skipped.write_text(reason + "\n")
        # A warning, not a print: pip 26.3 and newer show a backend's warnings in a plain
        # `pip install`, older ones (like all of the build's output) only with -v.
        warnings.warn(notice(reason, self.editable_mode), UserWarning, stacklevel=1)

    def build_native(self, target: Path) -> str | None:
        """Build the library into `target`; None when done, else why it was not."""
        reason = skip_reason(os.environ)
        if reason is not None:
            return reason
        torch = find_torch(os.environ)
        if torch is None:
            return f"torch is not importable by {sys.executable}; install torch first"
        env, version, prefix = torch
        # From scratch each time: a CMake cache left by an earlier install (of a tree since
        # moved, or of another torch) would fail or mislead the configure step.
        build_dir = Path(self.build_temp).resolve() / "native"
        shutil.rmtree(build_dir, ignore_errors=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        steps = (
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython_EXECUTABLE={sys.executable}"],
            ["cmake", "--build", str(build_dir), "--parallel", jobs],
        )
        for cmd in steps:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print(proc.stdout, flush=True)  # CMake's log: pip shows it with -v
            if proc.returncode != 0:
                return f"`{' '.join(cmd[:2])}` failed: {first_error(proc.stdout)}"
        built = build_dir / LIB_NAME
        if not built.is_file():
            return f"the CMake build made no {built}"
        shutil.copyfile(built, target)
        print(f"fastfvae: built the native CPU library against torch {version}", file=sys.stderr, flush=True)
        return None

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the library, or the record of why it is missing, into the source package."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if ext.name != EXTENSION:
                continue
            built = (Path(self.build_lib) / self.get_ext_filename(ext.name)).parent
            source = Path(build_py.get_package_dir(PACKAGE))
            for name in (LIB_NAME, SKIPPED_NAME):
                if (built / name).is_file():
                    # A new file renamed over the old one: a process that has the old library
                    # loaded keeps its mapping (copying over it in place could crash it).
                    partial = source / f".{name}.partial"
                    shutil.copyfile(built / name, partial)
                    os.replace(partial, source / name)
                else:  # a library from an earlier install, or a record it no longer needs
                    (source / name).unlink(missing_ok=True)


if __name__ == "__main__":
    setup(ext_modules=[Extension(EXTENSION, sources=[], optional=True)], cmdclass={"build_ext": BuildNative})
