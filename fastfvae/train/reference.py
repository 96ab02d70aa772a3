"""The reference step: `fastfvae.train.step.train_step` over `EagerMechanism` (plain torch).

This is the readable loop the fast path is checked against: the algorithm and its draw order
are documented in `fastfvae.train.step`; here it runs on the models as they are, with torch's
Adam, in fp32, the batches taken from the dataset's ``float_batch`` and rendered with the
step's observation noise (colour / noisy dSprites).
"""

from __future__ import annotations

import torch

from fastfvae.train.step import (  # noqa: F401  (the step's public names, re-exported)
    EagerMechanism, StepFn, StepInputs, StepShapes, draw_step_inputs, train_step,
)


def observations(data, rows, noise: torch.Tensor | None, device) -> torch.Tensor:
    """The float batch of ``rows`` as the model sees it: the stored images, rendered with the
    step's observation noise by datasets that have some (the identity otherwise)."""
    x = data.float_batch(rows, device)
    if noise is None:
        return x
    return data.render(x, noise.to(device))


def bind(method, mech):
    """``method`` with its adversary (if any) running on ``mech``'s implementation of the network."""
    if method.adversarial:
        method.attach(mech.adversary)
    return method


def reference_step(models, optims, batch: torch.Tensor, batch2: torch.Tensor | None, eps: torch.Tensor,
                   eps2: torch.Tensor | None, keys: torch.Tensor | None, cfg, step: int = 0) -> dict:
    """One reference step on device tensors (batch [B,C,64,64], eps/eps2 [B,z], keys as the
    method's adversary draws them). Updates the models in place; returns detached 0-dim metrics."""
    mech = EagerMechanism(models, optims)
    return train_step(mech, bind(cfg.method(), mech), batch, batch2, eps, eps2, keys, step)


def make_reference_step(state, data) -> StepFn:
    """The reference `StepFn` for ``state``: `observations` of the drawn rows, then `train_step`."""
    device = state.device
    mech = EagerMechanism(state.models, state.optims)
    method = bind(state.cfg.method(), mech)

    def to_device(t):
        return None if t is None else t.to(device)

    def step(inputs: StepInputs) -> dict:
        x = observations(data, inputs.rows, inputs.obs, device)
        x2 = None if inputs.rows2 is None else observations(data, inputs.rows2, inputs.obs2, device)
        return train_step(mech, method, x, x2, to_device(inputs.eps), to_device(inputs.eps2),
                          to_device(inputs.keys), state.step)

    return step
