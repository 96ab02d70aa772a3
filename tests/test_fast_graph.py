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
            optims = [o for o in step.optims if o is not None]
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
        step.sync_state()
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_step_matches_the_reference_on_gpu(precision, monkeypatch):
    """The whole-iteration CUDA graph (compiled networks, fused ops, host noise for parity) vs
    the eager reference on the same GPU, TF32 off: fp32 within 1e-3 (cuDNN/cuBLAS pick
    different algorithms and atomics), bf16 within its documented 5e-2."""
    from fastfvae.fast import PARITY_RTOL
    from fastfvae.train.reference import make_reference_step

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = TrainConfig(batch_size=64, device="cuda", d_steps=2)
    data = small_dsprites(512)
    ref_state, fast_state = TrainState.create(cfg, len(data), "cuda"), TrainState.create(cfg, len(data), "cuda")
    ref = make_reference_step(ref_state, data)
    fast = FastStep(fast_state, data, FastOptions(precision=precision, noise="host"))
    assert fast._graph is not None
    rtol = 1e-3 if precision == "fp32" else PARITY_RTOL["bf16"]
    for _ in range(20):
        a = ref(draw_step_inputs(cfg, ref_state.sampler, ref_state.generator))
        b = fast(draw_step_inputs(cfg, fast_state.sampler, fast_state.generator))
        for k in ("loss", "recon", "kl", "d_loss"):
            torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=rtol)
    for p, q in zip(ref_state.models.vae.parameters(), fast_state.models.vae.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=20 * 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
@pytest.mark.parametrize("depth", [1, 4])
def test_staged_inputs_on_cuda_deliver_each_step_while_the_gpu_lags(depth):
    """Real pinned buffers, events and non-blocking copies, the GPU kept behind the host: each
    step's copy delivers that step's values (tests/test_fast_graph_host.py has the CPU model)."""
    import numpy as np

    from fastfvae.fast.graph import StagedInputs

    staged = StagedInputs([(4,), (2, 3)], torch.float32, "cuda", depth=depth)
    seen = []
    for step in range(4 * depth + 4):
        torch.cuda._sleep(2_000_000)  # the queued copies run well after load() returned
        staged.load([np.full(4, step, np.float32), torch.full((2, 3), -step, dtype=torch.float32)])
        seen.append(staged.flat.clone())
    torch.cuda.synchronize()
    for step, flat in enumerate(seen):
        assert flat.tolist() == [float(step)] * 4 + [float(-step)] * 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
def test_cuda_graph_step_with_device_noise_takes_rows_only_on_gpu():
    """The default graphed step draws its noise in the graph: it says so, runs on rows-only
    inputs (the host generator untouched) and returns its metrics as one stacked vector."""
    from fastfvae.train.progress import StackedMetrics

    cfg = TrainConfig(batch_size=64, device="cuda", d_steps=2)
    data = small_dsprites(512)
    state = TrainState.create(cfg, len(data), "cuda")
    fast = FastStep(state, data, FastOptions())
    assert fast._graph is not None and fast.draws_own_noise
    before = state.generator.get_state()
    for _ in range(5):
        metrics = fast(draw_step_inputs(cfg, state.sampler, state.generator, noise=False))
    assert isinstance(metrics, StackedMetrics) and list(metrics) == ["loss", "recon", "kl", "tc", "d_loss", "d_acc"]
    assert bool(torch.isfinite(metrics.values).all()) and torch.equal(state.generator.get_state(), before)
