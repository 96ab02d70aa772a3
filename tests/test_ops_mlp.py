"""linear_leaky_relu, FusedMLP, FusedDiscriminator: values, gradients, state_dicts, registration."""

import pytest
import torch
import torch.nn.functional as F
from ops_backends import backend, cuda_backend, graph_breaks_of  # noqa: F401  (fixtures)
from torch import nn

from fastfvae.errors import FastFVAEError
from fastfvae.models.discriminator import Discriminator
from fastfvae.ops import FusedDiscriminator, FusedMLP, linear_leaky_relu

# (atol, rtol) relative to the largest magnitude of the float64 result
TOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _close(actual, expected, dtype):
    assert actual.dtype == dtype
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= TOL[dtype] * max(expected.abs().max().item(), 1.0), err


def _check_layer(x, weight, bias, slope):
    """Values and gradients of x, weight, bias against F.leaky_relu(F.linear) in float64."""
    dtype = x.dtype
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = linear_leaky_relu(leaves[0], leaves[1], leaves[2] if bias is not None else None, slope)
    y_ref = F.leaky_relu(F.linear(*ref_leaves), slope)
    assert y.shape == y_ref.shape
    _close(y, y_ref, dtype)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(y.device)
    grads = torch.autograd.grad(y, leaves, grad)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, grad.double())
    for a, e in zip(grads, ref_grads):
        _close(a, e, dtype)


def _layer(M, K, N, dtype, device, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    return [None if t is None else t.to(dtype).to(device) for t in (x, w, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [1, 10, 33])
@pytest.mark.parametrize("M", [1, 2, 3, 64, 127, 512])
def test_hidden_8(backend, monkeypatch, M, K, dtype):
    with backend.expect_kernel(monkeypatch, "mlp", "linear_act_forward"):
        _check_layer(*_layer(M, K, 8, dtype, backend.device, seed=M * 100 + K), slope=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K, slope", [(1, 10, 0.2), (3, 1000, 0.2), (2, 1000, 1.0)])
def test_hidden_1000(backend, M, K, slope, dtype):
    """Multi-block tiles and K loops (small batches: the interpreter is slow)."""
    _check_layer(*_layer(M, K, 1000, dtype, backend.device, seed=M + K), slope=slope)


@pytest.mark.parametrize("slope", [0.0, 1.0, 0.01])
def test_slopes_no_bias_and_leading_dims(backend, slope):
    x, w, _ = _layer(6, 12, 20, torch.float32, backend.device, seed=1, bias=False)
    _check_layer(x, w, None, slope)
    x3 = x.view(2, 3, 12)
    y = linear_leaky_relu(x3, w, None, slope)
    assert y.shape == (2, 3, 20)
    _close(y, F.leaky_relu(F.linear(x3.double(), w.double()), slope), torch.float32)


def test_non_contiguous_inputs_and_stride0_grad(backend):
    x, w, b = _layer(40, 24, 16, torch.float32, backend.device, seed=2)
    _check_layer(x.t().contiguous().t()[::2], w.t().contiguous().t(), b, 0.2)  # column-major, strided
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    linear_leaky_relu(x, w, b, 0.2).sum().backward()  # gradient arrives with stride 0
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.leaky_relu(F.linear(xd, wd, bd), 0.2).sum().backward()
    for a, e in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        _close(a, e, torch.float32)


def test_bfloat16_and_large_on_gpu(cuda_backend):
    _check_layer(*_layer(64, 10, 1000, torch.bfloat16, "cuda", seed=3), slope=0.2)
    _check_layer(*_layer(512, 1000, 1000, torch.bfloat16, "cuda", seed=4), slope=0.2)
    _check_layer(*_layer(4096, 1000, 1000, torch.float16, "cuda", seed=5), slope=0.2)
    _check_layer(*_layer(512, 1000, 1000, torch.float32, "cuda", seed=6), slope=0.2)


def test_fused_mlp_matches_sequential_and_shares_keys(backend):
    torch.manual_seed(0)
    fused = FusedMLP([5, 16, 16, 2], slope=0.2).to(backend.device)
    seq = nn.Sequential(nn.Linear(5, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 2))
    assert list(fused.state_dict()) == list(seq.state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    seq.load_state_dict(fused.state_dict())
    seq = seq.to(backend.device)
    x = torch.randn(7, 5, device=backend.device)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-6)
    fused.load_state_dict(seq.state_dict())
    shared = FusedMLP.from_sequential(seq)
    assert shared[0].weight is seq[0].weight
    head = shared[2:]  # nn.Sequential slicing keeps the type and the names
    assert isinstance(head, FusedMLP) and list(head.state_dict())[0] == "2.weight"
    torch.testing.assert_close(head(torch.relu(seq[0](x))), seq[2:](torch.relu(seq[0](x))), rtol=1e-5, atol=1e-6)
    shared(x).square().sum().backward()
    ref = [p.grad.clone() for p in seq.parameters()]
    seq.zero_grad()
    seq(x).square().sum().backward()
    for a, e in zip(ref, (p.grad for p in seq.parameters())):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_fused_discriminator_is_a_drop_in_for_models_discriminator(backend):
    """Same keys, same initialisation under one seed, checkpoints load both ways, same logits."""
    torch.manual_seed(1)
    ref = Discriminator(z_dim=10, hidden=1000, num_layers=6, slope=0.2)
    torch.manual_seed(1)
    fused = FusedDiscriminator(z_dim=10, hidden=1000, num_layers=6, slope=0.2)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert list(fused.state_dict())[-1] == "net.12.bias"
    for (name, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    other = Discriminator(z_dim=10, hidden=1000)
    other.load_state_dict(fused.state_dict())
    fused.load_state_dict(other.state_dict())
    ref, fused = ref.to(backend.device), fused.to(backend.device)
    z = torch.randn(2, 10, device=backend.device)
    logits = fused(z)
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, ref(z), rtol=1e-4, atol=1e-5)
    F.cross_entropy(logits, torch.tensor([0, 1], device=backend.device)).backward()
    F.cross_entropy(ref(z), torch.tensor([0, 1], device=backend.device)).backward()
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_inputs_raise_fastfvae_error():
    x, w, b = _layer(3, 4, 5, torch.float32, "cpu", seed=7)
    with pytest.raises(FastFVAEError, match="slope"):
        linear_leaky_relu(x, w, b, -0.1)
    with pytest.raises(FastFVAEError, match="weight"):
        linear_leaky_relu(x, w.t(), b, 0.2)
    with pytest.raises(FastFVAEError, match="bias"):
        linear_leaky_relu(x, w, b[:2], 0.2)
    with pytest.raises(FastFVAEError, match="weight is torch.float64"):
        linear_leaky_relu(x, w.double(), b, 0.2)
    with pytest.raises(FastFVAEError, match="nn.Linear"):
        FusedMLP(modules=[nn.LeakyReLU(0.2), nn.Linear(3, 3)])
    with pytest.raises(FastFVAEError, match=">= 0"):
        FusedMLP(modules=[nn.Linear(3, 3), nn.LeakyReLU(-0.5), nn.Linear(3, 3)])
    with pytest.raises(FastFVAEError, match="sizes"):
        FusedMLP([3])


def test_opcheck(backend):
    x, w, b = (t.requires_grad_() for t in _layer(5, 6, 7, torch.float32, backend.device, seed=8))
    ops = torch.ops.fastfvae
    torch.library.opcheck(ops.linear_leaky_relu.default, (x, w, b, 0.2))
    torch.library.opcheck(ops.linear_leaky_relu.default, (x, w, None, 1.0))
    y = linear_leaky_relu(x, w, b, 0.2).detach()
    g = torch.randn_like(y)
    torch.library.opcheck(ops.linear_leaky_relu_grad_input.default, (g, w.detach(), y, 0.2))
    torch.library.opcheck(ops.linear_leaky_relu_grad_weight.default, (g, x.detach(), y, 0.2))


def test_compiles_without_graph_breaks(backend):
    torch.manual_seed(2)
    mlp = FusedMLP([4, 8, 8, 2], slope=0.2).to(backend.device)
    x = torch.randn(6, 4, device=backend.device, requires_grad=True)
    breaks, graphs, out = graph_breaks_of(mlp, x)
    assert (breaks, graphs) == (0, 1)
    seq = nn.Sequential(*list(mlp))
    torch.testing.assert_close(out, nn.Sequential.forward(seq, x), rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in mlp.parameters())


def test_gradcheck_float64_reference():
    leaves = [t.double().requires_grad_() for t in _layer(4, 3, 5, torch.float32, "cpu", seed=9)]
    for slope in (0.2, 1.0):
        assert torch.autograd.gradcheck(lambda x, w, b: linear_leaky_relu(x, w, b, slope), leaves)


def test_cpu_reference_matches_eager_bit_for_bit(monkeypatch):
    """On CPU the fused discriminator's torch reference is eager torch's arithmetic: logits and
    all gradients equal (the native library, when loaded, is checked against it with tolerances
    in tests/test_ops_mlp_native.py)."""
    monkeypatch.setenv("FASTFVAE_NO_NATIVE", "1")
    torch.manual_seed(3)
    ref = Discriminator(z_dim=10, hidden=64, num_layers=3)
    torch.manual_seed(3)
    fused = FusedDiscriminator(z_dim=10, hidden=64, num_layers=3)
    z = torch.randn(32, 10, requires_grad=True)
    target = torch.randint(0, 2, (32,))
    grads = torch.autograd.grad(F.cross_entropy(fused(z), target), [z, *fused.parameters()])
    ref_grads = torch.autograd.grad(F.cross_entropy(ref(z), target), [z, *ref.parameters()])
    assert torch.equal(fused(z), ref(z))
    for a, e in zip(grads, ref_grads):
        assert torch.equal(a, e)


# --- autocast: the op runs in the autocast dtype, as F.linear does ---------------------------

def _autocast_dtypes(backend):
    # bf16 tl.dot does not run under the interpreter; fp16 autocast exercises the same casts there
    return [torch.float16] if backend.name == "interp" else [torch.bfloat16, torch.float16]


def test_autocast_runs_the_discriminator_in_the_autocast_dtype(backend, monkeypatch):
    """FusedDiscriminator at the paper's size under autocast: bf16/fp16 logits equal to
    models.Discriminator's under the same autocast (nn.Linear's autocast rule), fp32 grads
    for the fp32 parameters; the same call crashed on the next layer's dtype check before.
    (The torch backend is the reference; the native library's autocast: test_ops_mlp_native.py.)"""
    monkeypatch.setenv("FASTFVAE_NO_NATIVE", "1")
    dev = backend.device
    torch.manual_seed(4)
    fused = FusedDiscriminator(10, 1000, 6).to(dev)
    ref = Discriminator(10, 1000, 6).to(dev)
    ref.load_state_dict(fused.state_dict())
    z = torch.randn(4, 10, device=dev, requires_grad=True)
    for dtype in _autocast_dtypes(backend):
        with torch.autocast(dev.type, dtype):
            logits, ref_logits = fused(z), ref(z)
        assert logits.dtype == ref_logits.dtype == dtype
        if backend.name == "torch":  # the same F.linear calls, in the same dtype
            assert torch.equal(logits, ref_logits)
        else:
            torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)
        (grad_z,) = torch.autograd.grad(logits.float().sum(), z, retain_graph=True)
        assert grad_z.dtype == torch.float32
    logits.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in fused.parameters())
    assert fused(z).dtype == torch.float32  # outside autocast: fp32 again


def test_autocast_output_dtype_matches_the_fake_impl():
    """What torch.compile's tracing sees (the fake impl, under FakeTensorMode) is what the eager
    op returns, under autocast too -- a mismatch breaks the next compiled layer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = _layer(3, 8, 5, torch.float32, "cpu", seed=10)
    op = torch.ops.fastfvae.linear_leaky_relu.default
    with torch.autocast("cpu", torch.bfloat16):
        real = op(x, w, b, 0.2)
        with FakeTensorMode() as mode:
            fake = op(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), 0.2)
    assert real.dtype == fake.dtype == torch.bfloat16
    assert op(x, w, b, 0.2).dtype == torch.float32


def test_autocast_reaches_the_compiled_fused_step_discriminator(monkeypatch):
    """The fast step's fused D (select_ops: the run's Discriminator parameters through
    FusedDiscriminator), eager and compiled (aot_eager traces the same dispatch as Inductor):
    bf16 logits under bf16 autocast, fp32 gradients on the run's parameters (the torch
    reference, compared exactly; the native library's: test_ops_mlp_native.py)."""
    from fastfvae.fast.impl import select_ops

    monkeypatch.setenv("FASTFVAE_NO_NATIVE", "1")

    torch.manual_seed(5)
    disc = Discriminator(z_dim=10, hidden=64, num_layers=3)
    ops = select_ops(disc, fused=True)
    z = torch.randn(6, 10)
    with torch.autocast("cpu", torch.bfloat16):
        expected = disc(z)
    compiled = torch.compile(ops.disc, backend="aot_eager", fullgraph=True)
    try:
        for fn in (ops.disc, compiled):
            with torch.autocast("cpu", torch.bfloat16):
                logits = fn(z)
            assert logits.dtype == torch.bfloat16
            torch.testing.assert_close(logits, expected, rtol=0, atol=0)
            disc.zero_grad(set_to_none=True)
            logits.float().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in disc.parameters())
    finally:
        torch._dynamo.reset()


def test_autotuner_prunes_to_the_launch_operand_kind():
    """The GPU autotuner only tries the configs of the launch's kind (each kind's list is the
    spill-free one tests/test_kernels_sm90.py checks): fp32 FMA, fp32 as TF32, 16-bit."""
    from fastfvae.kernels import mlp

    cases = [("ieee", torch.float32, mlp._CONFIGS_IEEE), ("tf32", torch.float32, mlp._CONFIGS_TF32),
             ("tf32", torch.bfloat16, mlp._CONFIGS_16BIT), ("tf32", torch.float16, mlp._CONFIGS_16BIT)]
    for precision, dtype, expected in cases:
        kept = mlp._prune(mlp._ALL_CONFIGS, {"a_ptr": torch.empty(1, dtype=dtype)}, PRECISION=precision)
        assert len(kept) == len(expected) and all(a is b for a, b in zip(kept, expected)), (precision, dtype)
    assert mlp.fixed_config("ieee") is not mlp.fixed_config("tf32")
