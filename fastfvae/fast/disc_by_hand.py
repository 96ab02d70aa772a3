"""The discriminator's forward and backward written out, for the fast step on CPU.

D is an MLP (Linear + LeakyReLU, `models.Discriminator`). Written by hand, one step needs
fewer and larger GEMMs than autograd gives it, on the same parameters and with the same
result up to summation order:

- The forward on z (for the TC term) and the one on the permuted codes write their
  activations into the two halves of one [2B, width] buffer per layer, so D's parameter
  gradient is one K = 2B GEMM per layer instead of two K = B GEMMs plus an add, and the
  hidden-layer input gradients one 2B-row GEMM instead of two B-row ones.
- The TC term's gradient w.r.t. z (for the VAE update) needs only input gradients: no weight
  gradients are computed for it (autograd's ``inputs=`` prunes them too; here it is explicit).
- With ``dtype=bfloat16`` the weights are cast once per parameter update (the step calls
  `parameters_changed` after each optimiser step), not once per autocast region, and no
  autograd cast nodes exist; the parameter gradients are accumulated in float32 inside the
  GEMM and stored as float32.

The leaky-ReLU backward uses the sign of the layer's output (slope > 0 keeps the sign), so
only each layer's input activation is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastfvae.models.discriminator import Discriminator

_aten = torch.ops.aten


class DiscriminatorByHand:
    """Forward/backward of ``disc`` on row ranges of a 2B-row activation buffer."""

    def __init__(self, disc: Discriminator, rows: int, dtype: torch.dtype = torch.float32) -> None:
        if disc.slope <= 0:
            raise ValueError(f"the leaky-ReLU slope must be > 0 (sign-preserving), got {disc.slope}")
        self.linears = [m for m in disc.net if isinstance(m, nn.Linear)]
        self.slope, self.dtype = disc.slope, dtype
        device = self.linears[0].weight.device
        # acts[l]: the input of linear l for all rows (acts[0] = the codes)
        self.acts = [torch.empty(rows, m.in_features, device=device, dtype=dtype) for m in self.linears]
        self._versions: tuple | None = None
        self._weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: `fastfvae.fast.flat_adam.FlatAdam` over D's parameters (bf16 step): the bf16 weights
        #: are its flat copy and `param_grads` writes into its gradient buffer instead of ``.grad``
        self.flat = None

    def use_flat(self, flat) -> None:
        self.flat, self._versions = flat, None

    def _params(self) -> list[torch.Tensor]:
        return [p for m in self.linears for p in (m.weight, m.bias)]

    def weights_written(self) -> None:
        """The flat optimiser just wrote the bf16 copy from the updated parameters: it is current."""
        self._versions = tuple(p._version for p in self._params())

    def parameters_changed(self) -> None:
        """Call after an optimiser step: fused Adam updates in place without bumping versions."""
        self._versions = None

    def weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(W, b) per layer in ``dtype``, recast after `parameters_changed` or when a
        parameter's version changed (``copy_``, ``load_state_dict``, a non-fused optimiser)."""
        versions = tuple(p._version for p in self._params())
        if versions != self._versions:
            if self.flat is not None:
                self.flat.refresh_weights()
                views = self.flat.weights
                self._weights = list(zip(views[0::2], views[1::2]))
            else:
                with torch.no_grad():
                    self._weights = [(m.weight.detach().to(self.dtype), m.bias.detach().to(self.dtype))
                                     for m in self.linears]
            self._versions = versions
        return self._weights

    @torch.no_grad()
    def forward(self, z: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits (float32) of codes ``z`` [n, z_dim], keeping activations in rows start:start+n."""
        rows = slice(start, start + z.shape[0])
        h = self.acts[0][rows]
        h.copy_(z)
        weights = self.weights()
        for layer, (w, b) in enumerate(weights[:-1]):
            out = self.acts[layer + 1][rows]
            torch.addmm(b, h, w.t(), out=out)
            h = F.leaky_relu_(out, self.slope)
        w, b = weights[-1]
        return torch.addmm(b, h, w.t()).float()

    def _back_through(self, grad: torch.Tensor, weight: torch.Tensor, layer: int, rows: slice) -> torch.Tensor:
        """Gradient w.r.t. the input of linear ``layer`` (weight ``weight``) from the one w.r.t. its output."""
        grad = grad @ weight
        if layer == 0:
            return grad
        return _aten.leaky_relu_backward(grad, self.acts[layer][rows], self.slope, True)

    @torch.no_grad()
    def input_grad(self, grad_logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """d(loss)/d(codes) [n, z_dim] float32, from d(loss)/d(logits) of rows start:start+n."""
        rows = slice(start, start + grad_logits.shape[0])
        grad, weights = grad_logits.to(self.dtype), self.weights()
        for layer in reversed(range(len(self.linears))):
            grad = self._back_through(grad, weights[layer][0], layer, rows)
        return grad.float()

    @torch.no_grad()
    def param_grads(self, grad_logits: torch.Tensor) -> None:
        """Store d(loss)/d(parameters) (float32) in ``.grad`` from d(loss)/d(logits) of all rows;
        with `use_flat`, write them (in ``dtype``, replacing what was there) into the flat
        optimiser's gradient buffer instead."""
        rows = slice(0, grad_logits.shape[0])
        grad, weights = grad_logits.to(self.dtype), self.weights()
        for layer in reversed(range(len(self.linears))):
            m = self.linears[layer]
            if self.flat is not None:
                torch.mm(grad.t(), self.acts[layer][rows], out=self.flat.grads[2 * layer])
                self.flat.grads[2 * layer + 1].copy_(grad.sum(0, dtype=torch.float32))
            else:
                _accumulate(m.weight, grad.t() @ self.acts[layer][rows])
                _accumulate(m.bias, grad.sum(0, dtype=torch.float32))
            if layer > 0:
                grad = self._back_through(grad, weights[layer][0], layer, rows)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad
