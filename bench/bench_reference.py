"""Reference training loop speed (steps/s) on CPU: `pytest bench/bench_reference.py --benchmark-only`.

The paper config: FactorVAE, batch 64, z 10, encoder/decoder as in the paper, discriminator
6 x 1000, 1 D update, permuted codes from a second batch — plus beta-VAE and the paper's 5 D
updates (Kim & Mnih 2018, Section 6) for scale. One benchmark call = ``STEPS`` full steps of
`make_reference_step` (batch fetch + unpack, VAE forward/backward/Adam, D forward/backward/Adam),
randomness drawn as in the loop. steps/s = STEPS / mean call time, stored in
``extra_info["steps_per_s"]``. Reported, not asserted. The images are random bits: a step's
cost does not depend on them.
"""

import pytest
import torch

from bench.conftest import random_bits_dsprites, timing
from fastfvae.data import DSprites
from fastfvae.train.config import TrainConfig
from fastfvae.train.reference import draw_step_inputs, make_reference_step
from fastfvae.train.state import TrainState

STEPS = 10
VARIANTS = {
    "factorvae-paper-d1": dict(model="factorvae", d_steps=1),
    "factorvae-d5": dict(model="factorvae", d_steps=5),
    "betavae": dict(model="betavae"),
}


@pytest.fixture(scope="module")
def data() -> DSprites:
    return random_bits_dsprites(4096)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_steps_per_s(benchmark, data, variant):
    cfg = TrainConfig(**VARIANTS[variant])
    state = TrainState.create(cfg, len(data))
    step = make_reference_step(state, data)

    def run():
        for _ in range(STEPS):
            step(draw_step_inputs(cfg, state.sampler, state.generator))

    run()  # warm-up (allocator, Adam state)
    benchmark.group = "reference loop, CPU"
    benchmark.pedantic(run, rounds=3, iterations=1)
    if timing(benchmark) is None:
        return
    benchmark.extra_info["steps_per_s"] = STEPS / timing(benchmark).mean
    benchmark.extra_info["threads"] = torch.get_num_threads()
