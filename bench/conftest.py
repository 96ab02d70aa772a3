"""Shared benchmark fixtures: peak memory of a benchmarked call, and the reference loop's
rate per config measured earlier in the same pytest run (so each fast row can state its ratio).
The JSON's ``machine_info`` also records torch's version, CPU capability, thread count and
GPU (`pytest_benchmark_update_machine_info`); `bench.report` prints them with the run's date.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before the call); on CPU
the peak resident set size (sampled every 2 ms from ``/proc/self/statm`` while the call
runs) above the RSS before it.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from fastfvae.data import DSprites

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def bf16_runs(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 at all (`fastfvae.fast.precision.bf16_support`: not an
    AVX2-only CPU, where oneDNN refuses it and fastfvae refuses ``--precision bf16``)."""
    from fastfvae.fast.precision import BF16_UNSUPPORTED, bf16_support

    return bf16_support(device)[0] != BF16_UNSUPPORTED


def skip_unless_bf16_runs(precision: str, device: torch.device | str = "cpu") -> None:
    """Skip a bf16 row, with the reason, where ``device`` cannot run bf16 (the fp32 rows run)."""
    if precision == "bf16" and not bf16_runs(device):
        from fastfvae.fast.precision import bf16_support

        pytest.skip(f"bf16 cannot run here: {bf16_support(device)[1]}")


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the process's lifetime peak is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def peak_memory(device: torch.device, result: dict):
    """Sets ``result["peak_mb"]`` to the peak memory (MiB) used while the block runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        result["peak_mb"] = max(peak[0], rss_bytes()) - base
        result["peak_mb"] /= 2**20


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def timing(benchmark):
    """The benchmark's statistics, or None under ``--benchmark-disable`` (the body then ran
    once, untimed: a smoke test of the benchmark, with its correctness asserts)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats


@pytest.fixture(scope="session")
def reference_rates() -> dict:
    """config id -> the reference loop's steps/s measured earlier in this pytest run."""
    return {}


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_bits_dsprites(num_rows: int, seed: int = 0) -> DSprites:
    """A DSprites of random bits: a training step's cost does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    return DSprites(rng.integers(0, 256, (num_rows, 512), dtype=np.uint8),
                    np.zeros((num_rows, 6), np.int64), np.zeros((num_rows, 6)), source="random-bits")
