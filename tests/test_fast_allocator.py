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
    if sys.argv[2] == "early":  # as the fast step does: before the first large block
        out["first"] = allocator.keep_freed_memory()
        faults(1)
        out["after"] = faults(3)
        print(json.dumps(out))
        sys.exit(0)
    faults(2)  # glibc's dynamic mmap threshold settles
    out["before"] = faults(3)
    out["first"] = allocator.keep_freed_memory()
    out["second"] = allocator.keep_freed_memory()
    out["applied_after"] = allocator.applied()
    faults(1)  # the heap grows to the working set once
    out["after"] = faults(3)
    print(json.dumps(out))
""")


def _run(when):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, allocator.__file__, when], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run():
    """Faults before and after the call in one process."""
    return _run("late")


@pytest.fixture(scope="module")
def run_early():
    """Faults in a process that made the call before any large block."""
    return _run("early")


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


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_memory_is_kept_when_set_first(run, run_early):
    """Set at the start (as the fast step does), before glibc's dynamic threshold has moved:
    both thresholds are needed (the mmap one alone, or the trim one alone, leave the blocks
    mmap'd or trimmed and the pages faulted every round)."""
    assert run_early["first"] is True
    assert run_early["after"] < run["before"] / 4, (run_early["after"], run["before"])


class FakeLibc:
    """``ctypes.CDLL`` stand-in whose ``mallopt`` records its calls and answers ``answer``."""
    calls: list = []
    answer = 1

    class _Mallopt:  # a ctypes function takes argtypes / restype
        def __call__(self, param, value):
            FakeLibc.calls.append((param, value))
            return FakeLibc.answer

    def __init__(self, name):
        self.mallopt = self._Mallopt()


@pytest.mark.parametrize("answer", [1, 0], ids=["accepted", "refused"])
def test_sets_both_thresholds_once(monkeypatch, answer):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", FakeLibc)
    monkeypatch.setattr(FakeLibc, "calls", [])
    monkeypatch.setattr(FakeLibc, "answer", answer)
    assert allocator.keep_freed_memory() is bool(answer) and allocator.applied() is bool(answer)
    # mallopt(M_MMAP_THRESHOLD = -3, 32 MiB), mallopt(M_TRIM_THRESHOLD = -1, 1 GiB); a refused
    # value (0) leaves glibc's default and the call reports False
    assert FakeLibc.calls[:1] == [(-3, 32 << 20)]
    if answer:
        assert FakeLibc.calls == [(-3, 32 << 20), (-1, 1 << 30)]
    assert allocator.keep_freed_memory() is bool(answer)
    if answer:  # applied once: a second call sets nothing
        assert len(FakeLibc.calls) == 2


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
