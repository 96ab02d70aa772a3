"""Training-step throughput: the reference loop vs the fast step, `pytest bench/bench_train_step.py --benchmark-only`.

One benchmark group per config (so each row's ratio is against the other rows of its config):

- ``paper-d1``: the paper's networks (encoder/decoder as in the paper, D 6 x 1000), batch 64,
  z 10, 1 D update, permuted codes from a second batch; ``paper-d5``: the same with the
  paper's 5 D updates (Kim & Mnih 2018, Section 6); ``b256`` / ``b1024``: batch 256 / 1024, 1 D update.
- rows: ``reference`` (`make_reference_step`, as a plain PyTorch loop runs: default glibc
  heap), ``reference-heap`` (the same after `fastfvae.fast.allocator.keep_freed_memory`, the
  fast step's heap setting: how much of the fast rows' gain the heap alone gives), ``fast``
  (the fast step's defaults for the device: fp32; on CPU by-hand D + split conv backward, on
  CUDA compiled + one CUDA graph), ``fast-bf16`` (the same in bf16), ``fast-bf16-autograd``
  (bf16 with autograd and autocast instead of the by-hand D and convolutions: what they add;
  skipped on CUDA, where it is fast-bf16), ``fast-fused`` (fp32
  with the `fastfvae.ops` fused ops; on CPU they run their torch reference).
- ``well-known``: the well-known PyTorch FactorVAE's iteration (`bench.wellknown_step`) on the
  same batches, the baseline of the step-rate goals: a row of ``paper-d1`` (its shape, on every
  device: on a GPU this is the comparison `bench/gpu_check.sh` records), and one of the rows
  ``test_interleaved_paper_ratios`` (``-k interleaved``) times in turn.
- Order: every config's ``reference`` row (and paper-d1's ``well-known``) runs first, then the heap setting is applied (it is
  process-wide and one-way), then the other rows. ``extra_info["heap_kept"]`` records whether
  the setting was in effect for a row, so a ``reference`` row measured after it (another
  bench file in the same session created a fast step first) is visible as such.

One call = ``STEPS[batch]`` full steps (randomness drawn as in the loop, batches gathered
from the resident set); ``extra_info``: ``steps_per_s`` (= steps / median call time),
``peak_mb`` (over building the state and the warm-up call, which runs the same steps; CUDA:
max allocated; CPU: peak RSS above the RSS before the state was built),
``vs_reference`` (steps/s over the reference row's, measured earlier in the same pytest run),
``vs_reference_heap`` (over the reference-heap row's), ``vs_well_known`` (paper-d1: over the
well-known row's),
``cpu_ms_per_step`` (process CPU time per step: on a shared machine with 1 thread a steadier
work measure than wall time), ``threads``. CPU threads: all the process has (``torch.get_num_threads()``; set
OMP_NUM_THREADS to pin). The images are random bits: a step's cost does not depend on them.
Summarise a JSON with ``python -m bench.report results.json --out DIR``.
"""

import time

import numpy as np
import pytest
import torch

from bench.conftest import bf16_runs, peak_memory, random_bits_dsprites, skip_unless_bf16_runs, timing
from bench.wellknown_step import WellKnownStep
from fastfvae.data import DSprites
from fastfvae.fast import FastOptions, FastStep
from fastfvae.fast.allocator import applied as heap_kept, keep_freed_memory
from fastfvae.fast.impl import fused_ops_available
from fastfvae.train.config import TrainConfig
from fastfvae.train.reference import draw_step_inputs, make_reference_step
from fastfvae.train.state import TrainState

CONFIGS = {
    "paper-d1": dict(batch_size=64, d_steps=1),
    "paper-d5": dict(batch_size=64, d_steps=5),
    "b256": dict(batch_size=256, d_steps=1),
    "b1024": dict(batch_size=1024, d_steps=1),
}
VARIANTS = {
    "reference": None,
    "reference-heap": None,
    "fast": dict(),
    "fast-bf16": dict(precision="bf16"),
    "fast-bf16-autograd": dict(precision="bf16", by_hand=False),
    "fast-fused": dict(fused_ops=True),
}
#: steps per benchmark call, and rounds (CPU: the whole file in ~10 minutes on 2 cores)
STEPS = {64: 5, 256: 2, 1024: 1}
ROUNDS = {64: 6, 256: 3, 1024: 2}
GPU_STEPS, GPU_ROUNDS = 200, 5


@pytest.fixture(scope="module")
def data() -> DSprites:
    return random_bits_dsprites(8192)


def build_step(variant: str, cfg: TrainConfig, data, device: torch.device):
    """(fresh TrainState, the row's step function): the reference step, a FastStep, or the
    well-known implementation's iteration (`bench.wellknown_step`) on the same batches."""
    state = TrainState.create(cfg, len(data), device)
    if variant == "well-known":
        return state, wellknown_step(cfg, data, device)
    if variant.startswith("reference"):
        return state, make_reference_step(state, data)
    return state, FastStep(state, data, FastOptions(**VARIANTS[variant]))


def wellknown_step(cfg: TrainConfig, data, device: torch.device):
    """The well-known implementation's iteration as a row's step function: the rows the loop
    draws, gathered as the reference gathers them (one D update, a second batch: its shape)."""
    if cfg.d_steps != 1 or cfg.perm_batch != "second" or cfg.model != "factorvae":
        raise ValueError("the well-known implementation's iteration is FactorVAE with one D update on a second batch")
    step = WellKnownStep(cfg.z_dim, device)

    def run(inputs) -> dict:
        return step(data.float_batch(inputs.rows, device), data.float_batch(inputs.rows2, device))

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: every plain-heap row first (before any fast step keeps the heap): the references and the
#: well-known implementation's iteration at the paper config (its shape: one D update), then
#: config by config
PLAIN_ROWS = [(c, "reference") for c in CONFIGS] + [("paper-d1", "well-known")]
ROWS = PLAIN_ROWS + [(c, v) for c in CONFIGS for v in VARIANTS if v != "reference"]


@pytest.mark.parametrize("config,variant", ROWS, ids=[f"{c}-{v}" for c, v in ROWS])
def test_train_step(benchmark, data, bench_device, reference_rates, config, variant):
    if variant == "fast-fused" and not fused_ops_available():
        pytest.skip("fastfvae.ops not available")
    if variant == "reference-heap" and bench_device.type == "cuda":
        pytest.skip("the heap setting is a CPU lever")
    if variant == "fast-bf16-autograd" and bench_device.type == "cuda":
        pytest.skip("on CUDA the fast step is autograd already: the same as fast-bf16")
    skip_unless_bf16_runs((VARIANTS[variant] or {}).get("precision", "fp32"), bench_device)
    if (config, variant) not in PLAIN_ROWS and bench_device.type == "cpu":
        keep_freed_memory()
    cfg = TrainConfig(device=bench_device.type, **CONFIGS[config])
    cuda = bench_device.type == "cuda"
    steps = GPU_STEPS if cuda else STEPS[cfg.batch_size]
    rounds = GPU_ROUNDS if cuda else ROUNDS[cfg.batch_size]
    memory: dict = {}
    with peak_memory(bench_device, memory):
        state, step = build_step(variant, cfg, data, bench_device)

        cpu_s = []

        def run():
            t0 = time.process_time()
            for _ in range(steps):
                metrics = step(draw_step_inputs(cfg, state.sampler, state.generator))
            _sync(bench_device)
            cpu_s.append(time.process_time() - t0)
            return metrics

        run()  # warm-up: compilation / graph capture, allocator, Adam state
    # Timed outside peak_memory: its RSS sampler thread wakes every 2 ms and takes the GIL the
    # step needs between ops (it cost the Python-heavy by-hand step ~2x); the warm-up call runs
    # the same steps, so its peak is the step's.
    benchmark.group = f"train step {config} ({bench_device.type})"
    metrics = benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert np.isfinite(float(metrics["loss"]))
    if timing(benchmark) is None:
        return
    rate = steps / timing(benchmark).median  # the median round: robust to a noisy neighbour
    if variant.startswith("reference") or variant == "well-known":
        reference_rates[(config, variant)] = rate
    info = benchmark.extra_info
    info.update(config=config, variant=variant, steps_per_s=rate, peak_mb=round(memory["peak_mb"], 1),
                threads=torch.get_num_threads(), batch_size=cfg.batch_size, d_steps=cfg.d_steps,
                cpu_ms_per_step=1e3 * float(np.median(cpu_s[1:])) / steps, heap_kept=heap_kept())
    for base, key in (("reference", "vs_reference"), ("reference-heap", "vs_reference_heap"),
                      ("well-known", "vs_well_known")):
        if (config, base) in reference_rates:
            info[key] = rate / reference_rates[(config, base)]


#: rows timed round by round by `test_interleaved_paper_ratios` (the plain-heap rows in child processes)
INTERLEAVED = ("well-known", "reference", "reference-heap", "fast", "fast-bf16")
CHILD_ROWS = ("well-known", "reference")
RATIO_BASES = ("well-known", "reference", "reference-heap")
INTERLEAVED_ROUNDS = 20


def test_interleaved_paper_ratios(benchmark, data, bench_device):
    """The paper config's well-known, reference, reference-heap, fast and fast-bf16 steps, 5
    steps of each in turn per round: a machine whose speed drifts (a shared box) slows all rows
    alike, so per-round ratios are steadier than those of rows timed minutes apart. The plain
    PyTorch loops (``well-known``, `bench.wellknown_step`, and ``reference``; default heap) run
    in child processes (`bench.reference_worker`; the heap setting cannot be undone within this
    one), the others here. ``extra_info``: ``interleaved_ratios`` (each later row vs each of
    RATIO_BASES: the median over rounds of that round's ratio), ``interleaved_ratio_range`` (the
    smallest and the largest round's ratio) and ``ms_per_step`` (median round per row)."""
    if bench_device.type != "cpu":
        pytest.skip("a CPU comparison (the heap setting is a CPU lever)")
    from contextlib import ExitStack

    from bench.reference_worker import ReferenceWorker

    cfg = TrainConfig(device="cpu", **CONFIGS["paper-d1"])
    steps = STEPS[cfg.batch_size]
    # the bf16 row only where the CPU runs bf16 (an AVX2-only CPU does not: fp32 is its fast path)
    rows = tuple(v for v in INTERLEAVED if v != "fast-bf16" or bf16_runs(bench_device))
    with ExitStack() as children:
        timers = {v: children.enter_context(ReferenceWorker(cfg.batch_size, cfg.d_steps, torch.get_num_threads(),
                                                            rows=len(data), variant=v)).seconds_per_step
                  for v in CHILD_ROWS}
        keep_freed_memory()
        for variant in rows:
            if variant not in timers:
                timers[variant] = step_timer(variant, cfg, data, bench_device)
        seconds: dict[str, list[float]] = {v: [] for v in rows}

        def one_round():
            for variant in rows:
                seconds[variant].append(timers[variant](steps))

        benchmark.group = "train step paper-d1, interleaved (cpu)"
        benchmark.pedantic(one_round, rounds=INTERLEAVED_ROUNDS, iterations=1)
    if timing(benchmark) is None:
        return
    per_round = {v: np.asarray(s) for v, s in seconds.items()}
    round_ratios = {f"{v} vs {base}": per_round[base] / per_round[v]
                    for base in RATIO_BASES for v in rows[rows.index(base) + 1:]}
    benchmark.extra_info.update(variant="interleaved", config="paper-d1",
                                steps_per_s=1 / float(np.median(per_round[rows[-1]])),
                                ms_per_step={v: 1e3 * float(np.median(t)) for v, t in per_round.items()},
                                interleaved_ratios={k: float(np.median(r)) for k, r in round_ratios.items()},
                                interleaved_ratio_range={k: [float(r.min()), float(r.max())]
                                                         for k, r in round_ratios.items()},
                                rounds=INTERLEAVED_ROUNDS, steps_per_round=steps,
                                heap_kept=heap_kept(), threads=torch.get_num_threads())


def step_timer(variant: str, cfg: TrainConfig, data, device: torch.device, warmup: int = 2):
    """steps -> seconds per step of a warmed-up ``variant`` (allocator, Adam state), asserting
    its loss stays finite. Also what `bench.reference_worker` runs in its child process."""
    state, fn = build_step(variant, cfg, data, device)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            metrics = fn(draw_step_inputs(cfg, state.sampler, state.generator))
        seconds = (time.perf_counter() - t0) / max(n, 1)
        if n:
            assert np.isfinite(float(metrics["loss"])), variant
        return seconds

    run(warmup)
    return run
