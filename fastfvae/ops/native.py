"""The native CPU library of the fused ops (``libfastfvae_native``, built with CMake).

Build it with ``cmake -S . -B build && cmake --build build`` (see docs/ops.md, "Native CPU
build"). It registers ``torch.ops.fastfvae_native.*``: C++ implementations of permute_dims
and the Gaussian ops for CPU tensors, with the torch references' semantics. The public ops
(``torch.ops.fastfvae.*``) call them from their CPU branch when the library is loaded (rules
in `fastfvae.ops.dispatch`), so users need no change.

The library is looked for on first use, in this order, and its absence never fails an import:

* ``$FASTFVAE_NATIVE_LIB`` when set (then only there);
* ``<repo>/build/libfastfvae_native.so`` (the CMake build of a source checkout);
* ``libfastfvae_native.so`` next to the ``fastfvae`` package (an installed build).

A library that does not load (built against another torch, for example) is reported by
`status` and ``fastfvae info``, and the torch reference runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LIB_NAME = "libfastfvae_native.so"
LIB_ENV = "FASTFVAE_NATIVE_LIB"
DISABLE_ENV = "FASTFVAE_NO_NATIVE"
BUILD_HINT = "cmake -S . -B build && cmake --build build"
# The ops the library implements (torch.ops.fastfvae_native.<name>), named as the public ops.
NATIVE_OPS = (
    "permute_dims", "permute_dims_backward",
    "gaussian_sample_kl", "reparameterize", "gaussian_kl", "gaussian_backward",
)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_REPO_BUILD = _PACKAGE_DIR.parent / "build" / LIB_NAME

# path: the loaded library (None: not loaded); reason: why not, once looked for.
_STATE: dict = {"tried": False, "path": None, "reason": None}


def candidates() -> list[Path]:
    """Where the library is looked for, in order (the module doc)."""
    explicit = os.environ.get(LIB_ENV)
    if explicit:
        return [Path(explicit)]
    return [_REPO_BUILD, _PACKAGE_DIR / LIB_NAME]


def _already_registered() -> bool:
    try:
        return hasattr(torch.ops.fastfvae_native, NATIVE_OPS[0])
    except (AttributeError, RuntimeError):
        return False


def _load() -> None:
    _STATE["tried"] = True
    paths = candidates()
    found = next((p for p in paths if p.is_file()), None)
    if found is None:
        where = f"{LIB_ENV}={paths[0]} does not exist" if os.environ.get(LIB_ENV) else "native library not built"
        _STATE["reason"] = f"{where}: {BUILD_HINT}"
        return
    try:
        if not _already_registered():  # a second TORCH_LIBRARY(fastfvae_native) would fail
            torch.ops.load_library(str(found))
        missing = [name for name in NATIVE_OPS if not hasattr(torch.ops.fastfvae_native, name)]
    except (OSError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _STATE["reason"] = f"{found} does not load ({first_line}); rebuild it: {BUILD_HINT}"
        return
    if missing:
        _STATE["reason"] = f"{found} lacks {', '.join(missing)}; rebuild it: {BUILD_HINT}"
        return
    _STATE["path"] = found


def disabled() -> bool:
    """``FASTFVAE_NO_NATIVE=1``: CPU tensors run the torch reference even with the library loaded."""
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def loaded() -> bool:
    """Whether the library is loaded (looked for on the first call)."""
    if not _STATE["tried"]:
        _load()
    return _STATE["path"] is not None


def status() -> tuple[bool, str]:
    """(CPU calls run native, why) -- the line `fastfvae info` prints."""
    if disabled():
        return False, f"native disabled by {DISABLE_ENV}=1"
    if not loaded():
        return False, _STATE["reason"]
    return True, f"native library {_STATE['path']} ({isa()})"


def isa() -> str:
    """The SIMD variant the native loops run: avx512, avx2 or scalar."""
    return torch.ops.fastfvae_native.isa() if loaded() else "not loaded"


def ops():
    """``torch.ops.fastfvae_native`` (call only when `loaded`)."""
    return torch.ops.fastfvae_native
