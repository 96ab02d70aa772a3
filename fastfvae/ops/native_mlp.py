"""`NativeDiscriminator`: the FactorVAE discriminator as one native CPU call per direction.

D is an MLP of ``nn.Linear`` layers with LeakyReLU(slope) between them (Kim & Mnih 2018:
6 x 1000, `fastfvae.models.Discriminator`). Per training step it runs a forward over the
codes and the permuted codes, a backward for its parameter gradients, the input gradient
of the TC term and an Adam update: at the paper's sizes ~4 GFLOP of GEMMs on weights of
5 M parameters. torch runs each layer as a oneDNN/MKL call that lays the 2-20 MB weight out
for its microkernel at every call; here the weights are laid out once per update:

* `mlp_pack_weight` packs each weight twice, in the native GEMM's panel layout
  (kernels/native/mlp_gemm.h): as B = W^T for the forward, as B = W for the input gradient,
  in bfloat16 (vdpbf16ps pairs) or float32;
* the forward (`forward`) runs all layers in one call, keeping each layer's input in a
  [rows, width] buffer (codes in rows 0:B, permuted codes in B:2B, as
  `fastfvae.fast.disc_by_hand` does), bias + LeakyReLU fused;
* the backward (`backward`, `input_grad`, `param_grads`) runs the chain in one call: the
  LeakyReLU derivative (from the sign of the stored output, exact for slope >= 0) is fused
  into the input-gradient GEMM's epilogue, the bias gradient into the transposition the
  weight-gradient GEMM needs; weight gradients are float32 (float32 accumulation);
* `step` is torch.optim.Adam's update (no weight decay, no amsgrad) on the float32 master
  weights -- the parameters themselves -- and the optimiser's own moment tensors, and it
  rewrites both packed copies in the same pass, so the next forward packs nothing.

Each call threads over the GEMMs' output tiles (``torch.set_num_threads``), each tile's whole
reduction in one task, so the results are the same bits on any thread count.

The optimiser's state stays in torch's format (its ``state_dict`` is a torch.optim.Adam one)
and the parameters hold the current weights at every moment. A change of the parameters made
elsewhere (``load_state_dict``, ``copy_``) bumps their version, and the next call repacks.

Needs the native library (`fastfvae.ops.native`; `available` says whether it is loaded).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastfvae.errors import FastFVAEError
from fastfvae.ops import native

DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether the native library with the discriminator calls is loaded (and not disabled)."""
    return native.active() and native.has("mlp_forward")


#: the GEMM variants on which the native D measured faster than torch's D in the fast step
#: (AVX-512: 1.32x the fp32 step, 1.04x the bf16 step on a Zen 5; docs/ops.md); on AVX2 (Zen 3)
#: it made the fp32 step slower (0.86x: MKL's AVX2 sgemm beats the native AVX2 kernel), so there
#: the fast step keeps torch's D unless asked (``native_d=True``)
DEFAULT_GEMM_ISAS = ("avx512_bf16", "avx512")


def default_here() -> bool:
    """Whether the fast CPU step takes the native D by default: `available`, on a GEMM variant
    of `DEFAULT_GEMM_ISAS`."""
    return available() and native.gemm_isa() in DEFAULT_GEMM_ISAS


def _layers(disc: nn.Module) -> tuple[list[nn.Linear], float]:
    """D's Linear layers and the one LeakyReLU slope between them."""
    seq = getattr(disc, "net", disc)
    modules = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    acts = [m for m in modules if not isinstance(m, nn.Linear)]
    slopes = {float(m.negative_slope) if isinstance(m, nn.LeakyReLU) else 0.0 if isinstance(m, nn.ReLU) else None
              for m in acts}
    shape_ok = bool(linears) and len(acts) == len(linears) - 1 and all(
        isinstance(a, nn.Linear) != isinstance(b, nn.Linear) for a, b in zip(modules, modules[1:]))
    if not shape_ok or None in slopes or len(slopes) > 1 or isinstance(modules[-1], (nn.LeakyReLU, nn.ReLU)):
        raise FastFVAEError(
            "NativeDiscriminator: expected an nn.Sequential (or a module with .net) of nn.Linear layers with one "
            f"nn.LeakyReLU/nn.ReLU between each two, got {type(disc).__name__}")
    slope = slopes.pop() if slopes else 0.0
    if slope < 0:
        raise FastFVAEError(f"NativeDiscriminator: the LeakyReLU slope must be >= 0, got {slope}")
    for a, b in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            raise FastFVAEError(f"NativeDiscriminator: layer widths do not chain ({a} then {b})")
    return linears, slope


class NativeDiscriminator:
    """``disc``'s forward, backward and Adam on the native library; see the module doc.

    ``rows``: the most rows a forward keeps (2B for the two halves); ``dtype``: float32 or
    bfloat16 GEMM operands (float32 accumulation either way); ``optimizer``: the
    torch.optim.Adam over ``disc``'s parameters whose update `step` runs (one parameter group,
    no weight decay, amsgrad or maximize), or None for forward/backward only.
    """

    def __init__(self, disc: nn.Module, rows: int, dtype: torch.dtype = torch.bfloat16,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        if not available():
            raise FastFVAEError(f"NativeDiscriminator needs the native library: {native.status()[1]}")
        if dtype not in DTYPES:
            raise FastFVAEError(f"NativeDiscriminator: dtype must be float32 or bfloat16, got {dtype}")
        if rows < 1:
            raise FastFVAEError(f"NativeDiscriminator: rows must be >= 1, got {rows}")
        self.linears, self.slope = _layers(disc)
        for m in self.linears:
            if m.bias is None or m.weight.dtype != torch.float32 or m.weight.device.type != "cpu":
                raise FastFVAEError("NativeDiscriminator: float32 CPU nn.Linear layers with biases only")
        self.dtype, self.rows = dtype, int(rows)
        self.widths = [self.linears[0].in_features] + [m.out_features for m in self.linears]
        pad = 2 if dtype == torch.bfloat16 else 1
        #: acts[l]: the input of layer l for all rows (acts[0] = the codes), width padded to even in bf16
        self.acts = [torch.zeros(self.rows, -(-w // pad) * pad, dtype=dtype) for w in self.widths[:-1]]
        #: signals[l]: d(loss)/d(pre-activation of layer l) per row, written by each backward over its
        #: rows (a shared `update` reads rows 0:S there, scaled, and leaves them as they were)
        self.signals = [torch.zeros(self.rows, -(-w // pad) * pad, dtype=dtype) for w in self.widths[1:]]
        #: (start, n, upstream gradient as stored, weights generation) of the last input-gradient-only
        #: backward whose signals are still in `signals` (`update` reuses them), else None
        self._kept: tuple | None = None
        #: bumped whenever the weights may have changed (a repack, `step`, `update`, `parameters_changed`)
        self._weights_gen = 0
        #: rows the last `update` took from the kept signals (0: it ran the whole backward)
        self.last_shared_rows = 0
        self.grad_w = [torch.zeros_like(m.weight) for m in self.linears]
        self.grad_b = [torch.zeros_like(m.bias) for m in self.linears]
        self.optimizer = optimizer
        if optimizer is not None:
            self._check_optimizer(optimizer)
        self._packed: list[torch.Tensor] = []
        self._packed_t: list[torch.Tensor] = []
        self._versions: tuple | None = None

    # --- weights ---------------------------------------------------------------------------
    def params(self) -> list[nn.Parameter]:
        return [p for m in self.linears for p in (m.weight, m.bias)]

    def _check_optimizer(self, optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Adam) or len(optimizer.param_groups) != 1:
            raise FastFVAEError("NativeDiscriminator: the optimizer must be a torch.optim.Adam with one parameter group")
        group = optimizer.param_groups[0]
        if group["weight_decay"] or group["amsgrad"] or group.get("maximize") or group.get("differentiable"):
            raise FastFVAEError("NativeDiscriminator: plain Adam only (no weight decay, amsgrad, maximize)")
        if {id(p) for p in group["params"]} != {id(p) for p in self.params()}:
            raise FastFVAEError("NativeDiscriminator: the optimizer must hold exactly the discriminator's parameters")

    def _current(self) -> tuple:
        return tuple(p._version for p in self.params()) + tuple(p.data_ptr() for p in self.params())

    def packed(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The packed weights (forward, input gradient), repacked when a parameter changed elsewhere."""
        if self._current() != self._versions:
            ops = native.ops()
            pairs = [ops.mlp_pack_weight(m.weight.detach().contiguous(), self.dtype) for m in self.linears]
            self._packed = [a for a, _ in pairs]
            self._packed_t = [b for _, b in pairs]
            self._versions = self._current()
            self._weights_gen += 1
        return self._packed, self._packed_t

    def parameters_changed(self) -> None:
        """Repack at the next call (for in-place changes that do not bump versions)."""
        self._versions = None
        self._weights_gen += 1

    def _check_rows(self, what: str, t: torch.Tensor, width: int, start: int) -> None:
        if t.dim() != 2 or t.shape[1] != width or not 0 <= start <= self.rows - t.shape[0]:
            raise FastFVAEError(f"NativeDiscriminator.{what}: expected [n, {width}] for rows start:start+n within "
                                f"0:{self.rows}, got {tuple(t.shape)} at start {start}")

    def _forget(self, start: int, n: int) -> None:
        """Drop the kept signals when rows start:start+n are about to be overwritten."""
        if n > 0 and self._kept is not None and start < self._kept[0] + self._kept[1] and self._kept[0] < start + n:
            self._kept = None

    def _shared_rows(self, grad: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(S, scale) for `update`: rows 0:S kept from an input-gradient backward (same weights,
        same activations) where ``grad``'s row r is ``scale[r]`` times the upstream gradient that
        backward was given -- then every layer's signal of row r is ``scale[r]`` times the kept
        one and only rows S:n need the input-gradient GEMMs. (0, None) when there is no such prefix.

        FactorVAE (Kim & Mnih 2018) is the case: on the codes' rows the TC term's gradient is
        gamma/B * (1, -1) and D's two-class cross-entropy's is (p0 - 1, p1) / 2B = -p1/2B *
        (1, -1), the same direction, so D's update reuses the TC term's backward. ``scale`` is
        the least-squares ratio, and the update uses ``grad``'s projection on the kept direction:
        the rows count as parallel when what the projection leaves out is at most ``tol`` times
        ``grad``'s largest element -- float32: 2^-20, about the rounding of torch's p0 - 1 while
        some row has p1 above ~2% (a D sure of every code falls back); bfloat16: 2^-12, below the
        2^-9 rounding of the largest rows' signals, which dominates the sums either way. A NaN
        or infinity in those rows fails the test (the whole backward runs and propagates it)."""
        kept = self._kept
        if kept is None or kept[0] != 0 or kept[1] > grad.shape[0] or kept[3] != self._weights_gen:
            return 0, None
        rows, ref = kept[1], kept[2]
        g = grad[:rows]
        norm = (ref * ref).sum(1)
        if not bool((norm > 0).all()):
            return 0, None
        scale = (g * ref).sum(1) / norm
        residual = (g - scale[:, None] * ref).abs().max()
        tol = 2.0 ** -20 if self.dtype == torch.float32 else 2.0 ** -12
        if not bool(residual <= tol * g.abs().max()):
            return 0, None
        return rows, scale.contiguous()

    # --- forward / backward ----------------------------------------------------------------
    @torch.no_grad()
    def forward(self, z: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits (float32) of codes ``z`` [n, z_dim], keeping activations in rows start:start+n."""
        self._check_rows("forward", z, self.widths[0], start)
        self._forget(start, z.shape[0])
        packed, _ = self.packed()
        return native.ops().mlp_forward(z.detach(), packed, [m.bias.detach() for m in self.linears], self.widths,
                                        self.slope, self.acts, int(start))

    __call__ = forward

    @torch.no_grad()
    def backward(self, grad_logits: torch.Tensor, start: int = 0, params: bool = True,
                 input_grad: bool = False) -> torch.Tensor | None:
        """From d(loss)/d(logits) of rows start:start+n of the last forward: with ``params`` the
        parameter gradients into `grad_w` / `grad_b` (float32, replacing what was there), with
        ``input_grad`` d(loss)/d(codes) [n, z_dim] float32 (returned). One pass for both."""
        self._check_rows("backward", grad_logits, self.widths[-1], start)
        n = grad_logits.shape[0]
        self._forget(start, n)
        _, packed_t = self.packed()
        gw, gb = (self.grad_w, self.grad_b) if params else ([], [])
        grad = grad_logits.detach().float()
        out = native.ops().mlp_backward(grad, packed_t, self.acts, self.widths, self.slope, int(start),
                                        bool(input_grad), gw, gb, self.signals)
        if input_grad and not params and n:
            self._kept = (start, n, grad.to(self.dtype).float().clone(), self._weights_gen)
        return out if input_grad else None

    def input_grad(self, grad_logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """d(loss)/d(codes) [n, z_dim] float32 from d(loss)/d(logits) of rows start:start+n."""
        return self.backward(grad_logits, start, params=False, input_grad=True)

    def param_grads(self, grad_logits: torch.Tensor) -> None:
        """d(loss)/d(parameters) into `grad_w` / `grad_b` from d(loss)/d(logits) of rows 0:n."""
        self.backward(grad_logits, 0, params=True, input_grad=False)

    def grads(self) -> list[torch.Tensor]:
        """The parameter gradients in ``disc.parameters()`` order (weight, bias per layer)."""
        return [g for pair in zip(self.grad_w, self.grad_b) for g in pair]

    # --- Adam --------------------------------------------------------------------------------
    def _adam_args(self) -> tuple:
        """(m_w, v_w, m_b, v_b, step_size, bias_correction2_sqrt, 1 - beta1, beta2, 1 - beta2, eps) of the
        next update, the step counts advanced as torch's Adam does (state created as it creates it)."""
        opt = self.optimizer
        if opt is None:
            raise FastFVAEError("NativeDiscriminator: the update needs the optimizer given at construction")
        self._check_optimizer(opt)
        group, states = opt.param_groups[0], []
        for p in self.params():
            s = opt.state[p]
            if "step" not in s:
                s["step"] = torch.zeros((), dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for key in ("exp_avg", "exp_avg_sq"):
                t = s[key]
                if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                    s[key] = t.to(device="cpu", dtype=torch.float32).contiguous()
            states.append(s)
        steps = {float(s["step"]) for s in states}
        if len(steps) != 1:
            raise FastFVAEError(f"NativeDiscriminator: one Adam step count for all parameters, got {sorted(steps)}")
        for s in states:
            s["step"] += 1
        t = float(states[0]["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        step_size = float(group["lr"]) / (1 - beta1 ** t)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** t)
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        return (m[0::2], v[0::2], m[1::2], v[1::2], step_size, bias_correction2_sqrt, 1 - beta1, beta2, 1 - beta2,
                float(group["eps"]))

    @torch.no_grad()
    def step(self) -> None:
        """One update of the optimiser (torch.optim.Adam's formula) from `grad_w` / `grad_b`:
        the parameters, the optimiser's moments and step count, and both packed weight copies."""
        packed, packed_t = self.packed()
        m_w, v_w, m_b, v_b, *scalars = self._adam_args()
        params = self.params()
        native.ops().mlp_adam([p.data for p in params[0::2]], [p.data for p in params[1::2]], m_w, v_w, m_b, v_b,
                              self.grad_w, self.grad_b, packed, packed_t, *scalars)
        self._versions = self._current()  # the packed copies are the updated parameters
        self._weights_gen += 1

    @torch.no_grad()
    def update(self, grad_logits: torch.Tensor) -> None:
        """`param_grads` then `step` in one pass: each layer's weight gradient goes from the GEMM
        straight into Adam (in the GEMM's epilogue, after that layer's input gradient was formed
        from its old weights), so no gradient is stored; `grad_w` / `grad_b` are left as they were."""
        self._check_rows("update", grad_logits, self.widths[-1], 0)
        grad = grad_logits.detach().float()
        packed, packed_t = self.packed()
        shared, scale = self._shared_rows(grad)
        self._kept, self.last_shared_rows = None, shared
        m_w, v_w, m_b, v_b, *scalars = self._adam_args()
        params = self.params()
        native.ops().mlp_update(grad, packed_t, self.acts, self.widths, self.slope,
                                [p.data for p in params[0::2]], [p.data for p in params[1::2]], m_w, v_w, m_b, v_b,
                                packed, *scalars, self.signals, shared, scale)
        self._versions = self._current()
        self._weights_gen += 1
