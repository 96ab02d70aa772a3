"""The native backward prologue of a ReLU-fused convolution (kernels/native/relu_bias.cpp,
``torch.ops.fastfvae_native.relu_grad_bias``): the masked gradient exactly
``aten.threshold_backward(grad, out, 0)`` (bits, NaN and signed zeros included) and the bias
gradient its float32 sum over (B, H, W), against a float64 sum.

Checked: the VAE's shapes (batch 64), batch 1, channel counts off the 16-lane vectors (C = 1,
17, 33, 70), odd grids, float32 and bfloat16, NaN / inf / zeros in out and grad, each variant
(AVX-512, scalar) in a subprocess (scalar in the default run, AVX-512 under ``-m slow``, the
in-process tests run the dispatched one), the same bits on 1-4 threads, opcheck, refused inputs,
and the wiring in fastfvae.fast.conv / fastfvae.ops.native_conv (the layers' gradients with the
op and with the torch ops). The library comes from tests/test_ops_native.py's fixtures; without
cmake or a C++ compiler these tests skip.
"""

import pytest
import torch
from test_ops_native import each_variant, isa_supported, native_lib, native_on, run_with_isa  # noqa: F401  (fixtures)
from torch import nn

from fastfvae.fast import conv as by_hand
from fastfvae.ops import native_conv

F32, BF16 = torch.float32, torch.bfloat16
CL = torch.channels_last
# max |error| / max(sum |masked|, 1e-30) of the float32 bias against float64: float32 sums of up
# to 2^16 terms in blocks of 8192 / C rows (the block partials added in float64)
TOL = {F32: 2e-6, BF16: 2e-6}

SHAPES = [
    (64, 32, 32, 32),   # the encoder's first layer's output (the bf16 step's largest ReLU)
    (64, 64, 4, 4),
    (64, 32, 16, 16),
    (1, 32, 8, 8),      # batch 1
    (3, 17, 5, 7),      # C past one vector, odd grid
    (2, 33, 3, 3),
    (5, 70, 4, 3),      # past the four-vector group (64 channels)
    (4, 1, 9, 11),      # one channel
    (2, 5, 1, 1),
]


def _operands(shape, dtype, seed=0, specials=False):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g).relu()  # a ReLU's output: zero about half the time
    if specials:
        n = grad.numel()
        flat_g, flat_o = grad.view(-1), out.view(-1)
        idx = torch.randperm(n, generator=g)
        k = max(1, n // 40)
        nan, inf = float("nan"), float("inf")
        flat_o[idx[:k]] = nan                  # NaN in out: grad passes
        flat_o[idx[k:2 * k]] = -0.0            # -0 is <= 0: masked
        flat_o[idx[2 * k:3 * k]] = inf
        flat_o[idx[3 * k:4 * k]] = -inf
        flat_o[idx[4 * k:5 * k]] = -1.0
        flat_g[idx[5 * k:6 * k]] = nan         # NaN in grad: masked where out <= 0, else passed
        flat_g[idx[6 * k:7 * k]] = -0.0
        flat_g[idx[7 * k:8 * k]] = inf
        flat_g[idx[8 * k:9 * k]] = -inf
        flat_g[idx[9 * k:10 * k]] = 0.0
        flat_o[idx[8 * k:9 * k]] = 0.0
    return grad.to(dtype).contiguous(memory_format=CL), out.to(dtype).contiguous(memory_format=CL)


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.int16 if t.dtype == BF16 else torch.int32)


def _check(shape, dtype, specials=False, seed=0):
    grad, out = _operands(shape, dtype, seed, specials)
    masked, bias = torch.ops.fastfvae_native.relu_grad_bias(grad, out, True)
    want = torch.ops.aten.threshold_backward(grad, out, 0)
    assert masked.dtype == dtype and masked.shape == grad.shape and masked.is_contiguous(memory_format=CL)
    assert torch.equal(_bits(masked), _bits(want)), shape
    ref = want.double().sum((0, 2, 3))
    assert bias.dtype == F32 and bias.shape == (shape[1],)
    finite = torch.isfinite(ref)
    # a NaN or inf sum where float64 has one: the same class
    assert torch.equal(torch.isnan(bias), torch.isnan(ref)) and torch.equal(torch.isinf(bias), torch.isinf(ref))
    assert torch.equal(bias[torch.isinf(ref)], ref[torch.isinf(ref)].float())
    if finite.any():
        scale = want.double().abs().sum((0, 2, 3))[finite].max().clamp_min(1e-30)
        err = (bias.double()[finite] - ref[finite]).abs().max() / scale
        assert err <= TOL[dtype], (shape, err.item())
    m2, b2 = torch.ops.fastfvae_native.relu_grad_bias(grad, out, False)
    assert torch.equal(_bits(m2), _bits(want)) and b2.numel() == 0 and b2.dtype == F32


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_matches_threshold_backward_and_a_float64_sum(native_on, shape, dtype):
    _check(shape, dtype)


@pytest.mark.parametrize("shape", SHAPES[2:], ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_nan_inf_and_zeros_as_threshold_backward(native_on, shape, dtype):
    """threshold_backward passes grad unless out <= 0: a NaN out passes (NaN grad included),
    -0 and 0 mask, a masked element is +0."""
    _check(shape, dtype, specials=True, seed=7)


def test_empty_and_zero_channel_tensors(native_on):
    for shape in [(0, 8, 3, 3), (2, 8, 0, 3), (2, 0, 3, 3)]:
        grad, out = torch.zeros(shape).contiguous(memory_format=CL), torch.zeros(shape).contiguous(memory_format=CL)
        masked, bias = torch.ops.fastfvae_native.relu_grad_bias(grad, out, True)
        assert masked.shape == grad.shape and torch.equal(bias, torch.zeros(shape[1]))


def test_opcheck(native_on):
    for dtype in (F32, BF16):
        grad, out = _operands((3, 20, 5, 4), dtype)
        for need in (True, False):
            torch.library.opcheck(torch.ops.fastfvae_native.relu_grad_bias.default, (grad, out, need))


def test_bits_independent_of_thread_count(native_on):
    """Fixed row blocks whatever the threads, their partials added in block order."""
    from test_ops_native import assert_same_bits, on_each_thread_count

    shapes = [(64, 32, 32, 32), (64, 64, 8, 8), (7, 33, 9, 5)]
    ops = [_operands(s, dt, seed=i) for i, s in enumerate(shapes) for dt in (F32, BF16)]

    def run():
        return [t for g, o in ops for t in torch.ops.fastfvae_native.relu_grad_bias(g, o, True)]

    names = [f"{s} {d} {r}" for s in shapes for d in ("fp32", "bf16") for r in ("masked", "bias")]
    assert_same_bits(on_each_thread_count(run, ["relu_bias"]), names)


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import test_ops_relu_bias_native as t
torch.ops.load_library(sys.argv[1])
for dtype in (t.F32, t.BF16):
    for shape in t.SHAPES:
        t._check(shape, dtype)
    for shape in t.SHAPES[2:]:
        t._check(shape, dtype, specials=True, seed=7)
print(torch.ops.fastfvae_native.relu_grad_isa())
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512", "scalar"))
def test_each_variant_matches_reference(native_lib, isa):
    """FASTFVAE_NATIVE_ISA caps the variant; both pass the same checks."""
    chosen = run_with_isa(_ISA_SCRIPT, native_lib, isa)
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


# --- the choice and the wiring in fastfvae.fast.conv / fastfvae.ops.native_conv ------------

def test_choice(native_on, monkeypatch):
    """channels_last float32/bfloat16 CPU pairs on the AVX-512 variant; float32 only with
    FUSED_RELU_BIAS_FP32; other layouts keep the torch ops."""
    grad, out = _operands((2, 8, 4, 4), BF16)
    fits = native_conv.relu_bias_fits
    avx = torch.ops.fastfvae_native.relu_grad_isa() == "avx512"
    assert fits(grad, out) == avx
    assert not fits(grad.contiguous(), out.contiguous())       # NCHW
    assert not fits(grad, out.float().contiguous(memory_format=CL))
    assert not fits(grad.half(), out.half())
    assert not fits(grad[:1], out)
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_FP32", False)
    assert not fits(grad.float().contiguous(memory_format=CL), out.float().contiguous(memory_format=CL))
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_FP32", True)
    assert fits(grad.float().contiguous(memory_format=CL), out.float().contiguous(memory_format=CL)) == avx
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_IN_STEP", False)
    assert not fits(grad, out)
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_IN_STEP", True)
    monkeypatch.setenv(native_conv.CONV_ENV, "0")
    assert not fits(grad, out)


def _need_avx512():
    if torch.ops.fastfvae_native.relu_grad_isa() != "avx512":
        pytest.skip("relu_grad_bias joins the step on the AVX-512 variant only")


def _split_layer_grads(dtype, bias=True, batch=6):
    """The parameters' and inputs' gradients of ReLU-fused layers through `layer_split`."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(4, 32, 3, 1, 1, bias=bias), nn.Conv2d(32, 32, 4, 2, 1, bias=bias),
              nn.Conv2d(32, 64, 4, 2, 1, bias=bias), nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=bias),
              nn.Linear(1, 1)]
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(batch, c, s, s, generator=g).contiguous(memory_format=CL).requires_grad_()
              for c, s in ((4, 16), (32, 16), (32, 8), (64, 4))]
    loss = 0
    for layer, x in zip(layers, inputs):
        y = by_hand.layer_split(x, layer, dtype, relu=True)
        # a channels_last upstream gradient, as the step's (an NCHW one keeps the torch ops)
        loss = loss + (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y).contiguous(memory_format=CL)).sum()
    loss.backward()
    return [p.grad for m in layers[:4] for p in m.parameters()] + [x.grad for x in inputs]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_the_bf16_relu_layers_take_the_fused_prologue(native_on, monkeypatch, bias):
    _need_avx512()
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_IN_STEP", False)
    want = _split_layer_grads(BF16, bias)
    assert "relu_grad_bias" not in native_on.called
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_IN_STEP", True)
    got = _split_layer_grads(BF16, bias)
    assert native_on.called.count("relu_grad_bias") == 4
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        rel = (a.double() - b.double()).norm().item() / b.double().norm().clamp_min(1e-30).item()
        # the mask is the same; the bias sums: float32 against a bf16 sum (about 2^-9 relative)
        assert rel <= 1e-2, (i, rel)


def test_the_fp32_relu_layers_take_it_unless_switched_off(native_on, monkeypatch):
    assert native_conv.FUSED_RELU_BIAS_FP32
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_FP32", False)
    want = _split_layer_grads(F32)
    assert "relu_grad_bias" not in native_on.called
    _need_avx512()
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_FP32", True)
    got = _split_layer_grads(F32)
    assert native_on.called.count("relu_grad_bias") == 4
    for i, (a, b) in enumerate(zip(got, want)):
        rel = (a.double() - b.double()).norm().item() / b.double().norm().clamp_min(1e-30).item()
        assert rel <= 1e-5, (i, rel)  # the same mask; float32 sums in another order


def test_the_bf16_bias_gradient_is_a_float32_sum(native_on):
    """The bias reaches `_ConvSplitBackward` in float32 and its gradient comes back summed in
    float32, not rounded to bfloat16 on the way."""
    _need_avx512()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 32, 16, 16, generator=g).to(BF16).contiguous(memory_format=CL)
    w = (torch.randn(32, 32, 4, 4, generator=g) / 16).to(BF16).contiguous(memory_format=CL)
    b = torch.randn(32, generator=g).requires_grad_()
    y = by_hand._ConvSplitBackward.apply(x, w, b, [2, 2], [1, 1], False, True)
    up = torch.randn(y.shape, generator=g).to(BF16).contiguous(memory_format=CL)
    (gb,) = torch.autograd.grad(y, b, up)
    assert native_on.called.count("relu_grad_bias") == 1
    ref = torch.ops.aten.threshold_backward(up, y, 0).double().sum((0, 2, 3))
    err = ((gb.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
    assert gb.dtype == F32 and err <= 1e-5, err  # a bfloat16 sum would be ~2^-9 off


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_the_native_first_layer_takes_the_fused_prologue(native_on, monkeypatch, relu):
    _need_avx512()
    if not native_conv.image_isa_fits():
        pytest.skip("the native image-side layers need AVX-512")
    layer = nn.Conv2d(1, 32, 4, 2, 1)

    def grads():
        layer.zero_grad()
        g = torch.Generator().manual_seed(2)
        img = by_hand.space_to_depth(torch.rand(6, 1, 32, 32, generator=g)).contiguous(memory_format=CL)
        y = by_hand.first_conv_s2d(img, layer, BF16, relu)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y).contiguous(memory_format=CL)).sum().backward()
        return [layer.weight.grad.clone(), layer.bias.grad.clone()]

    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_IN_STEP", False)
    want = grads()
    assert "relu_grad_bias" not in native_on.called
    monkeypatch.setattr(native_conv, "FUSED_RELU_BIAS_IN_STEP", True)
    got = grads()
    assert native_on.called.count("relu_grad_bias") == (1 if relu else 0)
    for a, b in zip(got, want):
        assert a.dtype == F32
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # both float32 sums of the same masked gradient


def test_refused_inputs_name_the_problem(native_on):
    ops = torch.ops.fastfvae_native
    grad, out = _operands((2, 8, 4, 4), F32)
    cases = [
        ((grad.double(), out.double()), r"grad must be a float32 or bfloat16 \[B, C, H, W\] CPU tensor"),
        ((grad[0], out[0]), r"grad must be a float32 or bfloat16 \[B, C, H, W\]"),
        ((grad, out[:1]), r"out must be grad's Float \[2, 8, 4, 4\]"),
        ((grad, out.to(BF16)), r"out must be grad's Float \[2, 8, 4, 4\]"),
        ((grad.contiguous(), out.contiguous()), r"must be channels_last contiguous"),
        ((grad, out.contiguous()), r"must be channels_last contiguous"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match) as info:
            ops.relu_grad_bias(*args, True)
        assert "\n" not in str(info.value).split("Exception raised from")[0].strip()


def test_info_lists_the_fused_prologue(native_lib):
    from test_ops_native import _info, _row

    from fastfvae.ops import native

    out = _info({native.LIB_ENV: str(native_lib)})
    row = _row(out, "relu_grad_bias")
    assert row[1:3] == (["native", "torch"] if isa_supported("avx512") else ["torch", "torch"]), out
    off = _info({native.LIB_ENV: str(native_lib), native_conv.CONV_ENV: "0"})
    assert _row(off, "relu_grad_bias")[1] == "torch" and f"{native_conv.CONV_ENV}=0" in off
    capped = _info({native.LIB_ENV: str(native_lib), "FASTFVAE_NATIVE_ISA": "scalar"})
    assert _row(capped, "relu_grad_bias")[1] == "torch" and "the fused pass needs AVX-512" in capped
