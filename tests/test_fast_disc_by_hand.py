"""fastfvae.fast.disc_by_hand: the discriminator's forward/backward written out, against
autograd on `models.Discriminator` (values, input and parameter gradients, the bf16 cache)."""

import copy

import pytest
import torch

from fastfvae.fast.disc_by_hand import DiscriminatorByHand
from fastfvae.models.discriminator import Discriminator
from train_data import one_thread  # noqa: F401 (autouse fixture)

F32, BF16 = torch.float32, torch.bfloat16
B = 6
SIZES = [(10, 32, 6), (3, 17, 1), (5, 8, 2), (7, 64, 3)]  # z_dim, hidden, num_layers


def assert_rel(got, want, tol, what=""):
    """||got - want|| <= tol ||want||."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    err, norm = (got - want).norm().item(), want.norm().item()
    assert err <= tol * norm, f"{what}: relative error {err / norm:.3g} > {tol}"


#: float32 against autograd in float64; bfloat16 against autograd on the module under bf16
#: autocast (D's bf16 error alone reaches 15% on the input gradient of a 3-layer D, by hand and
#: autocast alike, so a float64 reference could only be checked loosely)
TOL = {F32: 2e-5, BF16: 2e-2}


def reference(disc, dtype):
    """(logits function, its parameters): autograd on a float64 copy, or for bf16 on a copy
    under autocast."""
    ref = copy.deepcopy(disc)
    for p in ref.parameters():
        p.grad = None
    if dtype == F32:
        ref = ref.double()
        return (lambda z: ref(z.double())), list(ref.parameters())

    def logits(z):
        with torch.autocast("cpu", BF16):
            return ref(z).float()
    return logits, list(ref.parameters())


def make_disc(size, seed=0):
    torch.manual_seed(seed)
    disc = Discriminator(*size)
    with torch.no_grad():  # larger biases: mixed signs before every leaky ReLU
        for p in disc.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    return disc


def codes(size, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, size[0], generator=gen), torch.randn(B, size[0], generator=gen)


def setup(size, dtype, seed):
    """(module, reference fn, its params, the by-hand D on a 2B buffer, z_q, z_p)."""
    disc = make_disc(size)
    ref, ref_params = reference(disc, dtype)
    z_q, z_p = codes(size, seed)
    return disc, ref, ref_params, DiscriminatorByHand(disc, 2 * B, dtype), z_q, z_p


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_forward_into_both_halves(size, dtype):
    disc, ref, _, by_hand, z_q, z_p = setup(size, dtype, 1)
    logits_q = by_hand.forward(z_q)
    logits_p = by_hand.forward(z_p, start=B)
    assert logits_q.dtype == logits_p.dtype == F32 and logits_q.shape == (B, 2)
    assert_rel(logits_q, ref(z_q), TOL[dtype], "q rows")
    assert_rel(logits_p, ref(z_p), TOL[dtype], "p rows")
    if dtype == BF16:
        assert_rel(logits_p, disc(z_p), 5e-2, "p rows vs float32")
    # each forward kept its activations in its own rows
    assert torch.equal(by_hand.acts[0][:B], z_q.to(dtype)) and torch.equal(by_hand.acts[0][B:], z_p.to(dtype))
    hidden = disc.net[:2](z_p)
    assert_rel(by_hand.acts[1][B:], hidden, 1e-5 if dtype == F32 else 1e-2, "first hidden layer, p rows")
    assert (hidden < 0).any() and (hidden > 0).any()


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_input_grad_is_autograds(size, dtype):
    disc, ref, _, by_hand, z_q, z_p = setup(size, dtype, 2)
    by_hand.forward(z_q)
    by_hand.forward(z_p, start=B)
    params_before = [p.detach().clone() for p in disc.parameters()]
    for z, start in [(z_q, 0), (z_p, B)]:
        g = torch.randn(B, 2)
        z_ref = z.clone().requires_grad_()
        (want,) = torch.autograd.grad((ref(z_ref) * g.to(z_ref.dtype)).sum(), [z_ref])
        got = by_hand.input_grad(g, start)
        assert got.dtype == F32 and got.shape == z.shape
        assert_rel(got, want, TOL[dtype], f"rows from {start}")
    # input gradients only: no parameter gradient is made, nothing is changed
    assert all(p.grad is None for p in disc.parameters())
    assert all(torch.equal(p, q) for p, q in zip(disc.parameters(), params_before))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "accumulate"])
def test_param_grads_are_autograds_over_both_halves(size, dtype, existing):
    disc, ref, ref_params, by_hand, z_q, z_p = setup(size, dtype, 3)
    g_q, g_p = torch.randn(B, 2), torch.randn(B, 2)
    # the D loss's shape: one loss over the 2B rows of two separate forwards
    loss = (ref(z_q) * g_q).sum() + (ref(z_p) * g_p).sum()
    wants = torch.autograd.grad(loss, ref_params)
    before = []
    for p in disc.parameters():
        p.grad = torch.randn_like(p) if existing else None
        before.append(None if p.grad is None else p.grad.clone())

    by_hand.forward(z_q)
    by_hand.forward(z_p, start=B)
    by_hand.param_grads(torch.cat([g_q, g_p]))
    for (name, p), want, prior in zip(disc.named_parameters(), wants, before):
        assert p.grad is not None and p.grad.dtype == F32 and p.grad.shape == p.shape, name
        if prior is None:
            assert_rel(p.grad, want, TOL[dtype], name)
        else:  # added to what was there (compared in float64: the difference cancels)
            assert_rel(p.grad.double(), prior.double() + want.double(), TOL[dtype], name)
            assert_rel(p.grad.double() - prior.double(), want, 20 * TOL[dtype], name)


def test_param_grads_of_the_first_rows_only():
    """A gradient of n < 2B rows: the parameter gradients of rows 0..n-1 alone."""
    size = SIZES[0]
    disc = make_disc(size)
    ref, ref_params = reference(disc, F32)
    by_hand = DiscriminatorByHand(disc, 2 * B, F32)
    z_q, z_p = codes(size, 4)
    by_hand.forward(z_q)
    by_hand.forward(z_p, start=B)
    g = torch.randn(B, 2)
    wants = torch.autograd.grad((ref(z_q) * g).sum(), ref_params)
    by_hand.param_grads(g)
    for (name, p), want in zip(disc.named_parameters(), wants):
        assert_rel(p.grad, want, TOL[F32], name)


@pytest.mark.parametrize("slope", [0.0, -0.2])
def test_non_positive_slope_is_rejected(slope):
    with pytest.raises(ValueError, match="slope"):
        DiscriminatorByHand(Discriminator(4, 8, 2, slope=slope), 2 * B)


def _bf16_weights_match(by_hand, disc):
    linears = [m for m in disc.net if isinstance(m, torch.nn.Linear)]
    return all(torch.equal(w, m.weight.to(BF16)) and torch.equal(b, m.bias.to(BF16))
               for (w, b), m in zip(by_hand._weights, linears))


def test_fused_adam_needs_parameters_changed():
    """Regression: fused Adam updates the parameters in place WITHOUT bumping their version
    counters, so the bf16 weight cache cannot see the update by itself; the step calls
    `parameters_changed` after each optimiser step. Without the call D would keep running on
    the old weights."""
    size = SIZES[0]
    disc = make_disc(size)
    by_hand = DiscriminatorByHand(disc, 2 * B, BF16)
    z_q, z_p = codes(size, 5)
    old_logits = by_hand.forward(z_q)
    by_hand.forward(z_p, start=B)
    by_hand.param_grads(torch.randn(2 * B, 2))
    optim = torch.optim.Adam(disc.parameters(), lr=0.05, fused=True)
    versions = [p._version for p in disc.parameters()]
    weights_before = [p.detach().clone() for p in disc.parameters()]
    optim.step()
    assert [p._version for p in disc.parameters()] == versions  # what makes the method necessary
    assert not any(torch.equal(p, q) for p, q in zip(disc.parameters(), weights_before))
    new_ref = disc(z_q).detach()
    assert (new_ref - old_logits).norm() > 0.2 * old_logits.norm()  # a change bf16 cannot hide

    # stale without the call: the old weights, bit for bit
    assert torch.equal(by_hand.forward(z_q), old_logits)
    assert not _bf16_weights_match(by_hand, disc)

    by_hand.parameters_changed()
    fresh = by_hand.forward(z_q)
    assert _bf16_weights_match(by_hand, disc)
    assert_rel(fresh, new_ref, TOL[BF16], "after parameters_changed")


@pytest.mark.parametrize("how", ["copy_", "load_state_dict", "adam"])
def test_a_version_bump_refreshes_the_cache_by_itself(how):
    size = SIZES[2]
    disc = make_disc(size)
    by_hand = DiscriminatorByHand(disc, 2 * B, BF16)
    z, _ = codes(size, 6)
    old_logits = by_hand.forward(z)
    other = make_disc(size, seed=7)
    if how == "copy_":
        with torch.no_grad():
            for p, q in zip(disc.parameters(), other.parameters()):
                p.copy_(q)
    elif how == "load_state_dict":
        disc.load_state_dict(other.state_dict())
    else:  # the single-tensor (non-fused) Adam updates with version-bumping in-place ops
        for p in disc.parameters():
            p.grad = torch.randn_like(p)
        torch.optim.Adam(disc.parameters(), lr=0.05, foreach=False).step()
    new_ref = disc(z).detach()
    assert (new_ref - old_logits).norm() > 0.2 * old_logits.norm()
    got = by_hand.forward(z)  # no parameters_changed()
    assert _bf16_weights_match(by_hand, disc)
    assert_rel(got, new_ref, TOL[BF16], how)
