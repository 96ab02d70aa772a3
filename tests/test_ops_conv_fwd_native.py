"""The native 4x4 stride-2 padding-1 convolution (kernels/native/conv_s2_fwd.cpp,
fastfvae.ops.native_conv.conv_4s2) against torch's conv2d in float64.

Checked: values at the VAE's encoder shapes (batch 64), batch 1 / odd, odd input and output
grids, an output width of 1, channel counts off the kernels' 16-lane blocks and odd input
channels (the scalar loop in bfloat16), bias or not, ReLU or not (a NaN kept), NCHW and strided
inputs, float32 and bfloat16; a ConvTranspose2d's input gradient through its weight read as a
Conv2d weight; empty inputs and each variant (AVX-512 with and without vdpbf16ps, scalar) in a
subprocess (the default run: the empty inputs on the best variant this CPU has, the values on
the scalar one; the others under ``-m slow``: `each_variant`); the same bits on 1-4 threads;
opcheck; refused inputs; and the wiring in fastfvae.fast.conv (bf16, and fp32 on AVX-512: native,
the oneDNN path's values and gradients; fp32 with `S2_FWD_FP32` off: oneDNN). The library comes from tests/test_ops_native.py's
fixtures; without cmake or a C++ compiler these tests skip.
"""

import pytest
import torch
import torch.nn.functional as F
from test_ops_native import each_variant, isa_supported, native_lib, native_on, run_with_isa  # noqa: F401  (fixtures)
from torch import nn

from fastfvae.fast import conv as by_hand
from fastfvae.ops import native_conv

F32, BF16 = torch.float32, torch.bfloat16
CL = torch.channels_last
# max |error| / max(|reference|, 1): the output is rounded once to its dtype, float32 sums
TOL = {F32: 2e-6, BF16: 8e-3}

SHAPES = [  # B, Cin, Cout, input H, input W
    (64, 32, 32, 32, 32),  # the encoder's inner layers
    (64, 32, 64, 16, 16),
    (64, 64, 64, 8, 8),
    (1, 32, 32, 32, 32),
    (5, 6, 20, 10, 14),    # odd B, odd output grid (5 x 7), Cout off 16
    (3, 18, 33, 9, 11),    # odd input grid, Cout past 32
    (2, 4, 17, 6, 2),      # output width 1
    (2, 2, 80, 4, 30),     # Cout past 64 (two channel blocks), output rows split into runs
    (3, 7, 16, 8, 8),      # odd Cin (bfloat16: the scalar loop)
]


def _err(got, want) -> float:
    return (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)


def _transposed_storage(x):
    # the same values, stored H-major with batch and channels swapped: neither NCHW nor channels_last
    return x.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _operands(B, ci, co, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, ci, H, W, generator=g).to(dtype)
    w = (torch.randn(co, ci, 4, 4, generator=g) / (4 * ci) ** 0.5).to(dtype)
    b = torch.randn(co, generator=g).to(dtype)
    return x, w, b


def _check(B, ci, co, H, W, dtype, relu, bias, seed=0, layout=None):
    x, w, b = _operands(B, ci, co, H, W, dtype, seed)
    b = b if bias else None
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride=2, padding=1)
    ref = ref.relu() if relu else ref
    x = layout(x) if layout is not None else x.contiguous(memory_format=CL)
    out = torch.ops.fastfvae_native.conv_4s2(x, w, b, relu)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    assert _err(out, ref) <= TOL[dtype], ("conv_4s2", (B, ci, co, H, W), _err(out, ref))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values(native_on, shape, dtype):
    _check(*shape, dtype, relu=True, bias=True)
    _check(*shape, dtype, relu=False, bias=False, layout=lambda x: x.contiguous())
    _check(*shape, dtype, relu=False, bias=True, layout=_transposed_storage)


def test_weights_and_bias_in_other_dtypes(native_on):
    """float32 weights and bias with a bfloat16 input: rounded to bfloat16 (weights) and taken
    as float32 (bias), as the oneDNN path does."""
    x, w, b = _operands(3, 16, 32, 8, 8, BF16)
    w32 = w.float() + 1e-4  # not bfloat16 values: rounded inside
    ref = F.conv2d(x.double(), w32.bfloat16().double(), b.double(), stride=2, padding=1)
    assert _err(torch.ops.fastfvae_native.conv_4s2(x, w32, b.float(), False), ref) <= TOL[BF16]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_relu_keeps_nan(native_on, dtype):
    """A NaN in the input stays NaN through the fused ReLU, as through torch's relu; the
    outputs that do not read it stay finite."""
    x, w, b = _operands(2, 32, 32, 16, 16, dtype)
    x[1, 5, 3, 4] = float("nan")
    out = torch.ops.fastfvae_native.conv_4s2(x.contiguous(memory_format=CL), w, b, True)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride=2, padding=1).relu()
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any() and not ref.isnan().all()


@pytest.mark.parametrize("cin, cout, size", [(64, 64, 4), (64, 32, 8), (32, 32, 16)])
def test_is_the_transposed_convolutions_input_gradient(native_on, cin, cout, size):
    """ConvTranspose2d(cin, cout, 4, 2, 1)'s input gradient is conv_4s2 of the output gradient
    with the layer's weight [cin, cout, 4, 4] read as a Conv2d weight (the decoder's three
    inner layers' shapes)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, cin, size, size, generator=g).double().requires_grad_()
    w = (torch.randn(cin, cout, 4, 4, generator=g) / 20).bfloat16()
    grad = torch.randn(3, cout, 2 * size, 2 * size, generator=g).bfloat16()
    (want,) = torch.autograd.grad(F.conv_transpose2d(h, w.double(), stride=2, padding=1), h, grad.double())
    got = torch.ops.fastfvae_native.conv_4s2(grad.contiguous(memory_format=CL), w, None, False)
    assert got.shape == want.shape and _err(got, want) <= TOL[BF16]


_EMPTY_SCRIPT = """
import sys, torch
ops = (torch.ops.load_library(sys.argv[1]), torch.ops.fastfvae_native)[1]
print(ops.conv_isa())
for dtype in (torch.float32, torch.bfloat16):
    for B, ci, co, H, W in ((1, 4, 4, 6, 0), (1, 4, 4, 0, 6), (1, 4, 4, 1, 6), (1, 4, 4, 6, 1), (2, 6, 16, 0, 0),
                            (0, 4, 4, 6, 6), (2, 4, 0, 6, 6), (2, 0, 8, 6, 6)):
        x, w, b = torch.randn(B, ci, H, W).to(dtype), torch.randn(co, ci, 4, 4).to(dtype), torch.randn(co).to(dtype)
        out = ops.conv_4s2(x, w, b, True)
        assert out.shape == (B, co, H // 2, W // 2) and out.dtype == dtype, (B, ci, co, H, W, dtype, out.shape)
        if ci == 0:  # no input channel: the bias alone, through the ReLU
            assert torch.equal(out, b.relu().view(1, co, 1, 1).expand_as(out)), (B, ci, co, H, W, dtype)
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512_bf16", "avx512", "scalar", default="avx512_bf16"))
def test_empty_inputs(native_lib, isa):
    """No output pixel (input H or W 0 or 1), no image, no output or no input channel gives a
    result of the right shape on every variant, no crash (in a subprocess: a tiling of an empty
    row would divide by zero)."""
    chosen = run_with_isa(_EMPTY_SCRIPT, native_lib, isa)
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import test_ops_conv_fwd_native as t
torch.ops.load_library(sys.argv[1])
print(torch.ops.fastfvae_native.conv_isa())
for dtype in (t.F32, t.BF16):
    for shape in t.SHAPES[3:]:
        t._check(*shape, dtype, relu=True, bias=True)
        t._check(*shape, dtype, relu=False, bias=False, layout=lambda x: x.contiguous())
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512_bf16", "avx512", "scalar"))
def test_each_variant_matches_reference(native_lib, isa):
    """FASTFVAE_NATIVE_ISA caps the variant (avx512 = AVX-512 without vdpbf16ps)."""
    chosen = run_with_isa(_ISA_SCRIPT, native_lib, isa)
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_bits_independent_of_thread_count(native_on, dtype):
    """The threads split the images, never a sum: the same bits on 1-4 threads."""
    from test_ops_native import assert_same_bits, on_each_thread_count

    shapes = [(64, 32, 64, 16, 16), (21, 64, 64, 8, 8), (7, 18, 33, 9, 5)]
    operands = [_operands(*s, dtype, seed=i) for i, s in enumerate(shapes)]

    def run():
        return [torch.ops.fastfvae_native.conv_4s2(x.contiguous(memory_format=CL), w, b, True)
                for x, w, b in operands]

    results = on_each_thread_count(run, ["conv_s2_fwd"])
    assert_same_bits(results, [str(s) for s in shapes])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_opcheck(native_on, dtype):
    x, w, b = _operands(3, 16, 24, 10, 6, dtype)
    op = torch.ops.fastfvae_native.conv_4s2.default
    torch.library.opcheck(op, (x.contiguous(memory_format=CL), w, b, True))
    torch.library.opcheck(op, (x.contiguous(memory_format=CL), w, None, False))


def test_bad_inputs_are_refused(native_on):
    ops = torch.ops.fastfvae_native
    x, w, b = _operands(2, 8, 16, 8, 8, F32)
    cases = [
        ((x.double(), w, b), "x must be a float32 or bfloat16"),
        ((x[0], w, b), "x must be a float32 or bfloat16"),
        ((x, w[:, :4], b), r"weight must be a floating \[Cout, 8, 4, 4\]"),
        ((x, w[..., :3, :3], b), r"weight must be a floating \[Cout, 8, 4, 4\]"),
        ((x, w.int(), b), r"weight must be a floating"),
        ((x, w, b[:5]), "bias must be a floating tensor of 16 elements"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg) as info:
            ops.conv_4s2(*args, False)
        assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


def test_choice(native_on, monkeypatch):
    """bf16 with vdpbf16ps, an even Cin and an input at least S2_FWD_MIN_WIDTH wide; float32 only
    while S2_FWD_FP32 (on by default), on AVX-512."""
    x, w = torch.randn(2, 32, 16, 16).bfloat16(), torch.randn(64, 32, 4, 4)
    bf16_ok = native_conv.isa() == "avx512_bf16"
    assert native_conv.s2_fwd_fits(x, w, [2, 2], [1, 1]) == bf16_ok
    assert native_conv.S2_FWD_FP32
    monkeypatch.setattr(native_conv, "S2_FWD_FP32", False)
    assert not native_conv.s2_fwd_fits(x.float(), w, [2, 2], [1, 1])
    assert not native_conv.s2_fwd_fits(x, w, [1, 1], [1, 1])
    assert not native_conv.s2_fwd_fits(x, w, [2, 2], [0, 0])
    assert not native_conv.s2_fwd_fits(x, w[..., :3, :3], [2, 2], [1, 1])
    assert not native_conv.s2_fwd_fits(x[:, :31], w[:, :31], [2, 2], [1, 1])  # odd Cin
    assert not native_conv.s2_fwd_fits(x[..., :native_conv.S2_FWD_MIN_WIDTH - 1], w, [2, 2], [1, 1])
    monkeypatch.setattr(native_conv, "S2_FWD_FP32", True)
    assert native_conv.s2_fwd_fits(x.float(), w, [2, 2], [1, 1]) == (native_conv.isa() in native_conv.FP32_S2_ISAS)
    assert not native_conv.s2_fwd_fits(x.double(), w, [2, 2], [1, 1])
    monkeypatch.setattr(native_conv, "S2_FWD_FP32", False)
    monkeypatch.setattr(native_conv, "S2_FWD_IN_STEP", False)
    assert not native_conv.s2_fwd_fits(x, w, [2, 2], [1, 1])
    monkeypatch.setattr(native_conv, "S2_FWD_IN_STEP", True)
    monkeypatch.setenv(native_conv.CONV_ENV, "0")
    assert not native_conv.s2_fwd_fits(x, w, [2, 2], [1, 1])


def _layers_run(dtype):
    torch.manual_seed(0)
    conv_layer, deconv = nn.Conv2d(32, 64, 4, 2, 1), nn.ConvTranspose2d(64, 32, 4, 2, 1)
    x = torch.randn(4, 32, 16, 16).contiguous(memory_format=CL)
    h = torch.randn(4, 64, 8, 8).contiguous(memory_format=CL)

    def run():
        for m in (deconv, conv_layer):
            m.zero_grad()
        a, b = x.clone().requires_grad_(), h.clone().requires_grad_()
        y = by_hand.layer_split(a, conv_layer, dtype, relu=True)
        z = by_hand.layer_split(b, deconv, dtype, relu=True)
        (y.float().square().sum() + z.float().square().sum()).backward()
        return [y, z, a.grad, b.grad] + [p.grad.clone() for m in (conv_layer, deconv) for p in m.parameters()]

    return run


def test_in_conv_split(native_on, monkeypatch):
    """The bf16 strided convolution's forward (ReLU fused) and the transposed convolution's input
    gradient run on conv_4s2 (S2_FWD_IN_STEP), with the oneDNN path's values and gradients."""
    if native_conv.isa() != "avx512_bf16":
        pytest.skip("conv_4s2 joins the step only with vdpbf16ps")
    run = _layers_run(BF16)
    monkeypatch.setattr(native_conv, "S2_FWD_IN_STEP", False)
    want = run()
    assert "conv_4s2" not in native_on.called
    monkeypatch.setattr(native_conv, "S2_FWD_IN_STEP", True)
    got = run()
    assert native_on.called.count("conv_4s2") == 2  # the conv's forward, the deconv's input gradient
    for i, (a, b) in enumerate(zip(got, want)):
        rel = (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-12)
        assert rel <= 2e-2, (i, rel)


def test_float32_runs_on_avx512_and_keeps_onednn_when_switched_off(native_on, monkeypatch):
    monkeypatch.setattr(native_conv, "S2_FWD_FP32", False)
    _layers_run(F32)()
    assert "conv_4s2" not in native_on.called
    monkeypatch.setattr(native_conv, "S2_FWD_FP32", True)
    _layers_run(F32)()
    assert ("conv_4s2" in native_on.called) == (native_conv.isa() in native_conv.FP32_S2_ISAS)


def test_info_lists_conv_4s2(native_lib):
    from test_ops_native import _info, _row

    from fastfvae.ops import native

    out = _info({native.LIB_ENV: str(native_lib)})
    assert _row(out, "conv_4s2")[1] in ("native", "oneDNN")
    assert _row(out, "conv_4s2")[2] == "cuDNN"
    off = _info({native.LIB_ENV: str(native_lib), native_conv.CONV_ENV: "0"})
    assert _row(off, "conv_4s2")[1] == "oneDNN" and f"{native_conv.CONV_ENV}=0" in off
