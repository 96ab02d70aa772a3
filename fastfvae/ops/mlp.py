"""Linear + LeakyReLU as one fused op, and the MLP / FactorVAE discriminator built from it.

Implementations: the Triton kernels on CUDA; on CPU the native library's GEMM for float32 and
bfloat16 (`fastfvae.ops.native`, kernels/native/mlp*.cpp: float32 accumulation, the LeakyReLU
and its derivative fused), else the torch reference (`fastfvae.ops.dispatch` says which).

``linear_leaky_relu(x, weight, bias, slope)`` == ``F.leaky_relu(F.linear(x, weight, bias), slope)``
(slope = 1.0: plain ``F.linear``). x [..., K]; weight [N, K] (nn.Linear layout); bias [N] or
None; one float dtype and device; slope >= 0 (the backward recomputes the activation
derivative from the output sign, exact for slope >= 0, so no pre-activation is stored).
Backward: dgrad GEMM with the derivative fused into its A operand, wgrad GEMM with the bias
gradient fused (first-order gradients only). fp32 GEMMs use TF32 on CUDA exactly when
``torch.backends.cuda.matmul.allow_tf32`` says so, as torch's own matmul does. Under
``torch.autocast`` the op casts its inputs to the autocast dtype and returns that dtype, as
``F.linear`` does (so ``--precision bf16`` runs the discriminator in bf16 on tensor cores).

``FusedMLP`` *is* an ``nn.Sequential`` of ``nn.Linear`` and ``nn.LeakyReLU``/``nn.ReLU`` (same
parameters, same initialisation, same state_dict keys "0.weight", "0.bias", "2.weight", ...)
whose forward runs one fused op per Linear. ``FusedDiscriminator`` wraps one as ``self.net``
with the keys of ``fastfvae.models.Discriminator`` ("net.0.weight" ... "net.12.bias").
"""

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastfvae.errors import FastFVAEError
from fastfvae.ops import native
from fastfvae.ops.dispatch import KERNEL_FLOAT_DTYPES, kernels, use_native, use_triton

#: The dtypes the native CPU GEMM takes (float32 accumulation).
NATIVE_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: The dtypes the public op runs natively on CPU: where it beats the torch reference. In bf16 the
#: op packs its weight at every call and oneDNN's GEMM is as fast as the native one, so the op is
#: 0.9x torch there (docs/ops.md); bf16 runs natively inside `NativeDiscriminator`, which packs
#: its weights once per update. Other dtypes run the torch reference.
NATIVE_MLP_DTYPES = (torch.float32,)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, slope: float) -> None:
    if weight.dim() != 2 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise FastFVAEError(
            f"linear_leaky_relu: expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise FastFVAEError(
                f"linear_leaky_relu: {name} is {t.dtype} on {t.device}; expected x's {x.dtype} on {x.device}"
            )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise FastFVAEError(f"linear_leaky_relu: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not slope >= 0.0 or slope == float("inf"):
        raise FastFVAEError(f"linear_leaky_relu: slope must be a finite number >= 0, got {slope}")


def _tf32(t: Tensor) -> bool:
    return t.is_cuda and torch.backends.cuda.matmul.allow_tf32


def _act_grad(grad: Tensor, out: Tensor, slope: float) -> Tensor:
    """grad * act'(out): aten's LeakyReLU backward from the output (as for in-place LeakyReLU)."""
    return grad if slope == 1.0 else torch.ops.aten.leaky_relu_backward(grad, out, slope, True)


@torch.library.custom_op("fastfvae::linear_leaky_relu", mutates_args=())
def _linear_leaky_relu(x: Tensor, weight: Tensor, bias: Tensor | None, slope: float) -> Tensor:
    _check(x, weight, bias, slope)
    if x.numel() == 0 or weight.numel() == 0 or not use_triton(x, weight, bias, dtypes=KERNEL_FLOAT_DTYPES):
        if x.numel() and weight.numel() and use_native(x, weight, bias, dtypes=NATIVE_MLP_DTYPES):
            return native.ops().linear_leaky_relu(x, weight, bias, slope)
        y = F.linear(x, weight, bias)
        return (y if slope == 1.0 else F.leaky_relu(y, slope)).contiguous()
    out = x.new_empty((x.shape[0], weight.shape[0]))
    bias = None if bias is None else bias.contiguous()
    kernels("mlp").linear_act_forward(x, weight, bias, out, slope, act=slope != 1.0, tf32=_tf32(x))
    return out


def _native_backward(grad: Tensor, other: Tensor, out: Tensor) -> bool:
    """The native backward takes one dtype for all three (autograd may hand a gradient of another)."""
    return grad.dtype == other.dtype == out.dtype and use_native(grad, other, out, dtypes=NATIVE_MLP_DTYPES)


@torch.library.custom_op("fastfvae::linear_leaky_relu_grad_input", mutates_args=())
def _grad_input(grad: Tensor, weight: Tensor, out: Tensor, slope: float) -> Tensor:
    """dL/dx = (grad * act'(out)) @ weight."""
    if grad.numel() == 0 or not use_triton(grad, weight, out, dtypes=KERNEL_FLOAT_DTYPES):
        if grad.numel() and _native_backward(grad, weight, out):
            return native.ops().linear_leaky_relu_grad_input(grad, weight, out, slope)
        return (_act_grad(grad, out, slope) @ weight).contiguous()
    gx = grad.new_empty((grad.shape[0], weight.shape[1]))
    y = None if slope == 1.0 else out.contiguous()
    kernels("mlp").linear_act_grad_input(grad.contiguous(), weight, y, gx, slope, tf32=_tf32(grad))
    return gx


@torch.library.custom_op("fastfvae::linear_leaky_relu_grad_weight", mutates_args=())
def _grad_weight(grad: Tensor, x: Tensor, out: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(dL/dweight, dL/dbias) = ((grad * act'(out)).T @ x, sum over rows of grad * act'(out))."""
    if grad.numel() == 0 or not use_triton(grad, x, out, dtypes=KERNEL_FLOAT_DTYPES):
        if grad.numel() and _native_backward(grad, x, out):
            return native.ops().linear_leaky_relu_grad_weight(grad, x, out, slope)
        g = _act_grad(grad, out, slope)
        return (g.t() @ x).contiguous(), g.sum(0)
    gw = grad.new_empty((grad.shape[1], x.shape[1]))
    gb = grad.new_empty((grad.shape[1],))
    y = None if slope == 1.0 else out.contiguous()
    kernels("mlp").linear_act_grad_weight(grad.contiguous(), x, y, gw, gb, slope, tf32=_tf32(grad))
    return gw, gb


@_linear_leaky_relu.register_fake
def _(x, weight, bias, slope):
    _check(x, weight, bias, slope)
    return x.new_empty((x.shape[0], weight.shape[0]))


@_grad_input.register_fake
def _(grad, weight, out, slope):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@_grad_weight.register_fake
def _(grad, x, out, slope):
    return grad.new_empty((grad.shape[1], x.shape[1])), grad.new_empty((grad.shape[1],))


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, slope = inputs
    ctx.slope = slope
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output)


def _backward(ctx, grad: Tensor):
    x, weight, out = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = _grad_input(grad, weight, out, ctx.slope) if need_x else None
    gw = gb = None
    if need_w or (need_b and ctx.has_bias):
        gw, gb = _grad_weight(grad, x, out, ctx.slope)
    return gx, gw if need_w else None, gb if ctx.has_bias and need_b else None, None


_linear_leaky_relu.register_autograd(_backward, setup_context=_setup)

# --- autocast ------------------------------------------------------------------------------
# Under torch.autocast the forward runs in the autocast dtype, as F.linear does: its float
# inputs are cast to torch.get_autocast_dtype(device) (read at each call, so fp16 and bf16
# autocast both work) and the op runs with autocast off, so the torch reference inside computes
# in exactly the dtype the fake impl reports (x's). The backward ops take the dtypes autograd
# hands them (the forward's cast operands, a gradient of the output's dtype) and also run with
# autocast off. One kernel per autocast device; a Python kernel, so eager calls and
# torch.compile's tracing (which dispatches through the same keys) both go through it.
_AUTOCAST_LIB = torch.library.Library("fastfvae", "IMPL")
_AUTOCAST_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_kernel(op, device_type: str, cast: bool):
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        if cast:
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(
                a.to(dtype) if isinstance(a, Tensor) and a.dtype in _AUTOCAST_CASTABLE
                and a.device.type == device_type else a
                for a in args
            )
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    return key, kernel


for _device_type in ("cpu", "cuda"):
    for _name, _op, _cast in (("linear_leaky_relu", _linear_leaky_relu, True),
                              ("linear_leaky_relu_grad_input", _grad_input, False),
                              ("linear_leaky_relu_grad_weight", _grad_weight, False)):
        _key, _kernel = _autocast_kernel(_op._opoverload, _device_type, _cast)
        _AUTOCAST_LIB.impl(_name, _kernel, _key, with_keyset=True)


def linear_leaky_relu(x: Tensor, weight: Tensor, bias: Tensor | None, slope: float) -> Tensor:
    """``leaky_relu(x @ weight.T + bias, slope)`` fused; x [..., K]; see the module doc."""
    if x.dim() == 2:
        return _linear_leaky_relu(x, weight, bias, float(slope))
    if x.dim() == 0 or weight.dim() != 2:
        raise FastFVAEError(f"linear_leaky_relu: x must be [..., K], got shape {tuple(x.shape)}")
    y = _linear_leaky_relu(x.reshape(-1, x.shape[-1]), weight, bias, float(slope))
    return y.view(*x.shape[:-1], weight.shape[0])


def _slope_of(module: nn.Module) -> float | None:
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    if isinstance(module, nn.ReLU):
        return 0.0
    return None


class FusedMLP(nn.Sequential):
    """``nn.Sequential(Linear, LeakyReLU(slope), ..., Linear)`` running one fused op per Linear.

    ``FusedMLP([10, 1000, 1000, 2], slope=0.2)`` builds Linear(10, 1000), LeakyReLU(0.2),
    Linear(1000, 1000), LeakyReLU(0.2), Linear(1000, 2); ``FusedMLP.from_sequential(seq)``
    reuses the modules (and parameters) of an existing Sequential. Any Sequential of
    ``nn.Linear`` layers, each optionally followed by ``nn.LeakyReLU`` (slope >= 0) or
    ``nn.ReLU``, works; the layers are read at every call, so ``append``/slicing behave as
    on ``nn.Sequential``.
    """

    def __init__(self, sizes: Sequence[int] = (), slope: float = 0.2, *, modules: Sequence[nn.Module] = ()):
        if isinstance(sizes, dict):  # nn.Sequential's own slicing passes an OrderedDict
            super().__init__(OrderedDict(sizes))
        elif modules:
            super().__init__(*modules)
        else:
            sizes = [int(s) for s in sizes]
            if len(sizes) < 2 or min(sizes) < 1:
                raise FastFVAEError(f"FusedMLP: sizes must be >= 2 positive layer widths, got {sizes}")
            layers = []
            for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
                layers.append(nn.Linear(fan_in, fan_out))
                if i < len(sizes) - 2:
                    layers.append(nn.LeakyReLU(slope))
            super().__init__(*layers)
        self._plan()

    def _plan(self) -> list:
        """[(linear module, slope)]: each Linear with the slope of the activation after it (1.0: none)."""
        plan, items, i = [], list(self._modules.items()), 0
        while i < len(items):
            name, module = items[i]
            if not isinstance(module, nn.Linear):
                raise FastFVAEError(
                    f"FusedMLP: layer {name} is {type(module).__name__}; expected nn.Linear, "
                    "optionally followed by nn.LeakyReLU or nn.ReLU"
                )
            slope = _slope_of(items[i + 1][1]) if i + 1 < len(items) else None
            if slope is not None and slope < 0:
                raise FastFVAEError(f"FusedMLP: layer {items[i + 1][0]} has slope {slope}; expected >= 0")
            plan.append((module, 1.0 if slope is None else slope))
            i += 1 if slope is None else 2
        return plan

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "FusedMLP":
        """A FusedMLP sharing ``seq``'s modules, so parameters and state_dict keys are the same."""
        return cls(OrderedDict(seq._modules))

    def forward(self, x: Tensor) -> Tensor:
        for linear, slope in self._plan():
            x = linear_leaky_relu(x, linear.weight, linear.bias, slope)
        return x


class FusedDiscriminator(nn.Module):
    """The FactorVAE discriminator on fused ops: a drop-in for ``fastfvae.models.Discriminator``.

    ``net`` = Linear(z_dim, hidden), LeakyReLU(slope), [Linear(hidden, hidden), LeakyReLU(slope)]
    * (num_layers - 1), Linear(hidden, 2); forward(z [B, z_dim]) -> logits [B, 2].
    """

    def __init__(self, z_dim: int = 10, hidden: int = 1000, num_layers: int = 6, slope: float = 0.2):
        super().__init__()
        if num_layers < 1:
            raise FastFVAEError(f"FusedDiscriminator: num_layers must be >= 1, got {num_layers}")
        self.net = FusedMLP([z_dim] + [hidden] * num_layers + [2], slope)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
