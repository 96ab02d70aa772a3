"""The CUDA-graph wrapper's device-independent logic, on CPU: warming up then restoring the
models and optimisers in place leaves training exactly as if the warm-up never ran."""

import pytest
import torch

from fastfvae.fast import FastOptions, FastStep
from fastfvae.fast.graph import restore, snapshot
from fastfvae.train.config import TrainConfig
from fastfvae.train.reference import draw_step_inputs
from fastfvae.train.state import TrainState
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)


def _state_and_step(cfg, data):
    state = TrainState.create(cfg, len(data))
    return state, FastStep(state, data, FastOptions())


@pytest.mark.parametrize("prior_steps", [0, 2])
def test_warmup_then_restore_is_invisible(prior_steps):
    cfg = TrainConfig(batch_size=8, d_hidden=32, d_layers=2)
    data = small_dsprites(128)
    runs = []
    for warm in (False, True):
        state, step = _state_and_step(cfg, data)
        for _ in range(prior_steps):
            step(draw_step_inputs(cfg, state.sampler, state.generator))
        if warm:
            optims = [o for o in state.optims if o is not None]
            params = step.vae_params + step.disc_params
            ids = [id(p) for p in params]
            saved = snapshot(params, optims)
            fake = draw_step_inputs(cfg, state.sampler.__class__(128, 8, seed=99), torch.Generator().manual_seed(5))
            for _ in range(3):
                step(fake)
            restore(saved, optims, params)
            assert [id(p) for p in step.vae_params + step.disc_params] == ids  # same tensors (addresses)
        for _ in range(3):
            step(draw_step_inputs(cfg, state.sampler, state.generator))
        runs.append(state)
    a, b = runs
    for p, q in zip(a.models.vae.parameters(), b.models.vae.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.models.disc.parameters(), b.models.disc.parameters()):
        assert torch.equal(p, q)
    sa, sb = a.optims.vae.state_dict()["state"], b.optims.vae.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["step"], sb[k]["step"]) for k in sa)


def test_noise_device_needs_a_graph():
    from fastfvae.errors import FastFVAEError

    with pytest.raises(FastFVAEError):
        FastOptions(noise="device").resolved(torch.device("cpu"))
    assert FastOptions().resolved(torch.device("cpu")).noise == "host"
