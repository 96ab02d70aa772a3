"""Adam for the fast step: fused (one kernel over all parameters) and, on CUDA, capturable.

The arithmetic is torch's Adam (same lr, betas, eps and bias correction as the reference's
`build_optimizers`); only the implementation differs. `state_dict()` writes the reference
optimiser's param-group options (``fused``/``foreach``/``capturable`` as the reference Adam
has them), so a fast run's checkpoint is byte-for-byte in the reference's format and resumes
under either path; `load_state_dict` puts the fast options back.
"""

from __future__ import annotations

import torch

from fastfvae.train.state import own_storage

#: The implementation switches that differ between the reference Adam and the fast one.
IMPL_KEYS = ("fused", "foreach", "capturable")


class FastAdam(torch.optim.Adam):
    """`torch.optim.Adam` with ``fused=True`` (+ ``capturable`` on CUDA), reference-format state."""

    def __init__(self, reference: torch.optim.Adam, fused: bool = True) -> None:
        group = reference.param_groups[0]
        params = [p for g in reference.param_groups for p in g["params"]]
        cuda = params[0].is_cuda
        super().__init__(params, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                         weight_decay=group["weight_decay"], fused=fused or None,
                         foreach=None if fused else True, capturable=cuda)
        self._reference_impl = {k: group.get(k) for k in IMPL_KEYS}
        self._fast_impl = {k: self.param_groups[0][k] for k in IMPL_KEYS}
        self.load_state_dict(reference.state_dict())

    def state_dict(self) -> dict:
        state = super().state_dict()
        for group in state["param_groups"]:
            group.update(self._reference_impl)
        # moments that are views of flat buffers (FlatAdam) are saved as their own tensors, the
        # reference's format (the packed per-parameter dicts are the live ones: copied, not edited)
        state["state"] = {i: {k: own_storage(t) for k, t in s.items()} for i, s in state["state"].items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(self._fast_impl)
        # Moments must have their parameter's memory layout (channels_last convs) for the
        # fused kernel; a reference checkpoint stores them contiguous.
        for p, s in self.state.items():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in s and s[k].stride() != p.stride():
                    s[k] = torch.empty_like(p).copy_(s[k])
            if self._fast_impl["capturable"] and "step" in s:
                s["step"] = s["step"].to(device=p.device, dtype=torch.float32)


def fast_optimizers(optims, fused: bool = True):
    """(vae Adam, disc Adam or None) for the fast step, carrying over the reference's state."""
    return type(optims)(FastAdam(optims.vae, fused), None if optims.disc is None else FastAdam(optims.disc, fused))
