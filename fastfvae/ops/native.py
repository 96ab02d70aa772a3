"""The native CPU library of the fused ops (``libfastfvae_native``, built with CMake).

Build it with ``cmake -S . -B build && cmake --build build`` (see docs/ops.md, "Native CPU
build"). It registers ``torch.ops.fastfvae_native.*``: C++ implementations of permute_dims,
the Gaussian ops and linear_leaky_relu (float32 / bfloat16) for CPU tensors, with the torch
references' semantics, and the discriminator calls of `fastfvae.ops.native_mlp`. The public ops
(``torch.ops.fastfvae.*``) call them from their CPU branch when the library is loaded (rules
in `fastfvae.ops.dispatch`), so users need no change.

The library is looked for on first use, in this order, and its absence never fails an import:

* ``$FASTFVAE_NATIVE_LIB`` when set (then only there);
* ``<repo>/build/libfastfvae_native.so`` (the CMake build of a source checkout: only when the
  package is imported from one, next to its CMakeLists.txt);
* ``fastfvae/libfastfvae_native.so``, inside the package: what ``pip install`` (setup.py)
  builds, in site-packages or, for an editable install, in the source tree. An install that
  could not build it leaves ``fastfvae/native_build_skipped.txt`` saying why.

Every op threads with ATen's ``at::parallel_for`` (OpenMP, on the thread pool of the libgomp
torch has loaded), so ``torch.set_num_threads`` sets how many threads it uses, and its results
are the same bits on any thread count (docs/ops.md, "Native CPU build": "Threads").

`status` and ``fastfvae info`` say which one was loaded. A library that does not load (built
against another torch, for example) is reported there too, and the torch reference runs.
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
    "linear_leaky_relu", "linear_leaky_relu_grad_input", "linear_leaky_relu_grad_weight",
)
# The discriminator calls (fastfvae.ops.native_mlp), checked at load with the ops.
NATIVE_CALLS = ("mlp_pack_weight", "mlp_forward", "mlp_backward", "mlp_update", "mlp_adam", "mlp_isa")

# Arguments a call gained after it first shipped: a library built from older sources registers the
# call without them, and is reported as out of date at load rather than failing at the first call.
NATIVE_CALL_ARGS = {"mlp_backward": ("signals",), "mlp_update": ("signals", "shared", "scale")}

# Written by setup.py next to where the installed library would be, when an install skipped it.
SKIPPED_NAME = "native_build_skipped.txt"

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_SOURCE_CHECKOUT = _PACKAGE_DIR.parent
_REPO_BUILD = _SOURCE_CHECKOUT / "build" / LIB_NAME
_INSTALLED = _PACKAGE_DIR / LIB_NAME

# path: the loaded library (None: not loaded); origin: where it came from; reason: why not loaded.
_STATE: dict = {"tried": False, "path": None, "origin": None, "reason": None, "queries": {}}


def sources() -> list[tuple[Path, str]]:
    """(path, where it comes from) for each place the library is looked for, in order."""
    explicit = os.environ.get(LIB_ENV)
    if explicit:
        return [(Path(explicit), f"from ${LIB_ENV}")]
    found = []
    if (_SOURCE_CHECKOUT / "CMakeLists.txt").is_file():
        found.append((_REPO_BUILD, "the source checkout's CMake build"))
    found.append((_INSTALLED, "built by pip install, inside the package"))
    return found


def candidates() -> list[Path]:
    """Where the library is looked for, in order (the module doc)."""
    return [path for path, _ in sources()]


def _not_built_reason() -> str:
    skipped = _PACKAGE_DIR / SKIPPED_NAME
    try:
        why = skipped.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return f"native library not built: {BUILD_HINT}"
    return f"native library not built: pip install skipped it ({why}); build it: {BUILD_HINT}"


def _already_registered() -> bool:
    try:
        return hasattr(torch.ops.fastfvae_native, NATIVE_OPS[0])
    except (AttributeError, RuntimeError):
        return False


def _load() -> None:
    _STATE["tried"] = True
    _STATE["queries"] = {}
    places = sources()
    found, origin = next(((p, o) for p, o in places if p.is_file()), (None, None))
    if found is None:
        if os.environ.get(LIB_ENV):
            _STATE["reason"] = f"{LIB_ENV}={places[0][0]} does not exist: {BUILD_HINT}"
        else:
            _STATE["reason"] = _not_built_reason()
        return
    try:
        if not _already_registered():  # a second TORCH_LIBRARY(fastfvae_native) would fail
            torch.ops.load_library(str(found))
        missing = [name for name in NATIVE_OPS + NATIVE_CALLS if not hasattr(torch.ops.fastfvae_native, name)]
        missing += _outdated_calls([name for name in NATIVE_CALL_ARGS if name not in missing])
    except (OSError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _STATE["reason"] = f"{found} does not load ({first_line}); rebuild it: {BUILD_HINT}"
        return
    if missing:
        _STATE["reason"] = f"{found} lacks {', '.join(missing)}; rebuild it: {BUILD_HINT}"
        return
    _STATE["path"], _STATE["origin"] = found, origin


def _outdated_calls(names) -> list[str]:
    """``call(arg, ...)`` for each of ``names`` whose registered schema lacks arguments in `NATIVE_CALL_ARGS`."""
    out = []
    for name in names:
        have = {a.name for a in getattr(torch.ops.fastfvae_native, name).default._schema.arguments}
        if not set(NATIVE_CALL_ARGS[name]) <= have:
            out.append(f"{name}({', '.join(NATIVE_CALL_ARGS[name])})")
    return out


def disabled() -> bool:
    """``FASTFVAE_NO_NATIVE=1``: CPU tensors run the torch reference even with the library loaded."""
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def loaded() -> bool:
    """Whether the library is loaded (looked for on the first call)."""
    if not _STATE["tried"]:
        _load()
    return _STATE["path"] is not None


def active() -> bool:
    """Whether CPU calls run native: the library loaded and not disabled (`status` says why
    not). Checked at every dispatch, so it reads only the environment and the load state."""
    return not disabled() and loaded()


def query(name: str):
    """The answer of the library's no-argument call ``name`` (the variant a kernel family runs,
    whether it has a call), asked once: the library fixes its variants when it loads
    (``FASTFVAE_NATIVE_ISA`` is read then), so the dispatch checks a step makes dozens of
    times read a dict instead of crossing into the dispatcher. Call only when `loaded`."""
    queries = _STATE.setdefault("queries", {})
    if name not in queries:
        queries[name] = getattr(torch.ops.fastfvae_native, name)()
    return queries[name]


def has(*names: str) -> bool:
    """Whether the loaded library registers every call in ``names`` (asked once; call only when `loaded`)."""
    queries = _STATE.setdefault("queries", {})
    key = ("has", *names)
    if key not in queries:
        queries[key] = all(hasattr(torch.ops.fastfvae_native, name) for name in names)
    return queries[key]


def status() -> tuple[bool, str]:
    """(CPU calls run native, why) -- the line `fastfvae info` prints."""
    if disabled():
        return False, f"native disabled by {DISABLE_ENV}=1"
    if not loaded():
        return False, _STATE["reason"]
    origin = _STATE.get("origin")
    return True, f"native library {_STATE['path']} ({f'{origin}; ' if origin else ''}{isa()}, GEMM {gemm_isa()})"


def isa() -> str:
    """The SIMD variant the native loops run: avx512, avx2 or scalar."""
    return query("isa") if loaded() else "not loaded"


def gemm_isa() -> str:
    """The variant the native GEMM (linear_leaky_relu, the discriminator) runs: avx512_bf16
    (vdpbf16ps), avx512, avx2 or scalar; ``FASTFVAE_NATIVE_ISA`` caps it as it caps `isa`."""
    return query("mlp_isa") if loaded() else "not loaded"


def ops():
    """``torch.ops.fastfvae_native`` (call only when `loaded`)."""
    return torch.ops.fastfvae_native
