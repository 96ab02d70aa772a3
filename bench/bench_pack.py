"""Packs: per-model steps/s of K runs trained as one pack vs K single fast runs,
`pytest bench/bench_pack.py --benchmark-only`.

Interleaved in one test, round by round (the machine's speed drifts, and on a shared machine
only ratios from one interleaved run mean anything): for each K in {1, 4, 8, 16} and each
precision, one round is

- ``single``: K single fast steps (`FastStep`, one per run, each its own model) one after the
  other, with the process's intra-op threads: K single runs as a user runs them;
- ``single_1t`` (CPU): the same K steps with one intra-op thread: the control that tells what
  a pack gains by running models side by side from what one thread per model gains by itself
  (on a shared machine, multi-threaded OpenMP regions stall whenever a thread is descheduled);
- ``pack``: one step of a pack of the same K runs (`fastfvae.study.pack.make_pack_step`: the
  device's default mechanism, threads on CPU);
- ``gemm``, ``gemm_1t`` (CPU): one 2048^3 matrix product in the step's dtype with the
  process's threads, and with one: the rate a compute-bound kernel gets from the machine in
  that round (the reachable peak, as the machine is shared at that moment).

The median round of each gives per-model steps/s; ``extra_info`` records them, their ratios
(``pack_vs_single``, ``pack_vs_single_1t``), the FLOPs of one step (``step_gflop``, counted on the
reference step, which computes the same sums), the rates the single fast step and the GEMMs
reach (``single_gflops``, ``gemm_gflops``, ``gemm_1t_gflops``) and their quotients
(``single_share_of_gemm``; ``single_1t_share_of_gemm_1t``: one thread each). The paper config: batch
64, z 10, D 6 x 1000, 1 D update, permuted codes from a second batch. Images are random bits
(a step's cost does not depend on them).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bench.conftest import random_bits_dsprites, skip_unless_bf16_runs, timing
from fastfvae.fast import FastOptions, FastStep
from fastfvae.fast.allocator import keep_freed_memory
from fastfvae.study.pack import make_pack_step
from fastfvae.train.config import TrainConfig
from fastfvae.train.reference import make_reference_step
from fastfvae.train.state import TrainState
from fastfvae.train.step import StepShapes, draw_step_inputs

KS = (1, 4, 8, 16)
ROUNDS = 3
GEMM_N = 2048


def step_flops(cfg: TrainConfig, data) -> float:
    """FLOPs of one training step of ``cfg`` (GEMMs and convolutions, forward and backward),
    counted on the reference step: the fast step computes the same sums."""
    from torch.utils.flop_counter import FlopCounterMode

    state = TrainState.create(cfg.replace(fast=False, precision="fp32"), len(data), torch.device("cpu"))
    step, shapes = make_reference_step(state, data), StepShapes.of(state.cfg, data=data)
    with FlopCounterMode(display=False) as counter:
        step(draw_step_inputs(shapes, state.sampler, state.generator))
    return float(counter.get_total_flops())


class _Gemm:
    """One GEMM_N^3 product in ``dtype``; ``()`` returns its seconds."""

    def __init__(self, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(GEMM_N, GEMM_N, generator=gen).to(dtype) for _ in range(2))
        self.out = torch.empty(GEMM_N, GEMM_N, dtype=dtype)
        self.flops = 2.0 * GEMM_N ** 3

    def __call__(self) -> float:
        t0 = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        return time.perf_counter() - t0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k", KS)
def test_pack_vs_single_fast_runs(benchmark, bench_device, k, precision):
    skip_unless_bf16_runs(precision, bench_device)
    cpu = bench_device.type == "cpu"
    if cpu:
        keep_freed_memory()
    data = random_bits_dsprites(8192)
    cfgs = [TrainConfig(device=bench_device.type, batch_size=64, d_steps=1, seed=s, fast=True, precision=precision)
            for s in range(k)]
    shapes = [StepShapes.of(c, data=data) for c in cfgs]

    def fast_steps():
        states = [TrainState.create(c, len(data), bench_device) for c in cfgs]
        return states, [FastStep(s, data, FastOptions(precision=precision)) for s in states]

    singles, single_steps = fast_steps()
    singles_1t, single_steps_1t = fast_steps()
    packed = [TrainState.create(c, len(data), bench_device) for c in cfgs]
    pack = make_pack_step(packed, data)
    threads = torch.get_num_threads()
    gemm = _Gemm(torch.bfloat16 if precision == "bf16" else torch.float32) if cpu else None

    def single_round(states, steps):
        for sh, st, step in zip(shapes, states, steps):
            step(draw_step_inputs(sh, st.sampler, st.generator))

    def one_thread(fn):
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    def single_round_1t():
        one_thread(lambda: single_round(singles_1t, single_steps_1t))

    def pack_round():
        return pack([draw_step_inputs(sh, st.sampler, st.generator) for sh, st in zip(shapes, packed)])

    single_round(singles, single_steps), pack_round()  # warm-up
    if cpu:
        single_round_1t(), gemm()
    seconds = {"single": [], "single_1t": [], "pack": [], "gemm": [], "gemm_1t": []}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[name].append(time.perf_counter() - t0)
        return out

    def interleaved():
        timed("single", lambda: single_round(singles, single_steps))
        if cpu:
            timed("single_1t", single_round_1t)
            seconds["gemm"].append(gemm())
            seconds["gemm_1t"].append(one_thread(gemm))
        return timed("pack", pack_round)

    benchmark.group = f"pack K={k} {precision} ({bench_device.type})"
    try:
        metrics = benchmark.pedantic(interleaved, rounds=ROUNDS, iterations=1)
    finally:
        pack.close()
    assert bool(torch.isfinite(metrics["loss"]).all())
    if timing(benchmark) is None:
        return
    rate = {name: k / float(np.median(s)) for name, s in seconds.items() if s and not name.startswith("gemm")}
    info = dict(k=k, precision=precision, threads=threads, mechanism=type(pack).__name__,
                single_steps_per_s_per_model=rate["single"], pack_steps_per_s_per_model=rate["pack"],
                pack_vs_single=rate["pack"] / rate["single"])
    if cpu:
        flops = step_flops(cfgs[0], data)
        gemm_gflops, gemm_1t_gflops = (gemm.flops / float(np.median(seconds[name])) / 1e9
                                       for name in ("gemm", "gemm_1t"))
        info.update(single_1t_steps_per_s_per_model=rate["single_1t"], pack_vs_single_1t=rate["pack"] / rate["single_1t"],
                    step_gflop=flops / 1e9, single_gflops=flops * rate["single"] / 1e9, gemm_gflops=gemm_gflops,
                    gemm_1t_gflops=gemm_1t_gflops, single_share_of_gemm=flops * rate["single"] / 1e9 / gemm_gflops,
                    single_1t_share_of_gemm_1t=flops * rate["single_1t"] / 1e9 / gemm_1t_gflops)
    benchmark.extra_info.update(info)
