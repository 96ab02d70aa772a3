"""Packs: per-model steps/s of K runs as one vectorised step vs K single fast runs,
`pytest bench/bench_pack.py --benchmark-only`.

Interleaved in one test, round by round (the machine's speed drifts): for each K in
{1, 4, 8, 16} and each precision, one round is K single fast steps (`FastStep`, one per run,
each its own model) followed by one pack step of the same K runs (`fastfvae.study.pack.PackStep`);
the median round of each gives per-model steps/s, and ``extra_info`` records both and their
ratio (``pack_vs_single``). The paper config: batch 64, z 10, D 6 x 1000, 1 D update,
permuted codes from a second batch. Images are random bits (a step's cost does not depend on
them).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bench.conftest import random_bits_dsprites, timing
from fastfvae.fast import FastOptions, FastStep
from fastfvae.fast.allocator import keep_freed_memory
from fastfvae.study.pack import PackStep
from fastfvae.train.config import TrainConfig
from fastfvae.train.state import TrainState
from fastfvae.train.step import StepShapes, draw_step_inputs

KS = (1, 4, 8, 16)
ROUNDS = 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k", KS)
def test_pack_vs_single_fast_runs(benchmark, bench_device, k, precision):
    if bench_device.type == "cpu":
        keep_freed_memory()
    data = random_bits_dsprites(8192)
    cfgs = [TrainConfig(device=bench_device.type, batch_size=64, d_steps=1, seed=s, fast=True, precision=precision)
            for s in range(k)]
    shapes = [StepShapes.of(c, data=data) for c in cfgs]
    singles = [TrainState.create(c, len(data), bench_device) for c in cfgs]
    single_steps = [FastStep(s, data, FastOptions(precision=precision)) for s in singles]
    packed = [TrainState.create(c, len(data), bench_device) for c in cfgs]
    pack = PackStep(packed, data)

    def single_round():
        for sh, st, step in zip(shapes, singles, single_steps):
            step(draw_step_inputs(sh, st.sampler, st.generator))

    def pack_round():
        return pack([draw_step_inputs(sh, st.sampler, st.generator) for sh, st in zip(shapes, packed)])

    single_round(), pack_round()  # warm-up
    single_s, pack_s = [], []

    def interleaved():
        t0 = time.perf_counter()
        single_round()
        t1 = time.perf_counter()
        metrics = pack_round()
        single_s.append(t1 - t0)
        pack_s.append(time.perf_counter() - t1)
        return metrics

    benchmark.group = f"pack K={k} {precision} ({bench_device.type})"
    metrics = benchmark.pedantic(interleaved, rounds=ROUNDS, iterations=1)
    assert bool(torch.isfinite(metrics["loss"]).all())
    if timing(benchmark) is None:
        return
    single_rate, pack_rate = k / float(np.median(single_s)), k / float(np.median(pack_s))
    benchmark.extra_info.update(k=k, precision=precision, single_steps_per_s_per_model=single_rate,
                                pack_steps_per_s_per_model=pack_rate, pack_vs_single=pack_rate / single_rate,
                                threads=torch.get_num_threads())
