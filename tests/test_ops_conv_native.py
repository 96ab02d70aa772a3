"""The native one-channel image-side convolutions (kernels/native/conv_image.cpp,
fastfvae.ops.native_conv) against torch's conv2d / conv_transpose2d in float64.

Values and all gradients (input, weight, bias) of the encoder's first layer (Conv2d(1, C, 4, 2,
1), ReLU fused or not) and the decoder's last layer (ConvTranspose2d(C, 1, 4, 2, 1)), float32
and bfloat16, plain image and space-to-depth form, batch 1 / 3 / 64 / odd, grids down to 1 x 1
and widths that are not multiples of the kernels' 8 / 16 blocks (edge pixels, padding), channels
not multiples of 16, bias or not, non-contiguous inputs; each variant (AVX-512 with and without
vdpbf16ps, scalar), conv_transpose_4s2's empty inputs on each (in subprocesses: the default run
takes the values on the scalar variant and the empty inputs on the best one this CPU has, the
others are under ``-m slow``: `each_variant`); and the wiring in fastfvae.fast.conv. The library
comes from tests/test_ops_native.py's fixtures; without cmake or a C++ compiler these tests skip.
"""

import pytest
import torch
import torch.nn.functional as F
from test_ops_native import each_variant, isa_supported, native_lib, native_on, run_with_isa  # noqa: F401  (fixtures)
import cpu_bf16
from cpu_bf16 import bf16_param
from torch import nn

from fastfvae.fast import conv as by_hand
from fastfvae.ops import native_conv

F32, BF16 = torch.float32, torch.bfloat16
# max |error| / max(|reference|, 1): outputs and input gradients are rounded once to the dtype;
# weight / bias gradients are float32 sums (of up to 64 * 32 * 32 products) in both dtypes
TOL = {F32: 2e-6, BF16: 8e-3}
TOL_PARAM = 2e-5

SHAPES = [  # B, C, H, W (blocks: the image is 2H x 2W)
    (1, 32, 32, 32),  # the VAE's layers, one image
    (3, 32, 32, 32),
    (64, 32, 4, 4),
    (5, 17, 3, 7),    # odd everything
    (2, 33, 5, 18),   # C past a 16-lane block, W past 16
    (1, 1, 1, 1),
    (3, 8, 9, 1),
]


def _err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)


def _layers(c, bias, seed):
    torch.manual_seed(seed)
    first, last = nn.Conv2d(1, c, 4, 2, 1, bias=bias), nn.ConvTranspose2d(c, 1, 4, 2, 1, bias=bias)
    with torch.no_grad():  # biases of the outputs' size, so that ReLU masks are mixed
        for m in (first, last):
            if bias:
                m.bias.normal_()
    return first, last


def _ref_grads(fn, inp, layer, dtype, grad, relu=False):
    """fn in float64 on the inputs and parameters rounded to ``dtype``: (out, d inp, d w, d b)."""
    x = inp.detach().to(dtype).double().requires_grad_()
    w = layer.weight.detach().to(dtype).double().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().to(dtype).double().requires_grad_()
    out = fn(x, w, b, stride=2, padding=1)
    if relu:
        out = out.relu()
    out.backward(grad.double())
    return out, x.grad, w.grad, None if b is None else b.grad


def _check_first(B, C, H, W, dtype, s2d, relu, bias, seed=0, layout=None):
    first, _ = _layers(C, bias, seed)
    g = torch.Generator().manual_seed(seed + 1)
    img = torch.rand(B, 1, 2 * H, 2 * W, generator=g).to(dtype)
    grad = torch.randn(B, C, H, W, generator=g).to(dtype)
    ref, ref_x, ref_w, ref_b = _ref_grads(F.conv2d, img, first, dtype, grad, relu)
    x = by_hand.space_to_depth(img) if s2d else img
    if layout is not None:
        x = layout(x)
    x = x.detach().requires_grad_()
    out = native_conv.first_conv(x, first, dtype, relu, s2d=s2d)
    assert out.dtype == dtype and out.shape == (B, C, H, W)
    assert out.is_contiguous(memory_format=torch.channels_last)
    gx, gw, *gb = torch.autograd.grad(out, [x, first.weight] + ([first.bias] if bias else []), grad)
    if s2d:
        gx = by_hand.depth_to_space(gx)
    assert gw.dtype == F32 and gx.dtype == dtype
    assert _err(out, ref) <= TOL[dtype], ("forward", _err(out, ref))
    assert _err(gx, ref_x) <= TOL[dtype], ("grad image", _err(gx, ref_x))
    assert _err(gw, ref_w) <= TOL_PARAM, ("grad weight", _err(gw, ref_w))
    if bias:
        assert _err(gb[0], ref_b) <= TOL_PARAM, ("grad bias", _err(gb[0], ref_b))


def _check_last(B, C, H, W, dtype, s2d, bias, seed=0, layout=None):
    _, last = _layers(C, bias, seed)
    g = torch.Generator().manual_seed(seed + 2)
    h = torch.randn(B, C, H, W, generator=g).to(dtype)
    grad = torch.randn(B, 1, 2 * H, 2 * W, generator=g).to(dtype)
    ref, ref_h, ref_w, ref_b = _ref_grads(F.conv_transpose2d, h, last, dtype, grad)
    h = (layout(h) if layout is not None else h.contiguous(memory_format=torch.channels_last)).requires_grad_()
    out = native_conv.last_deconv(h, last, dtype, s2d=s2d)
    assert out.dtype == dtype and out.shape == ((B, 4, H, W) if s2d else (B, 1, 2 * H, 2 * W))
    gout = by_hand.space_to_depth(grad) if s2d else grad
    gh, gw, *gb = torch.autograd.grad(out, [h, last.weight] + ([last.bias] if bias else []), gout)
    if s2d:
        out = by_hand.depth_to_space(out)
    assert _err(out, ref) <= TOL[dtype], ("forward", _err(out, ref))
    assert _err(gh, ref_h) <= TOL[dtype], ("grad h", _err(gh, ref_h))
    assert _err(gw, ref_w) <= TOL_PARAM, ("grad weight", _err(gw, ref_w))
    if bias:
        assert _err(gb[0], ref_b) <= TOL_PARAM, ("grad bias", _err(gb[0], ref_b))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("s2d", [True, False], ids=["s2d", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_first_layer_values_and_gradients(native_on, shape, dtype, s2d):
    _check_first(*shape, dtype, s2d, relu=True, bias=True)
    assert {"image_conv", "image_conv_weight_grad", "image_conv_transpose"} <= set(native_on.called)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("s2d", [True, False], ids=["s2d", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_last_layer_values_and_gradients(native_on, shape, dtype, s2d):
    _check_last(*shape, dtype, s2d, bias=True)
    assert {"image_conv", "image_conv_weight_grad", "image_conv_transpose"} <= set(native_on.called)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_no_bias_no_relu(native_on, dtype):
    _check_first(3, 32, 6, 5, dtype, True, relu=False, bias=False)
    _check_last(3, 32, 6, 5, dtype, True, bias=False)


def _transposed_storage(x):
    """Same values, strides of neither contiguous nor channels_last."""
    return x.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", [_transposed_storage, lambda x: x.contiguous(),
                                    lambda x: torch.stack([x, x], 1)[:, 1]], ids=["transposed", "nchw", "strided"])
def test_other_layouts(native_on, dtype, layout):
    for s2d in (True, False):
        _check_first(3, 32, 5, 7, dtype, s2d, relu=True, bias=True, layout=layout)
        _check_last(3, 32, 5, 7, dtype, s2d, bias=True, layout=layout)


def test_batch_64_of_the_model(native_on):
    _check_first(64, 32, 32, 32, BF16, True, relu=True, bias=True)
    _check_last(64, 32, 32, 32, BF16, True, bias=True)


def test_threads_split_the_batch(native_on):
    """Two threads: each takes part of the batch; the weight gradient adds the parts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_first(7, 32, 8, 8, F32, True, relu=True, bias=True)
        _check_last(7, 32, 8, 8, BF16, False, bias=True)
    finally:
        torch.set_num_threads(threads)


def test_bad_shapes_are_refused(native_on):
    ops = torch.ops.fastfvae_native
    w = torch.randn(8, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"img must be \[B, 4, H, W\]"):
        ops.image_conv(torch.randn(2, 1, 8, 8), w, None, False, True)
    with pytest.raises(RuntimeError, match=r"img must be \[B, 1, 2H, 2W\]"):
        ops.image_conv(torch.randn(2, 1, 7, 8), w, None, False, False)
    with pytest.raises(RuntimeError, match=r"weight must be a floating \[8, 1, 4, 4\]"):
        ops.image_conv_transpose(torch.randn(2, 8, 4, 4), torch.randn(8, 1, 3, 3), None, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.image_conv(torch.randn(2, 4, 4, 4, dtype=torch.float64), w, None, False, True)
    with pytest.raises(RuntimeError, match="h must be"):
        ops.image_conv_weight_grad(torch.randn(2, 4, 4, 4), torch.randn(2, 8, 4, 5), True)


# --- conv_transpose_4s2: the 4x4 stride-2 transposed convolution -----------------------------

S2_SHAPES = [  # B, Cin, Cout, H, W (input grid)
    (64, 32, 32, 16, 16),  # the decoder's layers
    (3, 64, 32, 8, 8),
    (2, 64, 64, 4, 4),
    (1, 64, 64, 1, 1),
    (5, 6, 17, 3, 7),      # Cout not a multiple of 16, pixels not a multiple of the tile
    (2, 32, 70, 5, 4),     # Cout past 64
    (1, 3, 5, 2, 3),       # odd Cin (scalar path)
    # the AVX-512 tiles (at most 12 / 12 / 8 / 6 pixels for 1 / 2 / 3 / 4 vectors of 16 output
    # channels): a row split in unequal pieces, whole rows per tile with a short last one
    (2, 32, 32, 3, 25),
    (2, 16, 64, 5, 7),
    (2, 8, 48, 7, 3),
    (1, 4, 20, 2, 13),
]


def _check_s2(B, ci, co, H, W, dtype, relu, bias, seed=0, layout=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, ci, H, W, generator=g).to(dtype)
    w = (torch.randn(ci, co, 4, 4, generator=g) / (4 * ci) ** 0.5).to(dtype)
    b = torch.randn(co, generator=g).to(dtype) if bias else None
    ref = F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), stride=2, padding=1)
    ref = ref.relu() if relu else ref
    x = layout(x) if layout is not None else x.contiguous(memory_format=torch.channels_last)
    out = torch.ops.fastfvae_native.conv_transpose_4s2(x, w, b, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert _err(out, ref) <= TOL[dtype], ("conv_transpose_4s2", (B, ci, co, H, W), _err(out, ref))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", S2_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_transpose_4s2_values(native_lib, native_on, shape, dtype):
    _check_s2(*shape, dtype, relu=True, bias=True)
    _check_s2(*shape, dtype, relu=False, bias=False, layout=lambda x: x.contiguous())


_EMPTY_SCRIPT = """
import sys, torch
ops = (torch.ops.load_library(sys.argv[1]), torch.ops.fastfvae_native)[1]
print(ops.conv_isa())
for dtype in (torch.float32, torch.bfloat16):
    for B, ci, co, H, W in ((1, 4, 4, 3, 0), (1, 4, 4, 0, 3), (2, 6, 16, 0, 0), (0, 4, 4, 3, 3), (2, 4, 0, 3, 3)):
        x, w = torch.randn(B, ci, H, W).to(dtype), torch.randn(ci, co, 4, 4).to(dtype)
        out = ops.conv_transpose_4s2(x, w, torch.randn(co).to(dtype), True)
        assert out.shape == (B, co, 2 * H, 2 * W) and out.dtype == dtype, (B, ci, co, H, W, dtype, out.shape)
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512_bf16", "avx512", "scalar", default="avx512_bf16"))
def test_conv_transpose_4s2_empty_inputs(native_lib, isa):
    """A grid of no pixels (H or W 0), no image or no output channel gives an empty result on
    every variant (in a subprocess: the AVX-512 tiling divided by W = 0 and killed the process)."""
    chosen = run_with_isa(_EMPTY_SCRIPT, native_lib, isa)
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_conv_transpose_4s2_relu_keeps_nan(native_on, dtype):
    """A NaN in the input stays NaN through the fused ReLU, as through torch's relu; the
    outputs that do not read it stay finite."""
    x = torch.randn(2, 32, 8, 8).to(dtype)
    x[1, 5, 3, 4] = float("nan")
    w = (torch.randn(32, 32, 4, 4) / 20).to(dtype)
    out = torch.ops.fastfvae_native.conv_transpose_4s2(x.contiguous(memory_format=torch.channels_last), w, None, True)
    ref = F.conv_transpose2d(x.double(), w.double(), stride=2, padding=1).relu()
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()


@pytest.mark.parametrize("cin, cout, size", [(32, 64, 16), (32, 32, 32), (64, 64, 8)])
def test_conv_transpose_4s2_is_the_strided_convolutions_input_gradient(native_on, cin, cout, size):
    """conv2d(4, 2, 1)'s input gradient is conv_transpose_4s2 of grad with the conv's weight
    (the encoder's three inner layers' shapes)."""
    x = torch.randn(3, cin, size, size).bfloat16().requires_grad_()
    w = (torch.randn(cout, cin, 4, 4) / 20).bfloat16()
    grad = torch.randn(3, cout, size // 2, size // 2).bfloat16()
    (want,) = torch.autograd.grad(F.conv2d(x.double(), w.double(), stride=2, padding=1), x, grad.double())
    got = torch.ops.fastfvae_native.conv_transpose_4s2(grad.contiguous(memory_format=torch.channels_last), w, None,
                                                       False)
    assert _err(got, want) <= TOL[BF16]


def test_conv_transpose_4s2_choice(native_on, monkeypatch):
    """bf16 with vdpbf16ps; float32 (AVX-512) only while S2_FP32, and for an input gradient only
    with S2_DGRAD_FP32 too (both on by default)."""
    x, w = torch.randn(2, 32, 4, 4), torch.randn(32, 16, 4, 4)
    bf16_ok = native_conv.isa() == "avx512_bf16"
    assert native_conv.s2_fits(x.bfloat16(), w, [2, 2], [1, 1]) == bf16_ok
    assert not native_conv.s2_fits(x.bfloat16(), w, [1, 1], [1, 1])
    assert not native_conv.s2_fits(x.bfloat16(), w[..., :3, :3], [2, 2], [1, 1])
    assert native_conv.S2_FP32 and native_conv.S2_DGRAD_FP32
    monkeypatch.setattr(native_conv, "S2_FP32", False)
    assert not native_conv.s2_fits(x, w, [2, 2], [1, 1])
    monkeypatch.setattr(native_conv, "S2_FP32", True)
    monkeypatch.setattr(native_conv, "S2_DGRAD_FP32", False)
    assert native_conv.s2_fits(x, w, [2, 2], [1, 1]) == (native_conv.isa() in native_conv.FP32_S2_ISAS)
    assert not native_conv.s2_fits(x, w, [2, 2], [1, 1], dgrad=True)
    monkeypatch.setattr(native_conv, "S2_DGRAD_FP32", True)
    assert native_conv.s2_fits(x, w, [2, 2], [1, 1], dgrad=True) == (native_conv.isa() in native_conv.FP32_S2_ISAS)
    monkeypatch.setenv(native_conv.CONV_ENV, "0")
    assert not native_conv.s2_fits(x.bfloat16(), w, [2, 2], [1, 1])


def test_conv_transpose_4s2_in_conv_split(native_on, monkeypatch):
    """The decoder's transposed convolutions and the small strided input gradients run on it
    (S2_IN_STEP), with the oneDNN path's values and gradients (S2_IN_STEP off)."""
    if native_conv.isa() != "avx512_bf16":
        pytest.skip("conv_transpose_4s2 joins the step only with vdpbf16ps")
    torch.manual_seed(0)
    deconv, conv_layer = nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.Conv2d(32, 64, 4, 2, 1)
    x = torch.randn(4, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(4, 32, 16, 16).contiguous(memory_format=torch.channels_last)

    def run():
        for m in (deconv, conv_layer):
            m.zero_grad()
        a, b = x.clone().requires_grad_(), x2.clone().requires_grad_()
        y = by_hand.layer_split(a, deconv, BF16, relu=True)
        z = by_hand.layer_split(b, conv_layer, BF16, relu=True)
        (y.float().square().sum() + z.float().square().sum()).backward()
        return [y, z, a.grad, b.grad] + [p.grad.clone() for m in (deconv, conv_layer) for p in m.parameters()]

    monkeypatch.setattr(native_conv, "S2_IN_STEP", False)
    want = run()
    assert "conv_transpose_4s2" not in native_on.called
    monkeypatch.setattr(native_conv, "S2_IN_STEP", True)
    got = run()
    assert native_on.called.count("conv_transpose_4s2") == 2  # the deconv's forward, the conv's input grad
    for i, (a, b) in enumerate(zip(got, want)):
        rel = (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-12)
        assert rel <= 2e-2, (i, rel)


# --- the wiring in fastfvae.fast.conv ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, bf16_param(BF16, id="bf16")], ids=["fp32", "bf16"])
def test_the_fast_step_layers_take_the_native_path_and_match_onednn(native_on, monkeypatch, dtype):
    """encode / decode (both forms) with the native kernels against the same with
    FASTFVAE_NATIVE_CONV=0 (the oneDNN path): values and every parameter gradient."""
    from fastfvae.models.vae import VAE

    monkeypatch.setattr(by_hand, "NATIVE_PLAIN_FP32", True)  # the fp32 plain-image wiring too
    monkeypatch.setattr(native_conv, "image_isa_fits", lambda: True)  # the wiring on any variant, the scalar loops too
    torch.manual_seed(0)
    vae = VAE(z_dim=10)
    x = torch.rand(6, 1, 64, 64)
    z = torch.randn(6, 10)

    def run(s2d):
        vae.zero_grad()
        xin = by_hand.space_to_depth(x) if s2d else x
        mu, logvar = by_hand.encode(vae.encoder, xin, dtype, s2d)
        logits = by_hand.decode(vae.decoder, z, dtype, s2d).float()
        (mu.sum() + logvar.square().sum() + logits.square().sum()).backward()
        return [mu, logvar, logits] + [p.grad.clone() for p in vae.parameters()]

    for s2d in (True, False):
        native_on.called.clear()
        got = run(s2d)
        assert {"image_conv", "image_conv_transpose", "image_conv_weight_grad"} <= set(native_on.called)
        monkeypatch.setenv(native_conv.CONV_ENV, "0")
        want = run(s2d)
        monkeypatch.delenv(native_conv.CONV_ENV)
        tol = 2e-5 if dtype == F32 else 5e-2
        for i, (a, b) in enumerate(zip(got, want)):
            rel = (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-12)
            assert rel <= tol, (s2d, i, rel)


def test_an_odd_sized_image_takes_the_onednn_path(native_on, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(by_hand, "NATIVE_PLAIN_FP32", True)
    monkeypatch.setattr(native_conv, "image_isa_fits", lambda: True)  # the wiring on any variant, the scalar loops too
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.ReLU(), nn.Flatten())
    x = torch.rand(2, 1, 9, 9)
    mu, _ = by_hand.encode(SimpleNamespace(net=net, z_dim=4 * 4 * 4), x)
    assert "image_conv" not in native_on.called
    torch.testing.assert_close(mu, net(x))
    x = torch.rand(2, 1, 8, 8)
    mu, _ = by_hand.encode(SimpleNamespace(net=net, z_dim=4 * 4 * 4), x)
    assert "image_conv" in native_on.called
    torch.testing.assert_close(mu, net(x))


def test_off_switch_and_other_layers(native_on, monkeypatch):
    monkeypatch.setenv(native_conv.CONV_ENV, "0")
    assert not native_conv.enabled()
    monkeypatch.delenv(native_conv.CONV_ENV)
    assert native_conv.enabled() and native_conv.isa() in ("avx512_bf16", "avx512", "scalar")
    monkeypatch.setattr(native_conv, "image_isa_fits", lambda: True)  # the wiring on any variant, the scalar loops too
    x = torch.rand(2, 1, 8, 8)
    assert native_conv.fits(nn.Conv2d(1, 4, 4, 2, 1), x, transposed=False)
    assert not native_conv.fits(nn.Conv2d(2, 4, 4, 2, 1), x, transposed=False)
    assert not native_conv.fits(nn.Conv2d(1, 4, 3, 2, 1), x, transposed=False)
    assert not native_conv.fits(nn.ConvTranspose2d(4, 1, 4, 2, 1, output_padding=1), x, transposed=True)
    assert not native_conv.fits(nn.Conv2d(1, 4, 4, 2, 1), x.double(), transposed=False)


def test_info_lists_the_native_convolutions(native_lib):
    from test_ops_native import _info, _row

    from fastfvae.ops import native

    out = _info({native.LIB_ENV: str(native_lib)})
    # native where the library runs an AVX-512 variant (`native_conv.IMAGE_ISAS`), else oneDNN
    assert _row(out, "conv_image_layers")[1:3] == ["native" if isa_supported("avx512") else "oneDNN", "cuDNN"], out
    assert _row(out, "conv_transpose_4s2")[1] in ("native", "oneDNN")
    off = _info({native.LIB_ENV: str(native_lib), native_conv.CONV_ENV: "0"})
    assert _row(off, "conv_image_layers")[1] == "oneDNN" and f"{native_conv.CONV_ENV}=0" in off
    assert _row(off, "conv_transpose_4s2")[1] == "oneDNN"


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import test_ops_conv_native as t
from fastfvae.ops import native
native._STATE.update(tried=True, path=sys.argv[1], reason=None)
torch.ops.load_library(sys.argv[1])
print(torch.ops.fastfvae_native.conv_isa())
for dtype in (t.F32, t.BF16):
    for shape in t.SHAPES[1:]:
        for s2d in (True, False):
            t._check_first(*shape, dtype, s2d, relu=True, bias=True)
            t._check_last(*shape, dtype, s2d, bias=True)
    for shape in t.S2_SHAPES:
        t._check_s2(*shape, dtype, relu=True, bias=True)
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512_bf16", "avx512", "scalar"))
def test_each_variant_matches_reference(native_lib, isa):
    """FASTFVAE_NATIVE_ISA caps the variant (avx512 = AVX-512 without vdpbf16ps)."""
    chosen = run_with_isa(_ISA_SCRIPT, native_lib, isa, drop_env=(native_conv.CONV_ENV,))
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_bits_independent_of_thread_count(native_on, dtype):
    """Every convolution op gives the same bits on 1-4 threads, on the set thread count: the
    weight gradient's partial sums cover a fixed number of images whatever the thread count."""
    from test_ops_native import assert_same_bits, on_each_thread_count

    g = torch.Generator().manual_seed(3)
    B, C, H, W = 21, 32, 16, 16  # B: several partials of the weight gradient and a short last one
    ops = torch.ops.fastfvae_native
    cl = torch.channels_last
    img = torch.randn(B, 1, 2 * H, 2 * W, generator=g).to(dtype)
    img_s2d = torch.randn(B, 4, H, W, generator=g).to(dtype)
    w = (torch.randn(C, 1, 4, 4, generator=g) / 4).to(dtype)
    b, b_last = torch.randn(C, generator=g).to(dtype), torch.randn(1, generator=g).to(dtype)
    h = torch.randn(B, C, H, W, generator=g).to(dtype).contiguous(memory_format=cl)
    x = torch.randn(B, 64, 8, 8, generator=g).to(dtype).contiguous(memory_format=cl)
    w2 = (torch.randn(64, 32, 4, 4, generator=g) / 32).to(dtype)
    b2 = torch.randn(32, generator=g).to(dtype)

    def run():
        out = [ops.image_conv(img, w, b, True, False), ops.image_conv(img_s2d, w, b, True, True),
               ops.image_conv_transpose(h, w, b_last, False), ops.image_conv_transpose(h, w, b_last, True),
               ops.image_conv_weight_grad(img, h, False), ops.image_conv_weight_grad(img_s2d, h, True)]
        if native_conv.s2_fits(x, w2, (2, 2), (1, 1)):
            out.append(ops.conv_transpose_4s2(x, w2, b2, True))
        return out

    names = ["image_conv", "image_conv s2d", "image_conv_transpose", "image_conv_transpose s2d",
             "image_conv_weight_grad", "image_conv_weight_grad s2d", "conv_transpose_4s2"]
    results = on_each_thread_count(run, ["conv_image", "conv_s2"])
    assert_same_bits(results, names[:len(results[1])])


@pytest.mark.parametrize("isa, native_dtypes", [("avx512_bf16", (F32, BF16)), ("avx512", (F32, BF16)), ("scalar", ())])
def test_image_layers_go_native_only_on_the_variants_measured_faster(native_on, monkeypatch, isa, native_dtypes):
    """The fast step's image-side layers (plain and space-to-depth, encoder and decoder) take the
    native kernels only where they beat oneDNN: the AVX-512 variants, not the scalar loops."""
    from types import SimpleNamespace

    monkeypatch.setattr(native_conv, "isa", lambda: isa)
    monkeypatch.setattr(by_hand, "NATIVE_PLAIN_FP32", True)
    torch.manual_seed(0)
    encoder = SimpleNamespace(net=nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), nn.ReLU(), nn.Flatten()), z_dim=64)
    decoder = SimpleNamespace(fc=nn.Sequential(nn.Linear(3, 64 * 4 * 4)), deconv=nn.Sequential(nn.ConvTranspose2d(64, 1, 4, 2, 1)))
    img, z = torch.rand(2, 1, 8, 8), torch.randn(2, 3)
    for dtype in (F32, BF16):
        if dtype not in native_dtypes and dtype == BF16 and not cpu_bf16.RUNS:
            continue  # oneDNN's bf16 layers do not run on this CPU
        for s2d in (False, True):
            native_on.called.clear()
            by_hand.encode(encoder, by_hand.space_to_depth(img) if s2d else img, dtype, s2d=s2d)
            by_hand.decode(decoder, z, dtype, s2d=s2d)
            used = {"image_conv", "image_conv_transpose"} & set(native_on.called)
            assert used == ({"image_conv", "image_conv_transpose"} if dtype in native_dtypes else set()), (
                isa, dtype, s2d, native_on.called)


def test_info_says_onednn_where_the_variant_is_not_measured_faster(native_lib):
    from test_ops_native import _info, _row

    from fastfvae.ops import native

    capped = _info({native.LIB_ENV: str(native_lib), "FASTFVAE_NATIVE_ISA": "avx2"})
    assert _row(capped, "conv_image_layers")[1] == "oneDNN", capped
    assert "the native kernels need AVX-512 (this CPU: " in capped
    assert _row(capped, "conv_transpose_4s2")[1] == "oneDNN" and "needs vdpbf16ps" in capped
    if isa_supported("avx512"):
        no_dot = _info({native.LIB_ENV: str(native_lib), "FASTFVAE_NATIVE_ISA": "avx512"})
        assert _row(no_dot, "conv_image_layers")[1] == "native" and "fp32 and bf16 (avx512)" in no_dot, no_dot
        # the strided kernels' float32 variant runs the fp32 step; their bf16 one needs vdpbf16ps
        for name in ("conv_transpose_4s2", "conv_4s2", "conv_4s2_weight_grad"):
            assert _row(no_dot, name)[1] == "native", no_dot
        assert "fp32 step (bf16: oneDNN, needs vdpbf16ps" in no_dot, no_dot


def test_info_on_a_library_without_the_convolutions(native_on, monkeypatch):
    """An older build of the library (no convolution calls): the reason says so, not "loaded"."""
    from fastfvae.cli.info import conv_rows

    monkeypatch.setattr(native_conv, "CONV_OPS", native_conv.CONV_OPS + ("a_call_this_build_lacks",))
    monkeypatch.delenv(native_conv.CONV_ENV, raising=False)
    assert not native_conv.enabled()
    rows = {name: (cpu, why) for name, cpu, _, why in conv_rows()}
    for name in ("conv_image_layers", "conv_transpose_4s2"):
        cpu, why = rows[name]
        assert cpu == "oneDNN" and "has no native convolutions" in why and "rebuild" in why, why


class _CpuKernels:
    """torch.ops.fastfvae_native's CPU kernels called directly (the dispatcher would send a call
    with a meta tensor to the meta key, which has none), as a C++ caller would."""

    def __getattr__(self, name):
        op = getattr(torch.ops.fastfvae_native, name).default
        return lambda *args: op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


def test_weights_and_bias_on_another_device(native_on):
    """The kernels take CPU tensors only: a weight or bias elsewhere is one clear error, and the
    routing checks leave such layers to torch."""
    ops = _CpuKernels()
    img, h = torch.rand(2, 1, 8, 8), torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 1, 4, 4), torch.randn(4)
    x, w2, b2 = torch.randn(2, 8, 4, 4), torch.randn(8, 4, 4, 4), torch.randn(4)
    meta = "meta"
    calls = [
        (lambda: ops.image_conv(img, w.to(meta), b, True, False), "weight must be a floating .*CPU tensor.*meta"),
        (lambda: ops.image_conv(img, w, b.to(meta), True, False), "bias must be a floating CPU tensor of 4 .*meta"),
        (lambda: ops.image_conv_transpose(h, w, b[:1].to(meta), False), "bias must be a floating CPU tensor of 1 .*meta"),
        (lambda: ops.conv_transpose_4s2(x, w2.to(meta), b2, True), "weight must be a floating .*CPU tensor.*meta"),
        (lambda: ops.conv_transpose_4s2(x, w2, b2.to(meta), True), "bias must be a floating CPU tensor of 4 .*meta"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError, match=message):
            call()
    on_meta = nn.Conv2d(1, 4, 4, 2, 1).to(meta)
    assert native_conv.fits(nn.Conv2d(1, 4, 4, 2, 1), img, transposed=False) == native_conv.image_isa_fits()
    assert not native_conv.fits(on_meta, img, transposed=False)
    assert not native_conv.s2_fits(x.to(BF16), w2.to(meta), (2, 2), (1, 1))


def test_the_plain_image_layers_go_native_in_float32_unless_switched_off(native_on, monkeypatch):
    """By default the plain-image layers go native in float32 and bf16; with NATIVE_PLAIN_FP32
    off, in bf16 only."""
    from types import SimpleNamespace

    if not native_conv.image_isa_fits():
        pytest.skip(f"the image-side kernels are left to oneDNN on this CPU ({native_conv.isa()})")
    torch.manual_seed(0)
    encoder = SimpleNamespace(net=nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), nn.ReLU(), nn.Flatten()), z_dim=64)
    decoder = SimpleNamespace(fc=nn.Sequential(nn.Linear(3, 64 * 4 * 4)), deconv=nn.Sequential(nn.ConvTranspose2d(64, 1, 4, 2, 1)))
    img, z = torch.rand(2, 1, 8, 8), torch.randn(2, 3)
    both = {"image_conv", "image_conv_transpose"}
    for fp32_on in (True, False):
        monkeypatch.setattr(by_hand, "NATIVE_PLAIN_FP32", fp32_on)
        for dtype, want in ((F32, both if fp32_on else set()), (BF16, both)):
            native_on.called.clear()
            by_hand.encode(encoder, img, dtype)
            by_hand.decode(decoder, z, dtype)
            assert both & set(native_on.called) == want, (fp32_on, dtype, native_on.called)


# --- every native convolution in the float32 step -------------------------------------------

def test_the_fp32_step_runs_its_convolutions_natively_unless_switched_back_to_onednn(native_on):
    """By default every float32 convolution of the fast step that has a kernel runs on it (on
    AVX-512), and the step keeps fp32 parity; within ``native_fp32_convolutions(False)`` none
    does (oneDNN's, the reference loop's kernels), and the switches are back on after it."""
    if native_conv.isa() not in native_conv.FP32_S2_ISAS:
        pytest.skip(f"the float32 strided kernels run on AVX-512 only (this CPU: {native_conv.isa()})")
    from test_fast_step import assert_parity, run_both, small_cfg

    from fastfvae.fast import FastOptions

    cfg = small_cfg(model="factorvae", perm_batch="second", d_steps=1)
    kernels = {"image_conv", "image_conv_transpose", "image_conv_weight_grad", "conv_4s2",
               "conv_transpose_4s2", "conv_4s2_weight_grad", "relu_grad_bias"}
    with by_hand.native_fp32_convolutions(False):
        run_both(cfg, 2, FastOptions())
    assert not kernels & set(native_on.called), "a float32 convolution ran natively with the routes off"
    assert all(by_hand.fp32_routes().values())  # restored
    runs = run_both(cfg, 10, FastOptions())
    assert kernels <= set(native_on.called), kernels - set(native_on.called)
    assert_parity(*runs, "fp32")
