"""The native linear_leaky_relu and NativeDiscriminator (kernels/native/mlp*.cpp) against torch.

Values and gradients of the public ops with the native backend active, over many shapes
(rows 1..300, widths 1..1100 not multiples of the 16/48-column blocks), float32 and bfloat16,
slopes 0, 0.2 and 1; opcheck and torch.compile through them; every GEMM variant; and
`NativeDiscriminator` (forward, backward, Adam) against autograd and torch.optim.Adam. The
library comes from tests/test_ops_native.py's fixtures (built once per session, or
$FASTFVAE_NATIVE_LIB); without cmake or a C++ compiler these tests skip.
"""

import copy

import pytest
from cpu_bf16 import bf16_param
import torch
import torch.nn.functional as F
from ops_backends import graph_breaks_of
from test_fast_disc_by_hand import make_disc
from test_ops_native import (  # noqa: F401  (fixtures)
    assert_same_bits, isa_supported, native_lib, native_on, on_each_thread_count, run_with_isa)
from torch import nn

from fastfvae.errors import FastFVAEError
from fastfvae.models.discriminator import Discriminator
from fastfvae.ops import FusedDiscriminator, linear_leaky_relu, native
from fastfvae.ops.native_mlp import NativeDiscriminator

F32, BF16 = torch.float32, torch.bfloat16
# max |error| relative to max(|reference|, 1), per operand dtype (fp32 accumulation either way)
TOL = {F32: 1e-5, BF16: 2e-2}


def _err(actual, expected) -> float:
    return (actual.double() - expected.double()).abs().max().item() / max(expected.abs().max().item(), 1.0)


@pytest.fixture(autouse=True)
def bf16_through_the_native_kernel(monkeypatch):
    """The public op runs bf16 on the torch reference (it is faster there, `NATIVE_MLP_DTYPES`);
    these tests check the native kernel in both dtypes through the public op."""
    import fastfvae.ops.mlp as mlp_module

    monkeypatch.setattr(mlp_module, "NATIVE_MLP_DTYPES", mlp_module.NATIVE_KERNEL_DTYPES)


def test_the_public_op_runs_bf16_on_the_reference_and_fp32_natively(native_on, monkeypatch):
    import fastfvae.ops.mlp as mlp_module

    monkeypatch.setattr(mlp_module, "NATIVE_MLP_DTYPES", (torch.float32,))
    x, w, b, _ = _tensors(8, 16, 32, BF16, 4)
    assert torch.equal(linear_leaky_relu(x, w, b, 0.2), F.leaky_relu(F.linear(x, w, b), 0.2))
    assert native_on.called == []
    linear_leaky_relu(*_tensors(8, 16, 32, F32, 4)[:3], 0.2)
    assert native_on.called == ["linear_leaky_relu"]


def _tensors(M, K, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    grad = torch.randn(M, N, generator=g)
    return [t.to(dtype) for t in (x, w, b, grad)]


def _check_layer(M, K, N, dtype, slope, seed=0):
    """Forward against float64 F.linear + leaky_relu; both backward ops against float64 formulas
    on the op's own output (the derivative is read from its sign, as the contract says)."""
    x, w, b, grad = _tensors(M, K, N, dtype, seed)
    out = linear_leaky_relu(x, w, b, slope)
    assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous()
    ref = F.linear(x.double(), w.double(), b.double())
    ref = ref if slope == 1.0 else F.leaky_relu(ref, slope)
    assert _err(out, ref) <= TOL[dtype], ("forward", _err(out, ref))
    gated = grad.double() if slope == 1.0 else torch.where(out > 0, grad.double(), grad.double() * slope)
    gx = torch.ops.fastfvae.linear_leaky_relu_grad_input(grad, w, out, slope)
    gw, gb = torch.ops.fastfvae.linear_leaky_relu_grad_weight(grad, x, out, slope)
    for name, got, want in (("grad_input", gx, gated @ w.double()), ("grad_weight", gw, gated.t() @ x.double()),
                            ("grad_bias", gb, gated.sum(0))):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert _err(got, want) <= TOL[dtype], (name, _err(got, want))


SHAPES = [(1, 1, 1), (1, 10, 1000), (2, 3, 5), (3, 17, 49), (7, 33, 48), (16, 48, 97), (64, 10, 1000),
          (127, 1000, 2), (129, 100, 130), (300, 1001, 1100), (5, 1100, 31)]


@pytest.mark.parametrize("slope", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M, K, N", SHAPES, ids=lambda v: str(v))
def test_layer_matches_reference(native_on, M, K, N, dtype, slope):
    _check_layer(M, K, N, dtype, slope, seed=M * 7 + K + N)
    assert {"linear_leaky_relu", "linear_leaky_relu_grad_input", "linear_leaky_relu_grad_weight"} <= set(native_on.called)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_autograd_no_bias_non_contiguous_and_leading_dims(native_on, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 40, generator=g).to(dtype)[:, ::2].requires_grad_()  # [4, 3, 40], non-contiguous
    w = torch.randn(80, 21, generator=g).to(dtype).t().requires_grad_()       # [21, 80] as a transposed view
    w = w[:, :40]                                                              # [21, 40], strided
    out = linear_leaky_relu(x, w, None, 0.2)
    ref = F.leaky_relu(F.linear(x.double(), w.double()), 0.2)
    assert out.shape == (4, 3, 21) and _err(out, ref) <= TOL[dtype]
    grad = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, (x, w), grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    # the reference derivative from the native output's sign (the op's contract)
    mask = torch.where(out.detach() > 0, 1.0, 0.2).double()
    want = torch.autograd.grad(F.linear(x64, w64), (x64, w64), grad.double() * mask)
    for a, e in zip(got, want):
        assert a.dtype == dtype and _err(a, e) <= TOL[dtype]
    assert "linear_leaky_relu" in native_on.called


def test_float16_and_float64_run_the_reference(native_on):
    for dtype in (torch.float16, torch.float64):
        x, w, b, _ = _tensors(3, 5, 4, dtype, 1)
        assert torch.equal(linear_leaky_relu(x, w, b, 0.2), F.leaky_relu(F.linear(x, w, b), 0.2))
    assert native_on.called == []


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_opcheck_and_compile_without_graph_breaks(native_on, dtype):
    x, w, b, grad = _tensors(9, 13, 7, dtype, 2)
    ops = torch.ops.fastfvae
    torch.library.opcheck(ops.linear_leaky_relu.default, (x.requires_grad_(), w.requires_grad_(), b, 0.2))
    out = ops.linear_leaky_relu(x.detach(), w.detach(), b, 0.2)
    torch.library.opcheck(ops.linear_leaky_relu_grad_input.default, (grad, w.detach(), out, 0.2))
    torch.library.opcheck(ops.linear_leaky_relu_grad_weight.default, (grad, x.detach(), out, 0.2))
    mlp = FusedDiscriminator(13, 24, 3).to(dtype)
    z = torch.randn(9, 13).to(dtype)
    breaks, graphs, logits = graph_breaks_of(mlp, z)
    assert breaks == 0 and graphs == 1
    assert _err(logits, mlp(z)) == 0.0
    assert "linear_leaky_relu_grad_weight" in native_on.called


def test_autocast_bf16_discriminator_matches_torch_autocast(native_on):
    """FusedDiscriminator under bf16 autocast on the native GEMM: bf16 logits close to
    models.Discriminator's under the same autocast, fp32 parameter gradients."""
    torch.manual_seed(4)
    fused = FusedDiscriminator(10, 1000, 6)
    ref = Discriminator(10, 1000, 6)
    ref.load_state_dict(fused.state_dict())
    z = torch.randn(16, 10)
    with torch.autocast("cpu", BF16):
        logits, ref_logits = fused(z), ref(z)
    assert logits.dtype == ref_logits.dtype == BF16
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == F32 for p in fused.parameters())
    assert "linear_leaky_relu_grad_weight" in native_on.called


def test_disabled_and_the_info_line(native_on, monkeypatch):
    from fastfvae.cli.info import cpu_choice

    assert cpu_choice("linear_leaky_relu")[0] == "native"
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    x, w, b, _ = _tensors(3, 5, 4, F32, 1)
    assert torch.equal(linear_leaky_relu(x, w, b, 0.2), F.leaky_relu(F.linear(x, w, b), 0.2))
    assert native_on.called == [] and cpu_choice("linear_leaky_relu")[0] == "reference"


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import test_ops_mlp_native as t
from fastfvae.ops import native
native._STATE.update(tried=True, path=sys.argv[1], reason=None)
torch.ops.load_library(sys.argv[1])
print(torch.ops.fastfvae_native.mlp_isa())
for dtype in (t.F32, t.BF16):
    for M, K, N in [(1, 1, 1), (3, 17, 49), (9, 100, 97), (64, 33, 1000)]:
        for slope in (0.0, 0.2, 1.0):
            t._check_layer(M, K, N, dtype, slope)
    t._check_discriminator_steps((7, 33, 3), 5, dtype, steps=2)
    t._check_fused_update((7, 97, 3), dtype)
print("ok")
"""


@pytest.mark.parametrize("isa", [*(pytest.param(i, marks=pytest.mark.slow) for i in ("avx512_bf16", "avx512", "avx2")),
                                 "scalar"])  # one subprocess each: scalar in the default run, the others under -m slow
def test_each_gemm_variant_matches_reference(native_lib, isa):
    """FASTFVAE_NATIVE_ISA caps the GEMM variant (avx512 = AVX-512 without vdpbf16ps)."""
    chosen = run_with_isa(_ISA_SCRIPT, native_lib, isa)
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


# --- NativeDiscriminator ----------------------------------------------------------------------

def _rel(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return (got - want).norm().item() / max(want.norm().item(), 1e-30)


def _reference_grads(disc, z, grad_logits, acts=None, slope=0.2):
    """(logits, d/dz, parameter grads) in float64 by autograd; with ``acts`` (the native
    activations) the LeakyReLU derivatives are taken from their signs instead, so a pre-activation
    within round-off of 0 cannot flip one between the two computations."""
    ref = copy.deepcopy(disc).double()
    z64 = z.double().requires_grad_()
    linears = [m for m in ref.net if isinstance(m, nn.Linear)]
    h = z64
    for i, m in enumerate(linears):
        h = F.linear(h, m.weight, m.bias)
        if i + 1 < len(linears):
            if acts is None:
                h = F.leaky_relu(h, slope)
            else:
                width = m.out_features
                h = h * torch.where(acts[i + 1][: z.shape[0], :width] > 0, 1.0, slope).double()
    grads = torch.autograd.grad((h * grad_logits.double()).sum(), [z64, *ref.parameters()])
    return h.detach(), grads[0], list(grads[1:])


def _check_discriminator_steps(size, B, dtype, steps=3, lr=1e-3):
    """Per step: logits, input and parameter gradients against float64 autograd on the current
    weights (derivatives from the native signs); the Adam update against torch.optim.Adam (float64)
    fed the same gradients; the weights, moments and step count stay in torch's format."""
    disc = make_disc(size)
    opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    shadow = copy.deepcopy(disc).double()
    shadow_opt = torch.optim.Adam(shadow.parameters(), lr=lr, betas=(0.5, 0.9))
    nd = NativeDiscriminator(disc, 2 * B, dtype, opt)
    gen = torch.Generator().manual_seed(1)
    tol = 2e-5 if dtype == F32 else 2e-2
    for step in range(steps):
        z = torch.randn(2 * B, size[0], generator=gen)
        grad_logits = torch.randn(2 * B, 2, generator=gen) * 1e-2
        logits = nd.forward(z)
        want_logits, want_gz, want_grads = _reference_grads(disc, z, grad_logits, nd.acts)
        assert logits.dtype == F32 and _rel(logits, want_logits) <= tol, ("logits", step, _rel(logits, want_logits))
        gz = nd.backward(grad_logits, params=True, input_grad=True)
        assert gz.dtype == F32 and _rel(gz, want_gz) <= tol, ("input grad", step, _rel(gz, want_gz))
        for i, (got, want) in enumerate(zip(nd.grads(), want_grads)):
            assert _rel(got, want) <= tol, ("param grad", i, step, _rel(got, want))
        for p, g in zip(shadow.parameters(), nd.grads()):
            p.grad = g.double()
        shadow_opt.step()
        nd.step()
        for p, q in zip(disc.parameters(), shadow.parameters()):
            assert _rel(p, q) <= 1e-6, ("weights after Adam", step, _rel(p, q))
            assert _rel(opt.state[p]["exp_avg_sq"], shadow_opt.state[q]["exp_avg_sq"]) <= 1e-6
        shadow.load_state_dict(disc.state_dict())  # the next step from the same float32 weights
    assert all(float(opt.state[p]["step"]) == steps for p in disc.parameters())


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size, B", [((10, 32, 3), 6), ((7, 33, 2), 5), ((3, 17, 1), 1), ((5, 48, 4), 2),
                                     ((11, 97, 2), 33)], ids=str)
def test_discriminator_against_autograd_and_adam(native_on, size, B, dtype):
    _check_discriminator_steps(size, B, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_discriminator_at_the_papers_size(native_on, dtype):
    """6 x 1000, 2B = 128 rows (Kim & Mnih 2018)."""
    _check_discriminator_steps((10, 1000, 6), 64, dtype, steps=2)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_fp32_trajectory_equals_torch_autograd_and_adam(native_on, dtype):
    """Three full steps (forward, backward, Adam) of the native D against autograd +
    torch.optim.Adam on a float32 copy (fp32: close to its round-off; bf16: to bf16's)."""
    size, B = (10, 64, 3), 8
    disc = make_disc(size, seed=2)
    ref = copy.deepcopy(disc)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.5, 0.9))
    nd = NativeDiscriminator(disc, 2 * B, dtype, opt)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        z = torch.randn(2 * B, size[0], generator=gen)
        target = torch.cat([torch.zeros(B), torch.ones(B)]).long()
        logits = nd.forward(z).requires_grad_()
        loss = F.cross_entropy(logits, target)
        (grad_logits,) = torch.autograd.grad(loss, logits)
        nd.update(grad_logits)
        ref_opt.zero_grad()
        F.cross_entropy(ref(z), target).backward()
        ref_opt.step()
    tol = 1e-5 if dtype == F32 else 3e-2
    for p, q in zip(disc.parameters(), ref.parameters()):
        assert _rel(p, q) <= tol, _rel(p, q)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", [(9, 100, 3), (7, 97, 3)], ids=str)
def test_fused_update_equals_grads_then_step(native_on, dtype, size):
    """`update` (weight gradients straight into Adam) is `param_grads` + `step` bit for bit,
    and the packed copies Adam writes equal a fresh packing of the updated weights, padding
    included: 97 rows end in a band of one row, whose bfloat16 pair partner must stay zero."""
    _check_fused_update(size, dtype)


def _check_fused_update(size, dtype, B=7):
    d1, d2 = make_disc(size), make_disc(size)
    o1 = torch.optim.Adam(d1.parameters(), lr=1e-3, betas=(0.5, 0.9))
    o2 = torch.optim.Adam(d2.parameters(), lr=1e-3, betas=(0.5, 0.9))
    n1, n2 = NativeDiscriminator(d1, 2 * B, dtype, o1), NativeDiscriminator(d2, 2 * B, dtype, o2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        z, g = torch.randn(2 * B, size[0], generator=gen), torch.randn(2 * B, 2, generator=gen)
        assert torch.equal(n1.forward(z), n2.forward(z))
        n1.update(g)
        n2.param_grads(g)
        n2.step()
    for p, q in zip(d1.parameters(), d2.parameters()):
        assert torch.equal(p, q) and torch.equal(o1.state[p]["exp_avg"], o2.state[q]["exp_avg"])
    packed, packed_t = (list(t) for t in n1.packed())
    n1.parameters_changed()
    fresh, fresh_t = n1.packed()
    assert all(torch.equal(a, b) for a, b in zip(packed + packed_t, list(fresh) + list(fresh_t)))


def test_halves_start_offsets_and_repack_after_load(native_on):
    """Rows B:2B by `start`, the TC half's input gradient alone, and a load_state_dict (weights
    changed outside `step`) picked up by the next call."""
    size, B = (6, 40, 3), 4
    disc = make_disc(size)
    nd = NativeDiscriminator(disc, 2 * B, F32)
    gen = torch.Generator().manual_seed(5)
    zq, zp = torch.randn(B, 6, generator=gen), torch.randn(B, 6, generator=gen)
    both = nd.forward(torch.cat([zq, zp]))
    lq = nd.forward(zq)
    lp = nd.forward(zp, start=B)
    torch.testing.assert_close(torch.cat([lq, lp]), both, rtol=0, atol=0)
    g = torch.randn(B, 2, generator=gen)
    _, want, _ = _reference_grads(disc, zp, g, [a[B:] for a in nd.acts])
    assert _rel(nd.input_grad(g, start=B), want) <= 2e-5
    other = make_disc(size, seed=9)
    disc.load_state_dict(other.state_dict())
    torch.testing.assert_close(nd.forward(zq), other(zq), rtol=2e-5, atol=1e-6)


def test_bad_modules_and_options_raise_fastfvae_error(native_on):
    with pytest.raises(FastFVAEError, match="nn.Linear"):
        NativeDiscriminator(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 4)
    with pytest.raises(FastFVAEError, match="slope"):
        NativeDiscriminator(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(-0.1), nn.Linear(4, 2)), 4)
    with pytest.raises(FastFVAEError, match="dtype"):
        NativeDiscriminator(Discriminator(3, 8, 2), 4, torch.float16)
    disc = Discriminator(3, 8, 2)
    with pytest.raises(FastFVAEError, match="weight decay"):
        NativeDiscriminator(disc, 4, F32, torch.optim.Adam(disc.parameters(), weight_decay=0.1))
    with pytest.raises(FastFVAEError, match="optimizer"):
        NativeDiscriminator(disc, 4).step()
    nd = NativeDiscriminator(disc, 4)
    with pytest.raises(FastFVAEError, match=r"expected \[n, 3\]"):
        nd.forward(torch.randn(5, 3))
    with pytest.raises(FastFVAEError, match=r"expected \[n, 2\]"):
        nd.backward(torch.randn(2, 2), start=3)


def test_without_the_library_it_says_why(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {"tried": True, "path": None, "origin": None,
                                           "reason": "native library not built: cmake -S . -B build"})
    with pytest.raises(FastFVAEError, match="native library not built"):
        NativeDiscriminator(Discriminator(3, 8, 2), 4)


# --- threads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M, K, N", [(256, 1000, 1000), (300, 97, 1100), (1, 33, 2000)], ids=str)
def test_layer_bits_independent_of_thread_count(native_on, M, K, N, dtype):
    """linear_leaky_relu's forward, input and weight gradients on 1-4 threads, bit for bit: each
    output tile is one task summing its whole reduction (K, or the M rows for the weight and
    bias gradients) in a fixed order, so the threads only share out whole tiles and columns."""
    x, w, b, grad = _tensors(M, K, N, dtype, seed=M + K)
    n = torch.ops.fastfvae_native

    def run():
        out = n.linear_leaky_relu(x, w, b, 0.2)
        return [out, n.linear_leaky_relu_grad_input(grad, w, out, 0.2),
                *n.linear_leaky_relu_grad_weight(grad, x, out, 0.2), *n.linear_leaky_relu_grad_weight(grad, x, out, 1.0)]

    results = on_each_thread_count(run, ["mlp", "mlp_gemm"])
    assert_same_bits(results, ["forward", "grad_input", "grad_weight", "grad_bias", "grad_weight(1.0)",
                               "grad_bias(1.0)"])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_discriminator_bits_independent_of_thread_count(native_on, dtype):
    """NativeDiscriminator at the paper's size (6 x 1000, 2B = 128 rows) on 1-4 threads, bit for
    bit: forward, backward (parameter and input gradients), `step`, then a forward and the fused
    `update`: the logits, gradients, weights and Adam moments after each."""
    size, B = (10, 1000, 6), 64
    gen = torch.Generator().manual_seed(8)
    z1, z2 = torch.randn(2 * B, size[0], generator=gen), torch.randn(2 * B, size[0], generator=gen)
    g1, g2 = torch.randn(2 * B, 2, generator=gen) * 1e-2, torch.randn(2 * B, 2, generator=gen) * 1e-2

    def run():
        disc = make_disc(size, seed=3)
        opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
        nd = NativeDiscriminator(disc, 2 * B, dtype, opt)
        logits = nd.forward(z1)
        gz = nd.backward(g1, params=True, input_grad=True)
        grads = [g.clone() for g in nd.grads()]
        nd.step()
        after_step = [p.detach().clone() for p in disc.parameters()]
        logits2 = nd.forward(z2)
        nd.update(g2)
        moments = [opt.state[p][k] for p in disc.parameters() for k in ("exp_avg", "exp_avg_sq")]
        return [logits, gz, *grads, *after_step, logits2, *disc.parameters(), *moments]

    results = on_each_thread_count(run, ["mlp", "mlp_gemm"])
    L = len(list(make_disc(size).parameters())) // 2  # Linear layers
    names = (["logits", "input_grad"] + [f"grad {i}" for i in range(2 * L)] + [f"param after step {i}" for i in range(2 * L)]
             + ["logits after step"] + [f"param after update {i}" for i in range(2 * L)]
             + [f"moment {i}" for i in range(4 * L)])
    assert_same_bits(results, names)


# --- the fast step's opt-in native D ------------------------------------------------------------

@pytest.mark.parametrize("precision, d_steps", [("fp32", 1), ("fp32", 2), bf16_param("bf16", 1, id="bf16-1")])
def test_fast_step_with_native_d_keeps_parity(native_on, precision, d_steps):
    """FastOptions(native_d=True): the by-hand CPU step with D on the native library keeps the
    fast path's parity with the reference step (tests/test_fast_step.py's tolerances), and the
    optimiser state it leaves is torch's format."""
    from test_fast_step import STEPS, assert_parity, run_both, small_cfg
    from train_data import one_thread  # noqa: F401

    from fastfvae.fast import FastOptions

    cfg = small_cfg(d_steps=d_steps)
    ref_state, fast_state, ref_m, fast_m = run_both(cfg, STEPS, FastOptions(precision=precision, native_d=True))
    assert_parity(ref_state, fast_state, ref_m, fast_m, precision)
    assert "mlp_update" in native_on.called and "mlp_forward" in native_on.called
    ref_state.optims.disc.load_state_dict(fast_state.optims.disc.state_dict())


def test_fast_step_native_d_needs_the_cpu_by_hand_step(native_on):
    from fastfvae.fast import FastOptions

    with pytest.raises(FastFVAEError, match="native_d needs"):
        FastOptions(native_d=True, by_hand=False).resolved(torch.device("cpu"))
