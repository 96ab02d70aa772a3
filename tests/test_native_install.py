"""`pip install` builds the native CPU library (setup.py), or installs without it and says why.

The fast tests drive setup.py's build command directly: its decisions (FASTFVAE_BUILD_NATIVE,
no cmake, no compiler), finding torch behind pip's build isolation, a CMake failure that must
not fail the install, and the editable copy into the source tree. The slow ones run the real
`pip install` (and `pip install -e`) of a copy of this checkout into a fresh venv whose
Python sees this test's torch, as a user's venv with torch installed would, but whose build
isolation hides it: with cmake the library is built and loads, without it (or with
FASTFVAE_BUILD_NATIVE=0) the install succeeds with one notice and the torch reference runs.
The notice is a warning: the newest pip shows it in a plain `pip install`, older pip with -v.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from setuptools import Distribution, Extension

from fastfvae.ops import native

REPO = Path(__file__).resolve().parents[1]
NOTICE = "fastfvae: native CPU library not built ("
HAND_BUILD = "cmake -S . -B build && cmake --build build"


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its `setup()` call runs only as a script)."""
    spec = importlib.util.spec_from_file_location("fastfvae_setup_py", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _which(present: set[str]):
    return lambda name: f"/usr/bin/{name}" if name in present else None


# --- the build command's decisions -------------------------------------------------------------

def test_builds_when_cmake_and_a_compiler_are_there(setup_py):
    assert setup_py.skip_reason({}, _which({"cmake", "g++"})) is None
    assert setup_py.skip_reason({"CXX": "clang++ -stdlib=libc++"}, _which({"cmake", "clang++"})) is None
    assert setup_py.skip_reason({setup_py.BUILD_ENV: "1"}, _which({"cmake", "c++"})) is None


def test_env_var_zero_skips_even_with_everything_there(setup_py):
    reason = setup_py.skip_reason({setup_py.BUILD_ENV: "0"}, _which({"cmake", "g++"}))
    assert reason == "FASTFVAE_BUILD_NATIVE=0"


def test_no_cmake_skips(setup_py):
    assert setup_py.skip_reason({}, _which({"g++"})) == "cmake not found on PATH"


def test_no_compiler_skips(setup_py):
    reason = setup_py.skip_reason({}, _which({"cmake"}))
    assert reason is not None and reason.startswith("no C++ compiler") and "$CXX" in reason
    # $CXX names the compiler CMake will use: one that is not there skips, whatever else is.
    reason = setup_py.skip_reason({"CXX": "/opt/nowhere/g++"}, _which({"cmake", "g++"}))
    assert reason is not None and "CXX=/opt/nowhere/g++" in reason


def test_a_tree_without_cmakelists_skips(setup_py, tmp_path):
    reason = setup_py.skip_reason({}, _which({"cmake", "g++"}), source=tmp_path)
    assert reason is not None and "CMakeLists.txt" in reason


_HIDE_SITE_PACKAGES = """\
import sys
sys.path[:] = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
"""


def test_torch_is_found_behind_build_isolation(setup_py, tmp_path):
    """pip's isolation: the target interpreter, site-packages dropped by a sitecustomize on
    PYTHONPATH, and PYTHONNOUSERSITE=1. Torch must be found without those two."""
    (tmp_path / "sitecustomize.py").write_text(_HIDE_SITE_PACKAGES)
    isolated = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONNOUSERSITE="1")
    hidden = subprocess.run([sys.executable, "-c", "import torch"], env=isolated, capture_output=True)
    assert hidden.returncode != 0, "the simulated isolation did not hide torch"
    found = setup_py.find_torch(isolated)
    assert found is not None
    env, version, prefix = found
    assert version == torch.__version__ and Path(prefix) == Path(torch.utils.cmake_prefix_path)
    assert "PYTHONPATH" not in env and "PYTHONNOUSERSITE" not in env


def test_no_torch_at_all_is_none(setup_py, tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    assert setup_py.find_torch(dict(os.environ), python=str(fake_python)) is None


def test_first_error_names_the_failure(setup_py):
    configure = "-- Configuring\nCMake Error at CMakeLists.txt:3 (message):\n  broken on purpose\n\n-- done\n"
    assert setup_py.first_error(configure) == "CMake Error at CMakeLists.txt:3 (message): broken on purpose"
    compile_log = "[ 20%] Building CXX\n/x/gaussian.cpp:5:3: error: 'foo' was not declared\nmake: *** Error 1\n"
    assert setup_py.first_error(compile_log) == "/x/gaussian.cpp:5:3: error: 'foo' was not declared"


# --- the build command itself, without pip ---------------------------------------------------

def _command(setup_py, tmp_path, editable=False):
    ext = Extension(setup_py.EXTENSION, sources=[], optional=True)
    dist = Distribution({"name": "fastfvae", "ext_modules": [ext], "cmdclass": {"build_ext": setup_py.BuildNative}})
    cmd = setup_py.BuildNative(dist)
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    cmd.editable_mode = editable
    cmd.ensure_finalized()
    return cmd, ext


def _notices(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and str(w.message).startswith(NOTICE)]


def test_skipping_records_the_reason_and_warns_in_one_line(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv(setup_py.BUILD_ENV, "0")
    cmd, ext = _command(setup_py, tmp_path)
    stale = tmp_path / "lib" / "fastfvae" / setup_py.LIB_NAME
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a library from an earlier build")
    with pytest.warns(UserWarning) as record:
        cmd.build_extension(ext)
    assert not stale.exists()
    assert (stale.parent / setup_py.SKIPPED_NAME).read_text() == "FASTFVAE_BUILD_NATIVE=0\n"
    notices = _notices(record)
    assert len(notices) == 1 and "\n" not in notices[0]
    assert notices[0].startswith(NOTICE + "FASTFVAE_BUILD_NATIVE=0)") and HAND_BUILD in notices[0]
    assert "FASTFVAE_NATIVE_LIB" in notices[0]  # a regular install: the hand-built library is not found by itself


def test_no_importable_torch_skips_and_says_to_install_it_first(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "skip_reason", lambda environ: None)
    monkeypatch.setattr(setup_py, "find_torch", lambda environ: None)
    cmd, ext = _command(setup_py, tmp_path)
    with pytest.warns(UserWarning, match="torch is not importable"):
        cmd.build_extension(ext)
    reason = (tmp_path / "lib" / "fastfvae" / setup_py.SKIPPED_NAME).read_text()
    assert reason == f"torch is not importable by {sys.executable}; install torch first\n"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_a_failing_cmake_never_fails_the_build(setup_py, tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(
        'cmake_minimum_required(VERSION 3.18)\nproject(broken LANGUAGES NONE)\nmessage(FATAL_ERROR "broken on purpose")\n')
    monkeypatch.setattr(setup_py, "ROOT", source)
    monkeypatch.setattr(setup_py, "skip_reason", lambda environ: None)
    monkeypatch.setattr(setup_py, "find_torch", lambda environ: (dict(environ), "0.0", str(tmp_path)))
    cmd, ext = _command(setup_py, tmp_path)
    with pytest.warns(UserWarning) as record:
        cmd.run()  # what pip's build runs; raising here would fail the install
    out_dir = tmp_path / "lib" / "fastfvae"
    assert not (out_dir / setup_py.LIB_NAME).exists()
    reason = (out_dir / setup_py.SKIPPED_NAME).read_text()
    assert reason.startswith("`cmake -S` failed: CMake Error") and "broken on purpose" in reason
    notices = _notices(record)
    assert len(notices) == 1 and "broken on purpose" in notices[0]


def test_editable_copy_replaces_what_an_earlier_install_left(setup_py, tmp_path, monkeypatch):
    """An editable install gets the library (or the record) in the source package, and loses
    the other one, so a library from an earlier install does not outlive a skipped build."""
    monkeypatch.chdir(tmp_path)
    cmd, ext = _command(setup_py, tmp_path, editable=True)
    source_pkg = tmp_path / "fastfvae"
    source_pkg.mkdir()
    (source_pkg / setup_py.LIB_NAME).write_bytes(b"old library")
    built = tmp_path / "lib" / "fastfvae"
    built.mkdir(parents=True)
    (built / setup_py.SKIPPED_NAME).write_text("cmake not found on PATH\n")
    cmd.copy_extensions_to_source()
    assert not (source_pkg / setup_py.LIB_NAME).exists()
    assert (source_pkg / setup_py.SKIPPED_NAME).read_text() == "cmake not found on PATH\n"
    (built / setup_py.SKIPPED_NAME).unlink()
    (built / setup_py.LIB_NAME).write_bytes(b"new library")
    cmd.copy_extensions_to_source()
    assert (source_pkg / setup_py.LIB_NAME).read_bytes() == b"new library"
    assert not (source_pkg / setup_py.SKIPPED_NAME).exists()
    # A library some process may have loaded is replaced by a new file, never written over.
    loaded_inode = (source_pkg / setup_py.LIB_NAME).stat().st_ino
    (built / setup_py.LIB_NAME).write_bytes(b"newer library")
    cmd.copy_extensions_to_source()
    assert (source_pkg / setup_py.LIB_NAME).read_bytes() == b"newer library"
    assert (source_pkg / setup_py.LIB_NAME).stat().st_ino != loaded_inode
    assert sorted(p.name for p in source_pkg.iterdir()) == [setup_py.LIB_NAME]


def test_the_library_name_is_plain(setup_py, tmp_path):
    cmd, ext = _command(setup_py, tmp_path)
    assert Path(cmd.get_ext_fullpath(ext.name)) == tmp_path / "lib" / "fastfvae" / "libfastfvae_native.so"
    assert setup_py.LIB_NAME == native.LIB_NAME and setup_py.SKIPPED_NAME == native.SKIPPED_NAME


def test_status_reports_why_the_install_skipped_the_build(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "fastfvae"
    package.mkdir(parents=True)
    (package / native.SKIPPED_NAME).write_text("cmake not found on PATH\n")
    monkeypatch.delenv(native.LIB_ENV, raising=False)
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.setattr(native, "_PACKAGE_DIR", package)
    monkeypatch.setattr(native, "_SOURCE_CHECKOUT", package.parent)  # no CMakeLists.txt: not a checkout
    monkeypatch.setattr(native, "_INSTALLED", package / native.LIB_NAME)
    monkeypatch.setattr(native, "_STATE", {"tried": False, "path": None, "origin": None, "reason": None})
    assert native.candidates() == [package / native.LIB_NAME]
    runs_native, why = native.status()
    assert not runs_native
    assert "pip install skipped it (cmake not found on PATH)" in why and HAND_BUILD in why


# --- real installs into a fresh venv (slow) ----------------------------------------------------

def _copy_checkout(dest: Path) -> Path:
    """This checkout's files as git sees them (tracked, and new files not ignored): no build/,
    no library or record from the checkout's own install."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        src = REPO / name
        if not os.path.lexists(src):  # deleted in the working tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    return dest


def _venv(dest: Path) -> Path:
    """A fresh venv whose Python imports this test's torch (and the other dependencies) through a
    .pth line, as a user's venv with torch installed does; pip's build isolation hides it."""
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, timeout=300)
    python = dest / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "runner_site_packages.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    return python


def _clean_env(**updates) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (native.LIB_ENV, native.DISABLE_ENV, "PYTHONPATH", "FASTFVAE_BUILD_NATIVE", "VIRTUAL_ENV")}
    env.update(updates)
    return env


def _pip_install(python: Path, source: Path, editable: bool, env: dict, verbose: bool = True) -> str:
    cmd = [str(python), "-m", "pip", "install", *(["-v"] if verbose else []), *(["-e"] if editable else []),
           str(source)]
    proc = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


_REPORT = """\
import fastfvae
from fastfvae.cli.info import lines
from fastfvae.ops import native
runs_native, why = native.status()
print(fastfvae.__file__)
print(runs_native)
print(why)
print(next(line for line in lines() if line.startswith("permute_dims ")).split()[1])
"""


def _report(python: Path, cwd: Path) -> tuple[Path, bool, str, str]:
    proc = subprocess.run([str(python), "-c", _REPORT], cwd=cwd, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, runs_native, why, info_cpu = proc.stdout.strip().splitlines()[-4:]
    return Path(package).parent, runs_native == "True", why, info_cpu


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_pip_install_builds_and_loads_the_library(tmp_path, editable):
    source = _copy_checkout(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    log = _pip_install(python, source, editable, _clean_env())
    assert "fastfvae: built the native CPU library against torch " + torch.__version__ in log, log[-4000:]
    assert NOTICE not in log
    package, runs_native, why, info_cpu = _report(python, tmp_path)
    expected_package = source / "fastfvae" if editable else tmp_path / "venv"
    assert package.is_relative_to(expected_package), package
    assert runs_native and info_cpu == "native", why
    assert f"native library {package / native.LIB_NAME} (built by pip install, inside the package; " in why


@pytest.mark.slow
@pytest.mark.parametrize("editable,hide", [(False, "cmake"), (True, "env")],
                         ids=["pip-install-no-cmake", "pip-install-e-FASTFVAE_BUILD_NATIVE=0"])
def test_pip_install_without_the_build_installs_the_reference(tmp_path, editable, hide):
    source = _copy_checkout(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    if hide == "cmake":  # the venv's bin alone: no cmake, no compiler
        env, reason = _clean_env(PATH=str(python.parent)), "cmake not found on PATH"
    else:
        env, reason = _clean_env(FASTFVAE_BUILD_NATIVE="0"), "FASTFVAE_BUILD_NATIVE=0"
    if hide == "cmake":
        # The newest pip shows a build backend's warnings without -v (pip 26.3 forwards them);
        # the venv's own pip shows the build's output only with -v.
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip>=26.3"], check=True, timeout=600)
    log = _pip_install(python, source, editable, env, verbose=hide != "cmake")
    notices = [line[line.index(NOTICE):] for line in log.splitlines() if NOTICE in line]
    assert len(notices) == 1, log[-4000:]
    assert notices[0].startswith(f"{NOTICE}{reason})") and HAND_BUILD in notices[0]
    package, runs_native, why, info_cpu = _report(python, tmp_path)
    assert not (package / native.LIB_NAME).exists()
    assert not runs_native and info_cpu == "reference"
    assert f"pip install skipped it ({reason})" in why
