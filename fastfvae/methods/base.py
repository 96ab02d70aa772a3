"""What a method is: its hyperparameters, its regulariser, and (optionally) its adversary.

The contract is disentanglement_lib's (``methods/unsupervised/vae.py``): a VAE's loss is
``recon + regularizer``, and a method is the regulariser. Here

    method = fastfvae.methods.make("betavae", beta=4.0)
    term = method.regularizer(kl, mu, logvar, z, step)      # 0-dim tensor

with ``kl`` the batch mean of the per-sample Gaussian KL(q(z|x) || N(0, I)) (summed over
latent dimensions), ``mu`` / ``logvar`` the encoder's [B, z] outputs, ``z`` the sampled codes
[B, z] and ``step`` the number of VAE updates done before this one (an int, or a 0-dim tensor
when the step runs inside a CUDA graph: regularisers use torch ops on it, never Python
branches).

A method declares its hyperparameters as a frozen dataclass of `hparam` fields (default, one
line of help, the check its value must pass, where the default comes from); `fastfvae train`
turns each field into a flag, and the run's ``config.json`` records the values.

A method with an adversary (FactorVAE's discriminator) also builds the adversary's network
and optimiser, says which extra randomness its updates need (`adversary_noise_shape`) and
whether they see a second batch, and runs its updates in `adversary_step` through the step's
*mechanism*: the object that implements encode / decode / the adversary's network / the
parameter updates eagerly, compiled, or by hand on CPU (`fastfvae.train.step`). The algorithm
is written once, here and in the step; the mechanism only changes how each piece runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import torch

from fastfvae.errors import FastFVAEError

#: A value check: returns None if ``value`` is fine, else what was expected ("a number >= 0").
Check = Callable[[Any], "str | None"]


def at_least(low: float, integer: bool = False) -> Check:
    """A finite number (an int if ``integer``) >= ``low``."""
    def check(value):
        if integer and (not isinstance(value, int) or isinstance(value, bool)):
            return f"an integer >= {low:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            return f"{'an integer' if integer else 'a finite number'} >= {low:g}"
        return None
    return check


def above(low: float) -> Check:
    """A finite number > ``low``."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
            return f"a finite number > {low:g}"
        return None
    return check


def one_of(*choices: str) -> Check:
    def check(value):
        return None if value in choices else " or ".join(choices)
    return check


def pair_in_unit_interval(value) -> str | None:
    """Two numbers in [0, 1) (Adam's betas)."""
    try:
        ok = len(value) == 2 and all(0.0 <= float(b) < 1.0 for b in value)
    except (TypeError, ValueError):
        ok = False
    return None if ok else "two numbers in [0, 1)"


def hparam(default: Any, help: str, check: Check | None = None, source: str = "") -> Any:
    """A hyperparameter field: ``default``, one line of ``help`` (shown by ``--help``), the
    ``check`` its value must pass, and the ``source`` of the default (a paper, dlib's gin)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "source": source})


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Base of every method's hyperparameter dataclass."""

    def validate(self) -> "Hyperparameters":
        """FastFVAEError (one line) naming the first field whose value fails its check."""
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            problem = check(value) if check is not None else None
            if problem is not None:
                raise FastFVAEError(f"{f.name.replace('_', '-')} must be {problem}, got {value!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def as_step_tensor(step, like: torch.Tensor) -> torch.Tensor:
    """``step`` (an int or a 0-dim tensor) as a float32 0-dim tensor on ``like``'s device."""
    return torch.as_tensor(step, dtype=torch.float32, device=like.device)


class Method:
    """Base of a method: ``regularizer`` is the whole of a method without an adversary."""

    #: Registry name (``--model NAME``).
    name: ClassVar[str] = ""
    #: One line for ``--help`` and the README's table.
    summary: ClassVar[str] = ""
    #: The paper the method comes from.
    citation: ClassVar[str] = ""
    #: The hyperparameter dataclass (a `Hyperparameters` subclass).
    Hparams: ClassVar[type[Hyperparameters]] = Hyperparameters
    #: Names of the method's own 0-dim metrics, after loss / recon / kl (e.g. FactorVAE's tc).
    metric_names: ClassVar[tuple[str, ...]] = ()
    #: True when the method trains an adversary beside the VAE (see `AdversarialMethod`).
    adversarial: ClassVar[bool] = False
    #: True when the adversary's updates see a second, independent batch (drawn after the first).
    second_batch: bool = False
    #: Float hyperparameters that the runs of a pack (`fastfvae.study.pack`) must share: an
    #: optimiser's setting or the architecture's (the pack stacks the others as [K] tensors).
    pack_fixed: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hparams: Hyperparameters | None = None) -> None:
        self.hparams = (hparams if hparams is not None else self.Hparams()).validate()

    def __getattr__(self, name: str):
        # hyperparameters read as attributes (method.beta); only called when normal lookup fails
        hparams = self.__dict__.get("hparams")
        if hparams is not None and name in {f.name for f in dataclasses.fields(hparams)}:
            return getattr(hparams, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def regularizer(self, kl: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
                    step) -> torch.Tensor:
        """The term added to the reconstruction loss (a 0-dim tensor)."""
        raise NotImplementedError

    def vae_terms(self, kl, mu, logvar, z, step) -> tuple[torch.Tensor, dict]:
        """What the step calls: (the regulariser, values its adversary step reuses / reports).
        A method without an adversary returns ``(regularizer(...), {})``."""
        return self.regularizer(kl, mu, logvar, z, step), {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.hparams).items())
        return f"{self.name}({fields})"


class AdversarialMethod(Method):
    """A method that trains a network against the VAE (FactorVAE's discriminator).

    The step builds the network with `build_adversary` (right after the VAE, from the run's
    seed), its optimiser with `adversary_optimizer`, draws ``adversary_noise_shape`` uniforms
    per step, hands the method the network's implementation (`attach`) and, after the VAE
    update, calls `adversary_step`.
    """

    adversarial = True

    def __init__(self, hparams: Hyperparameters | None = None) -> None:
        super().__init__(hparams)
        self.network: Callable[[torch.Tensor], torch.Tensor] | None = None

    def attach(self, network: Callable[[torch.Tensor], torch.Tensor]) -> "AdversarialMethod":
        """Use ``network`` (the module, or a mechanism's implementation of it) in the regulariser."""
        self.network = network
        return self

    def _network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.network is None:
            raise FastFVAEError(f"{self.name}'s regularizer needs its adversary network: call "
                                f"method.attach(network) first (the training step does)")
        return self.network

    def build_adversary(self, z_dim: int) -> torch.nn.Module:
        raise NotImplementedError

    def adversary_optimizer(self, params, adam_eps: float, fused: bool | None = None) -> torch.optim.Optimizer:
        raise NotImplementedError

    def adversary_noise_shape(self, batch_size: int, z_dim: int) -> tuple[int, ...] | None:
        """Shape of the uniforms [0, 1) the adversary's updates use each step (None: none)."""
        return None

    def adversary_step(self, mech, z: torch.Tensor, x2: torch.Tensor | None, eps2: torch.Tensor | None,
                       noise: torch.Tensor | None, aux: dict) -> dict:
        """The adversary's updates after the VAE update; returns the method's metrics."""
        raise NotImplementedError
