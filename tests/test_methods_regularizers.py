"""Every built-in method's regulariser against a float64 numpy transcription of
disentanglement_lib's (``methods/unsupervised/vae.py``), and its gradients by gradcheck.

The transcriptions below follow dlib's code line by line (its ``compute_gaussian_kl``,
``anneal``, ``compute_covariance_z_mean``, ``regularize_diag_off_diag_dip``,
``gaussian_log_density``, ``total_correlation`` and each model's ``regularizer``), in numpy
rather than through fastfvae's torch code, so that a slip in either shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastfvae import methods
from fastfvae.errors import FastFVAEError

# --- numpy transcriptions of disentanglement_lib ------------------------------------------------


def np_gaussian_kl(mu, logvar):
    """dlib's compute_gaussian_kl: the batch mean of the per-sample KL summed over dimensions."""
    return np.mean(0.5 * np.sum(np.square(mu) + np.exp(logvar) - logvar - 1, axis=1))


def np_anneal(c_max, step, iteration_threshold):
    return min(c_max * 1.0, c_max * 1.0 * float(step) / iteration_threshold)


def np_covariance_z_mean(mu):
    expectation_mu_mu_t = np.mean(mu[:, :, None] * mu[:, None, :], axis=0)
    expectation_mu = np.mean(mu, axis=0)
    return expectation_mu_mu_t - expectation_mu[:, None] * expectation_mu[None, :]


def np_regularize_diag_off_diag_dip(cov, lambda_od, lambda_d):
    diagonal = np.diag(cov)
    off_diagonal = cov - np.diag(diagonal)
    return lambda_od * np.sum(off_diagonal ** 2) + lambda_d * np.sum((diagonal - 1) ** 2)


def np_gaussian_log_density(samples, mean, log_var):
    normalization = np.log(2.0 * np.pi)
    inv_sigma = np.exp(-log_var)
    tmp = samples - mean
    return -0.5 * (tmp * tmp * inv_sigma + log_var + normalization)


def np_logsumexp(a, axis):
    peak = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(a - peak), axis=axis))


def np_total_correlation(z, mu, logvar):
    log_qz_prob = np_gaussian_log_density(z[:, None, :], mu[None, :, :], logvar[None, :, :])
    log_qz_product = np.sum(np_logsumexp(log_qz_prob, axis=1), axis=1)
    log_qz = np_logsumexp(np.sum(log_qz_prob, axis=2), axis=1)
    return np.mean(log_qz - log_qz_product)


def np_regularizer(name, hp, kl, mu, logvar, z, step, weights=None):
    """dlib's ``<Model>.regularizer(kl_loss, z_mean, z_logvar, z_sampled)`` for ``name``."""
    if name == "vae":
        return kl  # dlib's BetaVAE with beta = 1
    if name == "betavae":
        return hp["beta"] * kl
    if name == "annealedvae":
        c = np_anneal(hp["c_max"], step, hp["iteration_threshold"])
        return hp["gamma"] * abs(kl - c)
    if name == "factorvae":
        weight, bias = weights
        logits = z @ weight.T + bias
        return kl + hp["gamma"] * np.mean(logits[:, 0] - logits[:, 1], axis=0)
    if name == "dipvae":
        cov_z_mean = np_covariance_z_mean(mu)
        lambda_d = hp["lambda_d_factor"] * hp["lambda_od"]
        if hp["dip_type"] == "i":
            cov = cov_z_mean
        else:
            cov_enc = np.stack([np.diag(row) for row in np.exp(logvar)])
            cov = np.mean(cov_enc, axis=0) + cov_z_mean
        return kl + np_regularize_diag_off_diag_dip(cov, hp["lambda_od"], lambda_d)
    if name == "betatcvae":
        return (hp["beta"] - 1.0) * np_total_correlation(z, mu, logvar) + kl
    raise AssertionError(f"no transcription for {name}")


# --- cases -------------------------------------------------------------------------------------

#: Hyperparameters per method: the defaults ({}) and values off them, both sides of 1 where
#: 1 is special (beta) and both DIP types.
HPARAMS = {
    "vae": [{}],
    "betavae": [{}, {"beta": 1.0}, {"beta": 0.0}, {"beta": 16.0}],
    "annealedvae": [{}, {"gamma": 2.5, "c_max": 3.0, "iteration_threshold": 10},
                    {"gamma": 7.0, "c_max": 100.0, "iteration_threshold": 1}],
    "factorvae": [{}, {"gamma": 6.4}],
    "dipvae": [{}, {"dip_type": "ii", "lambda_od": 2.0, "lambda_d_factor": 1.0},
               {"dip_type": "i", "lambda_od": 0.5, "lambda_d_factor": 3.0},
               {"dip_type": "ii", "lambda_od": 50.0, "lambda_d_factor": 0.0}],
    "betatcvae": [{}, {"beta": 1.0}, {"beta": 0.5}, {"beta": 10.0}],
}

#: Steps before, at and after both iteration thresholds above (10 and the default 100000).
STEPS = (0, 1, 5, 10, 11, 50_000, 100_000, 300_000)
BATCH_SIZES = (2, 7, 64)
Z_DIMS = (1, 3, 10)
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-4)}


def test_every_builtin_has_a_case():
    assert set(HPARAMS) == set(methods.BUILTIN)


def make_inputs(batch_size: int, z_dim: int, seed: int):
    """float64 numpy (mu, logvar, z, kl): codes drawn by the reparameterisation, kl by dlib's formula."""
    rng = np.random.default_rng([seed, batch_size, z_dim])
    mu = rng.normal(0.0, 1.0, (batch_size, z_dim)) + rng.normal(0.0, 0.5, (1, z_dim))
    logvar = rng.uniform(-3.0, 1.0, (batch_size, z_dim))
    z = mu + np.exp(0.5 * logvar) * rng.normal(0.0, 1.0, (batch_size, z_dim))
    return mu, logvar, z, np_gaussian_kl(mu, logvar)


def small_discriminator(z_dim: int, dtype: torch.dtype, seed: int):
    """A fixed Linear z -> 2 logits standing in for FactorVAE's discriminator, and its numpy weights."""
    rng = np.random.default_rng([seed, z_dim, 99])
    weight, bias = rng.normal(0.0, 1.0, (2, z_dim)), rng.normal(0.0, 1.0, 2)
    net = torch.nn.Linear(z_dim, 2, dtype=dtype)
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(weight))
        net.bias.copy_(torch.from_numpy(bias))
    return net, (weight, bias)


def build(name: str, hp: dict, z_dim: int, dtype: torch.dtype, seed: int = 0):
    """The method, with (for an adversarial one) a small fixed network attached; its numpy weights."""
    method = methods.make(name, **hp)
    weights = None
    if method.adversarial:
        net, weights = small_discriminator(z_dim, dtype, seed)
        method.attach(net)
    return method, weights


def as_steps(step: int):
    """``step`` as the step passes it: an int, or a 0-dim tensor (inside a CUDA graph)."""
    return [step, torch.tensor(step), torch.tensor(float(step), dtype=torch.float32)]


CASES = [(name, i) for name in methods.BUILTIN for i in range(len(HPARAMS[name]))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("z_dim", Z_DIMS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("name,hp_index", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_regularizer_matches_disentanglement_lib(request, name, hp_index, batch_size, z_dim, dtype):
    hp = HPARAMS[name][hp_index]
    full_hp = methods.make(name, **hp).hparams.to_dict()
    mu, logvar, z, kl = make_inputs(batch_size, z_dim, seed=hp_index)
    # the numpy reference sees exactly the values the torch code sees (rounded to dtype)
    t_mu, t_logvar, t_z = (torch.from_numpy(a).to(dtype) for a in (mu, logvar, z))
    t_kl = torch.tensor(kl, dtype=dtype)
    r_mu, r_logvar, r_z, r_kl = (t.double().numpy() for t in (t_mu, t_logvar, t_z, t_kl))
    method, weights = build(name, hp, z_dim, dtype)
    if weights is not None:
        weights = tuple(torch.from_numpy(w).to(dtype).double().numpy() for w in weights)
    for step in STEPS:
        expected = np_regularizer(name, full_hp, float(r_kl), r_mu, r_logvar, r_z, step, weights)
        for passed in as_steps(step):
            got = method.regularizer(t_kl, t_mu, t_logvar, t_z, passed)
            assert got.shape == () and got.dtype == dtype, (got.shape, got.dtype)
            np.testing.assert_allclose(got.double().item(), expected, **TOLERANCE[dtype],
                                       err_msg=f"{name} {hp} step={passed!r}")


@pytest.mark.parametrize("batch_size,z_dim", [(2, 1), (7, 3), (5, 10)])
@pytest.mark.parametrize("name,hp_index", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_regularizer_gradients(request, name, hp_index, batch_size, z_dim):
    hp = HPARAMS[name][hp_index]
    mu, logvar, z, kl = make_inputs(batch_size, z_dim, seed=10 + hp_index)
    inputs = tuple(torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (kl, mu, logvar, z))
    method, _ = build(name, hp, z_dim, torch.float64)
    # annealing: on the ramp (C between 0 and c-max) and after it; |kl - C| is smooth away from kl = C
    for step in (3, torch.tensor(7), 400_000):
        assert torch.autograd.gradcheck(lambda *a: method.regularizer(*a, step), inputs), (name, hp, step)


def test_regularizer_gradient_reaches_the_inputs_it_uses():
    """gradcheck passes for a regulariser that ignores an input; here, each input a dlib
    regulariser reads must get a non-zero gradient (and the ones it ignores, none)."""
    uses = {"vae": {"kl"}, "betavae": {"kl"}, "annealedvae": {"kl"}, "factorvae": {"kl", "z"},
            "dipvae": {"kl", "mu"}, "betatcvae": {"kl", "mu", "logvar", "z"}}
    mu, logvar, z, kl = make_inputs(6, 3, seed=3)
    for name in methods.BUILTIN:
        for hp in HPARAMS[name]:
            inputs = dict(zip(("kl", "mu", "logvar", "z"),
                              (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (kl, mu, logvar, z))))
            method, _ = build(name, hp, 3, torch.float64)
            method.regularizer(*inputs.values(), 5).backward()
            want = set(uses[name])
            if name == "dipvae" and method.hparams.dip_type == "ii" and method.hparams.lambda_d_factor > 0:
                want.add("logvar")  # E[diag(exp(logvar))] only moves the diagonal
            if name == "betavae" and hp.get("beta", 1.0) == 0.0:
                want = set()
            if name == "betatcvae" and hp.get("beta") == 1.0:
                want = {"kl"}  # (beta - 1) * TC vanishes
            got = {k for k, t in inputs.items() if t.grad is not None and bool(t.grad.abs().sum() > 0)}
            assert got == want, (name, hp, got)


def test_annealed_capacity_is_dlibs_schedule():
    """dlib's test_anneal: c_max 100 over 100 iterations gives C = 0, 10, 100, 100 at steps
    0, 10, 100, 101; with kl = 0 the regulariser is gamma * C."""
    method = methods.make("annealedvae", gamma=2.0, c_max=100.0, iteration_threshold=100)
    zero = torch.zeros(3, 2)
    for step, capacity in ((0, 0.0), (10, 10.0), (50, 50.0), (100, 100.0), (101, 100.0), (10**6, 100.0)):
        for passed in as_steps(step):
            got = method.regularizer(torch.tensor(0.0), zero, zero, zero, passed)
            assert got.item() == pytest.approx(2.0 * capacity, rel=1e-6), (passed, got)
    # the KL above the capacity costs as much as below it
    over = method.regularizer(torch.tensor(60.0), zero, zero, zero, 50)
    under = method.regularizer(torch.tensor(40.0), zero, zero, zero, 50)
    assert over.item() == pytest.approx(20.0) and under.item() == pytest.approx(20.0)


def test_total_correlation_of_identical_posteriors_is_minus_z_minus_one_log_b():
    """dlib's test_total_correlation, exactly: when every posterior in the batch is the same,
    q(z_j) and each q(z_jl) are that one density, so the estimate (which leaves out the
    (z - 1) * log(B * N) constant) is -(z - 1) * log(B) for any codes."""
    g = torch.Generator().manual_seed(0)
    for batch_size, z_dim in ((64, 10), (7, 1), (9, 4)):
        mu = torch.randn(1, z_dim, generator=g, dtype=torch.float64).expand(batch_size, z_dim)
        logvar = torch.randn(1, z_dim, generator=g, dtype=torch.float64).expand(batch_size, z_dim)
        z = torch.randn(batch_size, z_dim, generator=g, dtype=torch.float64)
        for beta in (2.0, 6.0):
            got = methods.make("betatcvae", beta=beta).regularizer(torch.tensor(1.5, dtype=torch.float64),
                                                                   mu, logvar, z, 0)
            expected = 1.5 - (beta - 1.0) * (z_dim - 1) * math.log(batch_size)
            assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (batch_size, z_dim, beta)


def test_dip_penalty_is_zero_for_whitened_means():
    """dlib's regularize_diag_off_diag_dip is 0 at the identity: means with batch covariance I
    (and, for ii, variances small enough to ignore) cost only the KL."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(200, 4, generator=g, dtype=torch.float64)
    centred = raw - raw.mean(0)
    cov = centred.T @ centred / 200
    whitened = centred @ torch.linalg.inv(torch.linalg.cholesky(cov)).T + 3.0  # E[mu] != 0 on purpose
    kl = torch.tensor(2.0, dtype=torch.float64)
    for dip_type, logvar in (("i", torch.zeros(200, 4)), ("ii", torch.full((200, 4), -60.0))):
        method = methods.make("dipvae", dip_type=dip_type, lambda_od=50.0, lambda_d_factor=10.0)
        got = method.regularizer(kl, whitened, logvar.double(), whitened, 0)
        assert got.item() == pytest.approx(2.0, abs=1e-9), (dip_type, got)


def test_factorvae_regularizer_needs_its_network():
    method = methods.make("factorvae")
    x = torch.zeros(4, 3)
    with pytest.raises(FastFVAEError, match="attach"):
        method.regularizer(torch.tensor(0.0), x, x, x, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,hp_index", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_regularizer_on_cuda_without_host_sync(name, hp_index):
    """The same numbers on the GPU, fp32, with the step a device tensor, and no host sync
    (torch raises on one in sync-debug mode "error")."""
    hp = HPARAMS[name][hp_index]
    full_hp = methods.make(name, **hp).hparams.to_dict()
    mu, logvar, z, kl = make_inputs(64, 10, seed=hp_index)
    dev = torch.device("cuda")
    t = [torch.tensor(a, dtype=torch.float32, device=dev, requires_grad=True) for a in (kl, mu, logvar, z)]
    method, weights = build(name, hp, 10, torch.float32)
    if method.adversarial:
        method.network.to(dev)
    step = torch.tensor(50_000, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = method.regularizer(*t, step)
        got.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda" and got.dtype == torch.float32
    r = [x.detach().double().cpu().numpy() for x in t]
    if weights is not None:
        weights = tuple(torch.from_numpy(w).float().double().numpy() for w in weights)
    expected = np_regularizer(name, full_hp, float(r[0]), r[1], r[2], r[3], 50_000, weights)
    np.testing.assert_allclose(got.double().item(), expected, **TOLERANCE[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_annealed_regularizer_follows_the_step_inside_a_cuda_graph():
    """Captured once, replayed with the step counter advanced in place: C follows the device
    step, which a Python branch on the step's value could not do."""
    dev = torch.device("cuda")
    method = methods.make("annealedvae", gamma=3.0, c_max=10.0, iteration_threshold=100)
    kl = torch.tensor(4.0, device=dev)
    zero = torch.zeros(8, 3, device=dev)
    step = torch.zeros((), dtype=torch.int64, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        method.regularizer(kl, zero, zero, zero, step)  # warm-up off the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = method.regularizer(kl, zero, zero, zero, step)
    for value in (0, 20, 40, 100, 250):
        step.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert out.item() == pytest.approx(3.0 * abs(4.0 - min(10.0, 10.0 * value / 100)), rel=1e-6), value
