"""Keep freed memory in the process heap (glibc), so the CPU step stops page-faulting.

A training step allocates and frees tens of MB of activations. glibc's malloc serves blocks
of this size with fresh ``mmap`` pages, or returns the heap top to the kernel once more than
the trim threshold is free, so every step page-faults on new pages (the page-fault counts and
their share of the step are in docs/fast-path.md). Raising the mmap and trim thresholds keeps
the freed blocks for the next step. Process-wide and one-way; a no-op where the C library has
no ``mallopt`` (not glibc). The cost is the step's peak memory staying reserved, which a
training process reuses every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc's largest accepted value on 64-bit: half
#: its 64 MiB heap size; every activation of the step is smaller, the resident dataset larger).
MMAP_THRESHOLD = 32 << 20
#: Free memory kept at the heap top before it is returned to the kernel.
TRIM_THRESHOLD = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap/trim thresholds once per process; True if the setting is in effect."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a refused value leaves the default in place
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def applied() -> bool:
    return _applied
