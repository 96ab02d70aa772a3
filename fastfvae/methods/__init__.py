"""Methods as plug-ins: a registry of `Method` classes, one module per method.

    from fastfvae import methods
    methods.names()                               # the registered methods
    m = methods.make("factorvae", gamma=35.0)     # validated hyperparameters
    m.regularizer(kl, mu, logvar, z, step)        # the term added to the reconstruction loss

A new method is one module with a `Method` subclass decorated with `register`; importing it
makes it available to `fastfvae train --model NAME` (see `fastfvae.methods.base`).
"""

from __future__ import annotations

import importlib

from fastfvae.errors import FastFVAEError
from fastfvae.methods.base import AdversarialMethod, Hyperparameters, Method, hparam  # noqa: F401

#: The methods that ship with fastfvae, in the order ``--help`` lists them.
BUILTIN = ("vae", "betavae", "annealedvae", "factorvae", "dipvae", "betatcvae")

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``. A hyperparameter named like a
    run setting (``steps``, ``batch_size``, ``z_dim``: a `TrainConfig` field, or one of
    ``fastfvae train``'s own flags) is refused here, when the method is defined, since a run
    could never set it."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    from fastfvae.train.config import check_hparam_names  # here: the config reads this registry

    check_hparam_names(cls)
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in BUILTIN:
        importlib.import_module(f"fastfvae.methods.{module}")


def names() -> tuple[str, ...]:
    """Registered method names: the built-in ones first, then any registered since."""
    _load_builtins()
    return tuple(n for n in BUILTIN if n in _REGISTRY) + tuple(n for n in _REGISTRY if n not in BUILTIN)


def get(name: str) -> type[Method]:
    """The method class registered as ``name`` (FastFVAEError naming the known ones if none)."""
    _load_builtins()
    if name not in _REGISTRY:
        raise FastFVAEError(f"unknown model {name!r}; expected one of: {', '.join(names())}")
    return _REGISTRY[name]


def make(name: str, **hparams) -> Method:
    """A method instance with ``hparams`` over its defaults (FastFVAEError for an unknown name,
    a hyperparameter it does not declare, or a value that fails its check)."""
    cls = get(name)
    declared = {f for f in cls.Hparams.__dataclass_fields__}
    unknown = sorted(set(hparams) - declared)
    if unknown:
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise FastFVAEError(f"{flags} is not a hyperparameter of {name} (it takes: "
                            f"{', '.join(sorted(declared)) or 'none'})")
    values = {k: tuple(v) if isinstance(getattr(cls.Hparams(), k), tuple) else v for k, v in hparams.items()}
    return cls(cls.Hparams(**values))
