"""`bench.wellknown_step`: the well-known PyTorch FactorVAE's iteration the benchmarks time.

What makes its row a fair baseline: D is trained on its own loss over both halves (codes and
permuted codes) and nothing else, the VAE on its own loss, and the iteration does the paper
networks' work (its FLOPs within a few percent of the reference step's)."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_train_step import build_step  # noqa: E402
from bench.conftest import random_bits_dsprites  # noqa: E402
from bench.reference_worker import ReferenceWorker  # noqa: E402
from bench.wellknown_step import WellKnownStep  # noqa: E402
from fastfvae.train.config import TrainConfig  # noqa: E402
from fastfvae.train.reference import draw_step_inputs  # noqa: E402


def _batches(batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, 64, 64, generator=g) < 0.2).float() for _ in range(2)]


def _grads_at_step(optimizer):
    """Record the gradients each time ``optimizer.step`` runs (clones, before the update)."""
    seen = []
    real_step = optimizer.step

    def step(*args, **kwargs):
        seen.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
        return real_step(*args, **kwargs)

    optimizer.step = step
    return seen


def test_d_is_updated_with_its_loss_over_both_halves():
    step = WellKnownStep(z_dim=10, seed=3)
    d_before = copy.deepcopy(step.d)
    d_inputs = []
    step.d.register_forward_pre_hook(lambda module, args: d_inputs.append(args[0].detach().clone()))
    d_grads = _grads_at_step(step.d_opt)
    x1, x2 = _batches()
    step(x1, x2)

    codes, permuted = d_inputs  # D on the first batch's codes, then on the second batch's permuted
    zeros = torch.zeros(len(codes), dtype=torch.long)
    loss = 0.5 * (F.cross_entropy(d_before(codes), zeros) + F.cross_entropy(d_before(permuted), 1 - zeros))
    expected = torch.autograd.grad(loss, list(d_before.parameters()))
    assert len(d_grads) == 1
    for got, want in zip(d_grads[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    # The permuted codes are the second batch's codes shuffled column by column.
    assert not torch.equal(codes, permuted)
    for column in range(permuted.shape[1]):
        assert not torch.equal(permuted[:, column], codes[:, column])
    assert all(not torch.equal(a, b) for a, b in zip(step.d.parameters(), d_before.parameters()))


def test_the_vae_gets_no_gradient_from_the_d_loss():
    step = WellKnownStep(z_dim=10, seed=1)
    vae_grads = _grads_at_step(step.vae_opt)
    step(*_batches(seed=1))
    after = [p.grad for p in step.vae.parameters()]
    assert len(vae_grads) == 1 and all(g is not None for g in after)
    for at_step, final in zip(vae_grads[0], after):
        assert torch.equal(at_step, final)


def test_the_iteration_does_the_paper_networks_work():
    """Its FLOPs are within 5% of the reference step's at the paper config (its D has one
    hidden layer fewer), so the ratio to it compares like with like."""
    data = random_bits_dsprites(256)
    cfg = TrainConfig(batch_size=64, d_steps=1)
    flops = {}
    for variant in ("well-known", "reference"):
        state, step = build_step(variant, cfg, data, torch.device("cpu"))
        with FlopCounterMode(display=False) as counter:
            metrics = step(draw_step_inputs(cfg, state.sampler, state.generator))
        assert math.isfinite(float(metrics["loss"]))
        flops[variant] = counter.get_total_flops()
    assert 0.95 * flops["reference"] < flops["well-known"] < flops["reference"]


def test_its_shape_is_one_d_update_on_a_second_batch():
    data = random_bits_dsprites(64)
    for bad in (dict(d_steps=5), dict(perm_batch="same")):
        with pytest.raises(ValueError, match="one D update on a second batch"):
            build_step("well-known", TrainConfig(batch_size=8, **bad), data, torch.device("cpu"))


def test_worker_times_the_well_known_iteration():
    with ReferenceWorker(batch_size=2, d_steps=1, threads=1, rows=64, warmup=1, variant="well-known") as worker:
        assert all(math.isfinite(s) and s > 0 for s in (worker.seconds_per_step(2), worker.seconds_per_step(1)))


def test_its_initialiser_takes_the_linear_layers_and_convolutions_only():
    """N(0, 0.02) weights and zero biases for nn.Linear and nn.Conv2d, as that implementation's
    initialiser; its decoder's nn.ConvTranspose2d layers (not nn.Conv2d) keep torch's default:
    uniform within 1 / sqrt(fan_in), biases too."""
    step = WellKnownStep(z_dim=10, seed=0)
    layers = [m for net in (step.vae, step.d) for m in net.modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    transposed = [m for m in layers if isinstance(m, nn.ConvTranspose2d)]
    assert len(transposed) == 5 and len(layers) == 6 + 1 + 5 + 6
    for m in layers:
        if isinstance(m, nn.ConvTranspose2d):
            bound = 1 / math.sqrt(m.weight.shape[1] * m.weight[0, 0].numel())
            assert bool((m.bias != 0).any()) and m.bias.abs().max() <= bound
            assert m.weight.abs().max() <= bound and m.weight.std() > bound / 3
        else:
            assert bool((m.bias == 0).all())
            if m.weight.numel() >= 1000:
                assert 0.018 < m.weight.std() < 0.022
