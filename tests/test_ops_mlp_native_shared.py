"""`NativeDiscriminator.update` reusing the TC term's backward (kernels/native/mlp.cpp's shared rows).

In a FactorVAE step (Kim & Mnih 2018) D's input gradient for the TC term and D's own update
backpropagate through the same weights and activations on the codes' rows, with upstream
gradients that are parallel row by row (gamma/B * (1, -1) and -p1/2B * (1, -1)). The update
then takes those rows' layer signals from the kept TC backward, scaled, and runs the
input-gradient GEMMs on the permuted half only. Checked here: the result against autograd +
torch.optim.Adam and against the full backward; and every case where the kept signals no
longer apply (other gradients, rows overwritten, weights changed, another offset) falls back
to the full backward, bit for bit.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_fast_disc_by_hand import make_disc
from test_ops_native import assert_same_bits, native_lib, native_on, on_each_thread_count  # noqa: F401

from fastfvae.ops import native
from fastfvae.ops.native_mlp import NativeDiscriminator

F32, BF16 = torch.float32, torch.bfloat16
SIZES = [((10, 32, 3), 6), ((7, 33, 2), 5), ((3, 17, 1), 1), ((11, 97, 2), 33)]


def _rel(got, want) -> float:
    """|got - want| / |want| (Frobenius norms)."""
    got, want = got.detach().double(), want.detach().double()
    return (got - want).norm().item() / max(want.norm().item(), 1e-30)


def _factorvae_grads(logits: torch.Tensor, B: int, gamma: float = 20.0):
    """(TC term's gradient on rows 0:B, D's cross-entropy gradient on all 2B rows) at ``logits``."""
    logits = logits.detach().requires_grad_()
    (g_tc,) = torch.autograd.grad(gamma * (logits[:B, 0] - logits[:B, 1]).mean(), logits)
    target = torch.cat([torch.zeros(B), torch.ones(B)]).long()
    d_loss = 0.5 * (F.cross_entropy(logits[:B], target[:B]) + F.cross_entropy(logits[B:], target[B:]))
    (g_d,) = torch.autograd.grad(d_loss, logits)
    return g_tc[:B].contiguous(), g_d


def _sharing_and_not(size, B, dtype, seed, lr, monkeypatch):
    """Two (D, its Adam, NativeDiscriminator) from the same weights; the second never shares rows."""
    copies = []
    for _ in range(2):
        disc = make_disc(size, seed=seed)
        opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
        copies.append((disc, opt, NativeDiscriminator(disc, 2 * B, dtype, opt)))
    monkeypatch.setattr(copies[1][2], "_shared_rows", lambda grad: (0, None))
    return copies


def _factorvae_update(nd: NativeDiscriminator, zq, zp, gamma: float = 20.0):
    """One FactorVAE update's D work as the fast step calls it: TC forward and input gradient,
    the permuted half's forward, D's update. Returns the TC input gradient."""
    B = zq.shape[0]
    lq = nd.forward(zq)
    gz = nd.input_grad(_factorvae_grads(torch.cat([lq, lq]), B, gamma)[0])
    lp = nd.forward(zp, start=B)
    nd.update(_factorvae_grads(torch.cat([lq, lp]), B, gamma)[1])
    return gz


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size, B", SIZES, ids=str)
def test_shared_update_matches_autograd_and_adam(native_on, size, B, dtype):
    """Three FactorVAE updates with the shared rows against autograd + torch.optim.Adam on a
    float32 copy: the weights after each update (and in float32 the TC input gradient)."""
    disc = make_disc(size, seed=2)
    ref = copy.deepcopy(disc)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.5, 0.9))
    nd = NativeDiscriminator(disc, 2 * B, dtype, opt)
    gen = torch.Generator().manual_seed(3)
    tol = 2e-5 if dtype == F32 else 3e-2
    for _ in range(3):
        zq, zp = torch.randn(B, size[0], generator=gen), torch.randn(B, size[0], generator=gen)
        zq_ref = zq.clone().requires_grad_()
        lq_ref = ref(zq_ref)
        (gz_ref,) = torch.autograd.grad(20.0 * (lq_ref[:, 0] - lq_ref[:, 1]).mean(), zq_ref)
        gz = _factorvae_update(nd, zq, zp)
        assert nd.last_shared_rows == B
        if dtype == F32:  # bf16's input gradient, from bf16 activation signs: tests/test_ops_mlp_native.py
            assert _rel(gz, gz_ref) <= tol
        ref_opt.zero_grad()
        logits = ref(torch.cat([zq, zp]))
        target = torch.cat([torch.zeros(B), torch.ones(B)]).long()
        (0.5 * (F.cross_entropy(logits[:B], target[:B]) + F.cross_entropy(logits[B:], target[B:]))).backward()
        ref_opt.step()
        for p, q in zip(disc.parameters(), ref.parameters()):
            assert _rel(p, q) <= tol, (_rel(p, q), p.shape)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_shared_update_equals_the_full_backward(native_on, dtype, monkeypatch):
    """At the paper's D (6 x 1000, B = 64): one update with the shared rows against the same
    update through the whole backward (`_shared_rows` switched off on the second copy). The
    same TC input gradient bits; Adam's first moments (the gradients times 1 - beta1) within
    the rounding of the scaled signals (relative norm: float32 1e-6, bfloat16 one rounding of
    each scaled signal); each weight within the two steps of lr by which Adam's first update
    moves it (lr * sign(g): a gradient near zero may round to either sign)."""
    size, B, lr = (10, 1000, 6), 64, 1e-4
    (d1, o1, n1), (d2, o2, n2) = _sharing_and_not(size, B, dtype, 4, lr, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    zq, zp = torch.randn(B, 10, generator=gen), torch.randn(B, 10, generator=gen)
    assert torch.equal(_factorvae_update(n1, zq, zp), _factorvae_update(n2, zq, zp))
    assert (n1.last_shared_rows, n2.last_shared_rows) == (B, 0)
    tol = 1e-6 if dtype == F32 else 1e-2
    for p, q in zip(d1.parameters(), d2.parameters()):
        assert _rel(o1.state[p]["exp_avg"], o2.state[q]["exp_avg"]) <= tol
        assert (p - q).abs().max().item() <= 2.001 * lr


def _zero_tc(nd, zq, zp):
    B = zq.shape[0]
    lq = nd.forward(zq)
    nd.input_grad(torch.zeros(B, 2))
    lp = nd.forward(zp, start=B)
    return _factorvae_grads(torch.cat([lq, lp]), B)[1]


def _random_d_grad(nd, zq, zp):
    B = zq.shape[0]
    lq = nd.forward(zq)
    nd.input_grad(_factorvae_grads(torch.cat([lq, lq]), B)[0])
    nd.forward(zp, start=B)
    return torch.randn(2 * B, 2, generator=torch.Generator().manual_seed(7))


def _codes_overwritten(nd, zq, zp):
    B = zq.shape[0]
    lq = nd.forward(zq)
    nd.input_grad(_factorvae_grads(torch.cat([lq, lq]), B)[0])
    both = nd.forward(torch.cat([zq, zp]))  # rows 0:B written again: the kept signals no longer count
    return _factorvae_grads(both, B)[1]


def _weights_changed(nd, zq, zp):
    B = zq.shape[0]
    lq = nd.forward(zq)
    nd.input_grad(_factorvae_grads(torch.cat([lq, lq]), B)[0])
    with torch.no_grad():
        nd.linears[0].weight.mul_(0.5)  # bumps the version: the next call repacks
    both = torch.cat([nd.forward(zq), nd.forward(zp, start=B)])
    return _factorvae_grads(both, B)[1]


def _after_step(nd, zq, zp):
    B = zq.shape[0]
    lq = nd.forward(zq)
    nd.input_grad(_factorvae_grads(torch.cat([lq, lq]), B)[0])
    for i, g in enumerate(nd.grad_w + nd.grad_b):  # any gradients: step() writes through .data
        g.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(i)))
    nd.step()
    both = torch.cat([lq, nd.forward(zp, start=B)])
    return _factorvae_grads(both, B)[1]


def _parameters_changed(nd, zq, zp):
    B = zq.shape[0]
    lq = nd.forward(zq)
    nd.input_grad(_factorvae_grads(torch.cat([lq, lq]), B)[0])
    nd.linears[1].weight.data.mul_(0.5)  # .data: no version bump, hence parameters_changed()
    nd.parameters_changed()
    return _factorvae_grads(torch.cat([lq, nd.forward(zp, start=B)]), B)[1]


def _nan_in_codes_rows(nd, zq, zp):
    g = _random_rows_free(nd, zq, zp)
    g[1, 0] = float("nan")
    return g


def _inf_in_codes_rows(nd, zq, zp):
    g = _random_rows_free(nd, zq, zp)
    g[0, 1] = float("inf")
    return g


def _random_rows_free(nd, zq, zp):
    """The FactorVAE sequence, D's gradient returned for the caller to spoil."""
    B = zq.shape[0]
    lq = nd.forward(zq)
    nd.input_grad(_factorvae_grads(torch.cat([lq, lq]), B)[0])
    return _factorvae_grads(torch.cat([lq, nd.forward(zp, start=B)]), B)[1].clone()


def _other_rows(nd, zq, zp):
    B = zq.shape[0]
    nd.forward(zq)
    lp = nd.forward(zp, start=B)
    nd.input_grad(_factorvae_grads(torch.cat([lp, lp]), B)[0], start=B)  # the permuted half's rows
    return _factorvae_grads(torch.cat([nd.forward(zq), lp]), B)[1]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [_zero_tc, _random_d_grad, _codes_overwritten, _weights_changed, _after_step,
                                  _parameters_changed, _nan_in_codes_rows, _inf_in_codes_rows, _other_rows],
                         ids=lambda f: f.__name__.strip("_"))
def test_falls_back_to_the_full_backward(native_on, dtype, case, monkeypatch):
    """Where the kept signals do not apply, `update` runs the whole backward: no shared rows,
    and the same bits as a copy that never shares."""
    size, B = (9, 50, 3), 6
    (d1, o1, n1), (d2, o2, n2) = _sharing_and_not(size, B, dtype, 6, 1e-3, monkeypatch)
    gen = torch.Generator().manual_seed(8)
    zq, zp = torch.randn(B, 9, generator=gen), torch.randn(B, 9, generator=gen)
    for nd in (n1, n2):
        nd.update(case(nd, zq, zp))
    assert n1.last_shared_rows == 0
    for p, q in zip(d1.parameters(), d2.parameters()):  # NaNs where the other copy has them
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(o1.state[p]["exp_avg_sq"], o2.state[q]["exp_avg_sq"], rtol=0, atol=0,
                                   equal_nan=True)


def test_shared_rows_need_signals_and_a_scale(native_on):
    """The op itself refuses shared rows it cannot take (a caller other than NativeDiscriminator)."""
    size, B = (4, 8, 2), 3
    disc = make_disc(size)
    opt = torch.optim.Adam(disc.parameters())
    nd = NativeDiscriminator(disc, 2 * B, F32, opt)
    nd.forward(torch.randn(2 * B, 4))
    m_w, v_w, m_b, v_b, *scalars = nd._adam_args()
    params = nd.params()
    packed, packed_t = nd.packed()
    with pytest.raises(RuntimeError, match="shared rows"):
        native.ops().mlp_update(torch.randn(2 * B, 2), packed_t, nd.acts, nd.widths, nd.slope,
                                [p.data for p in params[0::2]], [p.data for p in params[1::2]], m_w, v_w, m_b, v_b,
                                packed, *scalars, nd.signals, B, None)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_an_update_of_the_kept_rows_only(native_on, dtype, monkeypatch):
    """``update`` over rows 0:B alone after their input gradient: every row shared, no
    input-gradient GEMM at all; the result as the whole backward's."""
    size, B, lr = (9, 50, 3), 6, 1e-3
    (d1, o1, n1), (d2, o2, n2) = _sharing_and_not(size, B, dtype, 7, lr, monkeypatch)
    zq = torch.randn(B, 9, generator=torch.Generator().manual_seed(9))
    for nd in (n1, n2):
        lq = nd.forward(zq)
        g_tc, g_d = _factorvae_grads(torch.cat([lq, lq]), B)
        nd.input_grad(g_tc)
        nd.update(g_d[:B].contiguous())
    assert (n1.last_shared_rows, n2.last_shared_rows) == (B, 0)
    for p, q in zip(d1.parameters(), d2.parameters()):
        assert _rel(o1.state[p]["exp_avg"], o2.state[q]["exp_avg"]) <= (1e-6 if dtype == F32 else 1e-2)
        assert (p - q).abs().max().item() <= 2.001 * lr


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_shared_update_bits_independent_of_thread_count(native_on, dtype):
    """The shared update at the paper's D (6 x 1000, B = 64) on 1-4 threads, bit for bit: the
    TC input gradient, the weights and Adam's moments."""
    size, B = (10, 1000, 6), 64
    gen = torch.Generator().manual_seed(10)
    zq, zp = torch.randn(B, 10, generator=gen), torch.randn(B, 10, generator=gen)

    def run():
        disc = make_disc(size, seed=3)
        opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
        nd = NativeDiscriminator(disc, 2 * B, dtype, opt)
        gz = _factorvae_update(nd, zq, zp)
        assert nd.last_shared_rows == B
        return [gz, *disc.parameters(), *(opt.state[p][k] for p in disc.parameters() for k in ("exp_avg", "exp_avg_sq"))]

    results = on_each_thread_count(run, ["mlp", "mlp_gemm"])
    L = len(list(make_disc(size).parameters()))
    assert_same_bits(results, ["input grad"] + [f"param {i}" for i in range(L)] + [f"moment {i}" for i in range(2 * L)])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_the_ops_without_signal_buffers(native_on, dtype):
    """mlp_backward with no signal buffers (a caller that keeps nothing) gives the bits of the
    call that keeps them."""
    size, B = (9, 50, 3), 6
    nd = NativeDiscriminator(make_disc(size, seed=11), 2 * B, dtype)
    gen = torch.Generator().manual_seed(12)
    nd.forward(torch.randn(2 * B, 9, generator=gen))
    g = torch.randn(2 * B, 2, generator=gen)
    _, packed_t = nd.packed()
    out = []
    for signals in (nd.signals, []):
        gw = [torch.zeros_like(w) for w in nd.grad_w]
        gb = [torch.zeros_like(b) for b in nd.grad_b]
        gz = native.ops().mlp_backward(g, packed_t, nd.acts, nd.widths, nd.slope, 0, True, gw, gb, signals)
        out.append([gz, *gw, *gb])
    for a, b in zip(*out):
        assert torch.equal(a, b)
