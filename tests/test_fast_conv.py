"""fastfvae.fast.conv: the split-backward convolution, the space-to-depth image layers and
the functional encoder/decoder, against torch's modules (values and gradients)."""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastfvae.fast import conv
from fastfvae.models.vae import VAE
from train_data import one_thread  # noqa: F401 (autouse fixture)
from cpu_bf16 import bf16_param

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
# max |a - b| <= TOL * max(1, max |b|), per dtype the layer runs in (references in float64)
TOL = {F64: 1e-12, F32: 2e-5, BF16: 4e-2}


def assert_close(got, want, tol, what=""):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def assert_rel_norm(got, want, tol, what=""):
    """||got - want|| <= tol ||want|| (for bf16, where a few ReLU masks flip near zero)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    err, norm = (got - want).norm().item(), want.norm().item()
    assert err <= tol * max(norm, 1e-12), f"{what}: relative error {err / norm:.3g} > {tol}"


def grads_of(out, g, tensors):
    return torch.autograd.grad(out, tensors, g.to(out.dtype))


def compare(dtype, tol, names, gots, wants):
    """Each pair checked: max error for float64/32, relative norm for bf16."""
    check = assert_rel_norm if dtype == BF16 else assert_close
    for name, got, want in zip(names, gots, wants):
        check(got, want, tol, name)


# --- conv_split / layer_split against nn.Conv2d / nn.ConvTranspose2d --------------------

GEOMETRIES = [  # in, out, kernel, stride, padding, input H, W
    (3, 5, 4, 2, 1, 8, 6),    # the VAE's layers
    (1, 4, 4, 2, 1, 8, 8),    # one input channel (encoder's first)
    (6, 1, 4, 2, 1, 5, 7),    # one output channel (decoder's last)
    (4, 6, 3, 1, 1, 7, 5),
    (2, 3, 5, 3, 2, 9, 8),
    (8, 8, 1, 1, 0, 4, 4),
    (6, 2, 3, 1, 1, 7, 5),    # stride-1 narrowing (the decoder's last layer in s2d form): swapped backward
    (5, 3, 5, 1, 0, 9, 8),    # ... kernel 5, no padding
    (8, 4, 3, 1, 2, 6, 6),    # ... padding k - 1
]


def make_layer(transposed, geom, bias, seed=0):
    cin, cout, k, s, p = geom[:5]
    torch.manual_seed(seed)
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    layer = cls(cin, cout, k, stride=s, padding=p, bias=bias)
    with torch.no_grad():
        if bias:  # a bias of the outputs' size, so that ReLU masks are mixed
            layer.bias.normal_()
    return layer


def reference(layer, x, relu, dtype=F64):
    """The module in float64 on a float64 copy: (output, module copy, input copy); the input
    and parameters first rounded to ``dtype`` (what the layer under test computes from)."""
    ref = make_like(layer).to(dtype).double()
    x64 = x.detach().to(dtype).double().requires_grad_()
    out = ref(x64)
    return (out.relu() if relu else out), ref, x64


def make_like(layer):
    copy = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                       padding=layer.padding, bias=layer.bias is not None)
    copy.load_state_dict(layer.state_dict())
    return copy


def check_layer_split(layer, x, dtype, relu, tol):
    out, ref, x64 = reference(layer, x, relu, dtype)
    x = x.detach().clone().requires_grad_()
    got = conv.layer_split(x, layer, dtype, relu)
    assert got.dtype == dtype
    g = torch.randn(out.shape, dtype=F64)
    if dtype == BF16:
        g = g.to(BF16).double()  # the same upstream gradient on both sides
    params = list(layer.parameters())
    want = grads_of(out, g, [x64, *ref.parameters()])
    have = grads_of(got, g, [x, *params])
    for name, t, a in zip(["input", "weight", "bias"], [x, *params], have):
        assert a.dtype == t.dtype, name  # gradients reach the caller's tensors in their dtype
    compare(dtype, tol, ["output", "input", "weight", "bias"], [got, *have], [out, *want])


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:5])))
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("dtype", [F64, F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_layer_split_matches_module(geom, transposed, bias, relu, dtype):
    layer = make_layer(transposed, geom, bias)
    torch.manual_seed(1)
    x = torch.randn(3, geom[0], *geom[5:])
    if dtype == F64:
        layer, x = layer.double(), x.double()
    check_layer_split(layer, x, dtype, relu, TOL[dtype] if dtype != BF16 else 1e-2)


@pytest.mark.parametrize("geom,narrowing", [(GEOMETRIES[6], True), (GEOMETRIES[8], True), (GEOMETRIES[3], False),
                                             (GEOMETRIES[0], False)], ids=lambda v: str(v))
def test_narrowing_backward_is_taken_only_for_stride1_narrowing_convs(monkeypatch, geom, narrowing):
    calls = []
    real = conv._narrowing_backward
    monkeypatch.setattr(conv, "_narrowing_backward", lambda *a: calls.append(1) or real(*a))
    layer = make_layer(False, geom, True)
    x = torch.randn(2, geom[0], *geom[5:], requires_grad=True)
    conv.layer_split(x, layer, F32).sum().backward()
    assert bool(calls) == narrowing
    # deconvs never take it
    calls.clear()
    conv.layer_split(torch.randn(2, geom[1], *geom[5:]), make_layer(True, (geom[1], geom[0], *geom[2:]), True),
                     F32).sum().backward()
    assert not calls


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("dtype", [F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_layer_split_channels_last_input(transposed, relu, dtype):
    layer = make_layer(transposed, GEOMETRIES[0], True)
    x = torch.randn(4, 3, 8, 6).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    check_layer_split(layer, x, dtype, relu, TOL[F32] if dtype == F32 else 1e-2)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
@pytest.mark.parametrize("dtype", [F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_conv_split_matches_functional_with_explicit_arguments(transposed, dtype):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn((3, 4, 4, 4) if transposed else (4, 3, 4, 4), requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    got = conv.conv_split(x, w, b, (2, 2), (1, 1), transposed, dtype)
    fn = F.conv_transpose2d if transposed else F.conv2d
    want = fn(x.double(), w.double(), b.double(), stride=2, padding=1)
    assert_close(got, want, TOL[dtype])
    g = torch.randn(want.shape)
    have = torch.autograd.grad(got, [x, w, b], g.to(dtype))
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    wants = torch.autograd.grad(fn(*ref, stride=2, padding=1), ref, g.to(dtype).double())
    for a, c in zip(have, wants):
        assert a.dtype == torch.float32
        assert_close(a, c, TOL[dtype])


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_fused_relu_path_agrees_with_fallback(monkeypatch, transposed, layout, dtype):
    """The oneDNN conv+ReLU primitive and the convolution-then-relu_ fallback."""
    layer = make_layer(transposed, GEOMETRIES[0], True)
    x = torch.randn(4, 3, 8, 6).contiguous(memory_format=layout)

    def run():
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = conv.layer_split(xi, layer, dtype, relu=True)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 2, out.numel()).view(out.shape).to(dtype))
        return [out.detach().float(), xi.grad, layer.weight.grad, layer.bias.grad]

    assert conv._mkldnn_fusable(x.to(dtype))
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    fused = run()
    assert len(calls) == (0 if transposed else 1)  # the fused primitive is for forward convolutions only
    monkeypatch.setattr(conv, "_mkldnn_fusable", lambda x: False)
    fallback = run()
    assert len(calls) == (0 if transposed else 1)
    assert (fused[0] > 0).any() and (fused[0] == 0).any()  # the mask matters
    tol = 1e-5 if dtype == F32 else 2e-2
    for name, a, b in zip(["output", "input", "weight", "bias"], fused, fallback):
        assert_close(a, b, tol, name)


def test_float64_relu_takes_the_fallback():
    """oneDNN's fused primitive has no float64 kernel: float64 convolutions run unfused."""
    assert conv._mkldnn_fusable(torch.zeros(1, dtype=F32))
    assert conv._mkldnn_fusable(torch.zeros(1, dtype=BF16))
    assert not conv._mkldnn_fusable(torch.zeros(1, dtype=F64))


class _SpyAten:
    """``torch.ops.aten`` recording the output masks asked of ``convolution_backward``."""

    def __init__(self):
        self.masks = []

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)

    def convolution_backward(self, *args):
        self.masks.append(list(args[-1]))
        return torch.ops.aten.convolution_backward(*args)


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
def test_only_the_needed_gradients_are_computed(monkeypatch, relu, transposed):
    """oneDNN's backward gets the masks of the gradients needed (the fp32 native routes, which
    would take this layer on AVX-512, switched off: they are chosen per gradient, in their tests)."""
    for module, flag in conv.FP32_NATIVE_ROUTES:
        monkeypatch.setattr(sys.modules[module], flag, False)
    spy = _SpyAten()
    monkeypatch.setattr(conv, "_aten", spy)
    layer = make_layer(transposed, GEOMETRIES[0], True)
    x = torch.randn(2, 3, 8, 6)
    out_ref, ref, x64 = reference(layer, x, relu)
    g = torch.randn(out_ref.shape)
    want = torch.autograd.grad(out_ref, [x64, *ref.parameters()], g.double())

    # the input needs no gradient: none computed, none returned; the parameters' still right
    out = conv.layer_split(x, layer, F32, relu)
    out.backward(g)
    assert spy.masks == [[False, True, False]] and x.grad is None
    assert_close(layer.weight.grad, want[1], TOL[F32], "weight")
    assert_close(layer.bias.grad, want[2], TOL[F32], "bias")

    # frozen weight, the input needs a gradient
    spy.masks.clear()
    layer.weight.requires_grad_(False)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(conv.layer_split(xg, layer, F32, relu), [xg], g)
    assert spy.masks == [[True, False, False]]
    assert_close(gx, want[0], TOL[F32], "input")

    # only the bias: no convolution backward at all
    spy.masks.clear()
    layer.bias.grad = None
    conv.layer_split(x, layer, F32, relu).backward(g)
    assert spy.masks == []
    assert_close(layer.bias.grad, want[2], TOL[F32], "bias")


# --- rejected layers ---------------------------------------------------------------------

@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 3, 3, dilation=2),
    nn.Conv2d(4, 4, 3, groups=2),
    nn.Conv2d(2, 3, 3, padding="same"),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
    nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1, output_padding=1),
    nn.ConvTranspose2d(4, 4, 4, groups=2),
    nn.ConvTranspose2d(2, 3, 3, dilation=2),
], ids=["dilation", "groups", "same", "reflect", "circular", "output_padding", "deconv-groups", "deconv-dilation"])
def test_layer_split_rejects_what_it_does_not_compute(layer):
    x = torch.randn(1, layer.in_channels, 8, 8)
    with pytest.raises(ValueError, match="plain convolutions"):
        conv.layer_split(x, layer, F32)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 8, 4, stride=2, padding=1),            # two input channels
    nn.Conv2d(1, 8, 3, stride=2, padding=1),            # kernel 3
    nn.Conv2d(1, 8, 4, stride=1, padding=1),            # stride 1
    nn.Conv2d(1, 8, 4, stride=2, padding=0),            # padding 0
    nn.Conv2d(1, 8, 4, stride=2, padding=1, dilation=2),
    nn.Conv2d(1, 8, 4, stride=2, padding=1, padding_mode="reflect"),
    nn.ConvTranspose2d(1, 8, 4, stride=2, padding=1),   # a transposed convolution
], ids=["cin2", "k3", "s1", "p0", "dilation", "reflect", "transposed"])
def test_first_conv_s2d_rejects_other_geometries(layer):
    with pytest.raises(ValueError, match="space-to-depth"):
        conv.first_conv_s2d(torch.randn(1, 4, 4, 4), layer, F32)


@pytest.mark.parametrize("layer", [
    nn.ConvTranspose2d(8, 2, 4, stride=2, padding=1),   # two output channels
    nn.ConvTranspose2d(8, 1, 3, stride=2, padding=1),
    nn.ConvTranspose2d(8, 1, 4, stride=1, padding=1),
    nn.ConvTranspose2d(8, 1, 4, stride=2, padding=0),
    nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1, dilation=2),
    nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1, output_padding=1),
    nn.Conv2d(8, 1, 4, stride=2, padding=1),            # not transposed
], ids=["cout2", "k3", "s1", "p0", "dilation", "output_padding", "not-transposed"])
def test_last_deconv_s2d_rejects_other_geometries(layer):
    with pytest.raises(ValueError, match="space-to-depth"):
        conv.last_deconv_s2d(torch.randn(1, 8, 4, 4), layer, F32)


def test_run_layers_rejects_unknown_modules():
    with pytest.raises(TypeError, match="Tanh"):
        conv.run_layers([nn.Linear(3, 3), nn.Tanh()], torch.randn(2, 3), F32)
    with pytest.raises(TypeError, match="LeakyReLU"):
        conv.run_layers(nn.Sequential(nn.LeakyReLU()), torch.randn(2, 3), F32)


# --- space-to-depth ----------------------------------------------------------------------

def test_space_to_depth_pixel_mapping_by_hand():
    b, h2, w2 = 2, 6, 8  # not square: a swapped height and width shows
    x = torch.zeros(b, 1, h2, w2)
    for n in range(b):
        for r in range(h2):
            for c in range(w2):
                x[n, 0, r, c] = 1000 * n + 100 * r + c
    y = conv.space_to_depth(x)
    assert y.shape == (b, 4, h2 // 2, w2 // 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for n in range(b):
        for rh in range(2):
            for rw in range(2):
                for i in range(h2 // 2):
                    for j in range(w2 // 2):
                        assert y[n, 2 * rh + rw, i, j] == 1000 * n + 100 * (2 * i + rh) + (2 * j + rw)
    # a few written out: block (1, 2) of image 1
    assert y[1, :, 1, 2].tolist() == [1000 + 200 + 4, 1000 + 200 + 5, 1000 + 300 + 4, 1000 + 300 + 5]
    assert torch.equal(conv.depth_to_space(y), x)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_space_to_depth_round_trips(layout):
    x = torch.randn(3, 1, 10, 4)
    y = conv.space_to_depth(x)
    assert torch.equal(conv.depth_to_space(y.contiguous(memory_format=layout)), x)
    z = torch.randn(3, 4, 5, 7).contiguous(memory_format=layout)
    back = conv.depth_to_space(z)
    assert back.shape == (3, 1, 10, 14)
    assert torch.equal(conv.space_to_depth(back), z)


@pytest.mark.parametrize("cout, batch", [(1, 1), (3, 2), (32, 3)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("dtype", [F64, F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_first_conv_s2d_is_the_strided_conv(cout, batch, bias, relu, dtype):
    torch.manual_seed(cout + batch)
    layer = nn.Conv2d(1, cout, 4, stride=2, padding=1, bias=bias)
    x = torch.randn(batch, 1, 12, 10)
    if dtype == F64:
        layer, x = layer.double(), x.double()
    want, ref, x64 = reference(layer, x, relu, dtype)
    x = x.clone().requires_grad_()
    got = conv.first_conv_s2d(conv.space_to_depth(x), layer, dtype, relu)
    assert got.dtype == dtype and got.shape == want.shape
    g = torch.randn(want.shape, dtype=F64).to(dtype).double()
    wants = grads_of(want, g, [x64, *ref.parameters()])
    haves = grads_of(got, g, [x, *layer.parameters()])
    compare(dtype, 1e-2 if dtype == BF16 else TOL[dtype], ["output", "input", "weight", "bias"],
            [got, *haves], [want, *wants])


@pytest.mark.parametrize("cin, batch", [(1, 1), (3, 2), (32, 3)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [F64, F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_last_deconv_s2d_is_the_strided_deconv(cin, batch, bias, dtype):
    torch.manual_seed(cin * batch)
    layer = nn.ConvTranspose2d(cin, 1, 4, stride=2, padding=1, bias=bias)
    h = torch.randn(batch, cin, 6, 5)
    if dtype == F64:
        layer, h = layer.double(), h.double()
    want, ref, h64 = reference(layer, h, False, dtype)
    h = h.clone().requires_grad_()
    got_s2d = conv.last_deconv_s2d(h, layer, dtype)
    assert got_s2d.shape == (batch, 4, 6, 5) and got_s2d.dtype == dtype
    got = conv.depth_to_space(got_s2d)
    g = torch.randn(want.shape, dtype=F64).to(dtype).double()
    wants = grads_of(want, g, [h64, *ref.parameters()])
    haves = grads_of(got, g, [h, *layer.parameters()])
    compare(dtype, 1e-2 if dtype == BF16 else TOL[dtype], ["output", "input", "weight", "bias"],
            [got, *haves], [want, *wants])


# --- run_layers, encode, decode against the modules ------------------------------------

def test_run_layers_matches_a_sequential():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.ReLU(),
                        nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    for layer in net:
        if getattr(layer, "bias", None) is not None:
            nn.init.normal_(layer.bias)
    x = torch.randn(3, 2, 4, 4, dtype=F64, requires_grad=True)
    got = conv.run_layers(net, x, F64)
    want = net(x)
    assert_close(got, want, TOL[F64])
    hidden = net[:2](x)
    assert (hidden == 0).any() and (hidden > 0).any()  # the fused ReLU's mask matters
    g = torch.randn(want.shape, dtype=F64)
    for a, b in zip(grads_of(got, g, [x, *net.parameters()]), grads_of(want, g, [x, *net.parameters()])):
        assert_close(a, b, TOL[F64])
    # a convolution last (no ReLU to fuse after it)
    assert_close(conv.run_layers(net[:3], x, F64), net[:3](x), TOL[F64])


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(4)
    model = VAE(z_dim=10)
    with torch.no_grad():  # biases of the activations' size: ReLU masks neither all-on nor all-off
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.1)
    return model


def _vae_in(vae, dtype):
    if dtype != F64:
        return vae
    copy = VAE(z_dim=10)
    copy.load_state_dict(vae.state_dict())
    return copy.double()


def _images(batch, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, 64, 64, generator=gen) < 0.3).float()


@pytest.mark.parametrize("s2d", [False, True], ids=["plain", "s2d"])
@pytest.mark.parametrize("dtype", [F64, F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_encode_matches_the_module(vae, s2d, dtype):
    model = _vae_in(vae, dtype)
    pdtype = next(model.parameters()).dtype
    x = _images(3).to(pdtype)
    with torch.autocast("cpu", BF16, enabled=dtype == BF16):  # bf16: the module under autocast
        mu_ref, logvar_ref = model.encode(x)
    x_in = conv.space_to_depth(x) if s2d else x
    mu, logvar = conv.encode(model.encoder, x_in, dtype, s2d)
    assert mu.dtype == logvar.dtype == F32 and mu.shape == logvar.shape == (3, 10)
    gm, gl = torch.randn(3, 10), torch.randn(3, 10)
    params = list(model.encoder.parameters())
    want = torch.autograd.grad((mu_ref.to(pdtype) * gm.to(pdtype)).sum()
                               + (logvar_ref.to(pdtype) * gl.to(pdtype)).sum(), params)
    have = torch.autograd.grad((mu * gm).sum() + (logvar * gl).sum(), params)
    if dtype == BF16:
        mu32, logvar32 = model.encode(x)
        assert_rel_norm(torch.cat([mu, logvar]), torch.cat([mu32, logvar32]), 2e-2, "stats vs float32")
        assert_rel_norm(torch.cat([mu, logvar]), torch.cat([mu_ref, logvar_ref]).float(), 1e-2, "stats")
        for (name, _), a, b in zip(model.encoder.named_parameters(), have, want):
            assert a.dtype == F32
            assert_rel_norm(a, b, 2e-2, name)
        return
    tol = 1e-6 if dtype == F64 else TOL[F32]  # the stats are returned as float32
    assert_close(mu, mu_ref, tol, "mu")
    assert_close(logvar, logvar_ref, tol, "logvar")
    for (name, _), a, b in zip(model.encoder.named_parameters(), have, want):
        assert_close(a, b, TOL[dtype] * (1 if dtype == F64 else 10), name)


@pytest.mark.parametrize("s2d", [False, True], ids=["plain", "s2d"])
@pytest.mark.parametrize("dtype", [F64, F32, bf16_param(BF16, id=str(BF16))], ids=str)
def test_decode_matches_the_module(vae, s2d, dtype):
    model = _vae_in(vae, dtype)
    pdtype = next(model.parameters()).dtype
    z = torch.randn(3, 10, dtype=pdtype)
    z_ref, z_in = z.clone().requires_grad_(), z.clone().requires_grad_()
    with torch.autocast("cpu", BF16, enabled=dtype == BF16):  # bf16: the module under autocast
        want = model.decode(z_ref)
    got = conv.decode(model.decoder, z_in, dtype, s2d)
    assert got.dtype == dtype
    if s2d:
        assert got.shape == (3, 4, 32, 32)
        got = conv.depth_to_space(got)
    assert got.shape == want.shape == (3, 1, 64, 64)
    g = torch.randn(want.shape).to(dtype)
    tensors = [z_ref, *model.decoder.parameters()]
    wants = torch.autograd.grad(want, tensors, g.to(want.dtype))
    haves = torch.autograd.grad(got, [z_in, *model.decoder.parameters()], g)
    names = ["z"] + [n for n, _ in model.decoder.named_parameters()]
    if dtype == BF16:
        assert_rel_norm(got, model.decode(z), 2e-2, "logits vs float32")
        assert_rel_norm(got, want, 1e-2, "logits")
        for name, a, b in zip(names, haves, wants):
            assert a.dtype == F32
            assert_rel_norm(a, b, 2e-2, name)
        return
    assert_close(got, want, TOL[dtype], "logits")
    for name, a, b in zip(names, haves, wants):
        assert_close(a, b, TOL[dtype] * (1 if dtype == F64 else 10), name)
