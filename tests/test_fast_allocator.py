"""fastfvae.fast.allocator: glibc keeps freed memory after `keep_freed_memory()`.

The setting is process-wide and one-way, so the real calls run in a fresh interpreter (the
module loaded from its file, without torch: a small, predictable heap)."""

import ctypes.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastfvae.fast import allocator

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")

SCRIPT = textwrap.dedent("""
    import importlib.util, json, resource, sys
    import numpy as np

    spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    try:  # numpy asks for huge pages on large arrays: count 4 KiB faults where THP is 'madvise'
        np._core.multiarray._set_madvise_hugepage(False)
    except AttributeError:
        pass

    BUFFERS, SIZE = 10, 8 << 20  # 80 MiB live, then freed: above glibc's largest default trim threshold

    def faults(loops):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(loops):
            buffers = [np.empty(SIZE, np.uint8) for _ in range(BUFFERS)]
            for b in buffers:
                b.fill(1)  # touch every page
            del buffers, b
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    out = {"applied_before": allocator.applied()}
    faults(2)  # glibc's dynamic mmap threshold settles
    out["before"] = faults(3)
    out["first"] = allocator.keep_freed_memory()
    out["second"] = allocator.keep_freed_memory()
    out["applied_after"] = allocator.applied()
    faults(1)  # the heap grows to the working set once
    out["after"] = faults(3)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def run():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, allocator.__file__], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_keep_freed_memory_applies_once_and_reports_it(run):
    assert run["applied_before"] is False
    assert run["first"] is True and run["second"] is True  # idempotent
    assert run["applied_after"] is True


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_memory_is_kept_so_pages_are_not_faulted_again(run):
    """Allocating, touching and freeing 80 MiB three times: by default glibc returns the
    memory (mmap'd blocks, or a trimmed heap top) and every round faults its pages in again
    (~20k faults a round with 4 KiB pages); with the thresholds raised the pages stay."""
    before, after = run["before"], run["after"]
    assert before > 300, f"the default heap kept the memory already ({before} faults): nothing to show"
    assert after < before / 4, f"{after} page faults after keep_freed_memory(), {before} before"


def test_without_mallopt_it_reports_false(monkeypatch):
    """Not glibc (no C library found, or no ``mallopt`` in it): a no-op that says so."""
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.keep_freed_memory() is False and allocator.applied() is False

    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(allocator.ctypes, "CDLL", NoMallopt)
    assert allocator.keep_freed_memory() is False and allocator.applied() is False
