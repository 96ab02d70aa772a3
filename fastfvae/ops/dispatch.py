"""Which implementation an op call runs: the Triton kernels, the native CPU library or the torch reference.

Rules, checked at every call (so they can change at run time, and they are never frozen
into a compiled graph -- the ops are opaque to torch.compile):

* CUDA tensors run the Triton kernels, unless ``FASTFVAE_NO_TRITON=1`` (then the torch
  reference runs on the GPU; useful to compare the two);
* CPU tensors run the native library (`fastfvae.ops.native`, built with CMake) where it is
  loaded and implements the op, unless ``FASTFVAE_NO_NATIVE=1``; else the torch reference;
* ``FASTFVAE_TRITON_ON_CPU=1`` takes precedence on CPU: the Triton kernels run under Triton's
  interpreter, which needs ``TRITON_INTERPRET=1`` set before the first kernel module is
  imported (the kernels are imported lazily, on first use);
* dtypes a kernel does not support (float64 for the arithmetic ops, for example), tensors
  with 2**31 or more elements, and other devices always run the torch reference.
"""

import importlib
import os

import torch

from fastfvae.errors import FastFVAEError

# The float types the Triton kernels compute in (float32 arithmetic); float64 runs the reference.
KERNEL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The float types the native CPU library takes (float64 computed in float64, as the reference).
NATIVE_FLOAT_DTYPES = KERNEL_FLOAT_DTYPES + (torch.float64,)
_MAX_NUMEL = 2**31 - 1
_KERNELS: dict = {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def interpreting() -> bool:
    """Whether Triton kernels (once imported) run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor, dtypes=None) -> bool:
    """True when a call on ``tensors`` should run the Triton kernels (rules in the module doc).

    ``dtypes``: the dtypes the kernel supports (None: any). ``None`` entries are skipped.
    """
    present = [t for t in tensors if t is not None]
    device = present[0].device.type
    if dtypes is not None and any(t.dtype not in dtypes for t in present):
        return False
    if any(t.numel() > _MAX_NUMEL for t in present):
        return False
    if device == "cuda":
        return not _flag("FASTFVAE_NO_TRITON")
    if device == "cpu" and _flag("FASTFVAE_TRITON_ON_CPU"):
        if not interpreting():
            raise FastFVAEError(
                "FASTFVAE_TRITON_ON_CPU=1 needs TRITON_INTERPRET=1 set before fastfvae's kernels "
                "are imported; set both, or unset FASTFVAE_TRITON_ON_CPU to use the torch reference"
            )
        return True
    return False


def use_native(*tensors: torch.Tensor, dtypes=None) -> bool:
    """True when a call on ``tensors`` should run ``torch.ops.fastfvae_native`` (CPU tensors,
    the library loaded, not disabled; ``dtypes`` as in `use_triton`). Ask `use_triton` first:
    the Triton interpreter, when asked for, takes precedence."""
    from fastfvae.ops import native

    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in present):
        return False
    if dtypes is not None and any(t.dtype not in dtypes for t in present):
        return False
    return not native.disabled() and native.loaded()


def kernels(name: str):
    """The kernel module ``fastfvae.kernels.<name>``, imported on first use."""
    module = _KERNELS.get(name)
    if module is None:
        module = _KERNELS[name] = importlib.import_module(f"fastfvae.kernels.{name}")
    return module
