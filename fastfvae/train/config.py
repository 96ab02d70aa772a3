"""`TrainConfig`: every setting of a training run in one dataclass, defaults from the paper.

Sources: Kim & Mnih, "Disentangling by Factorising" (ICML 2018), Section 6 for the
architecture, gamma = 35 and the discriminator; the ICML version's appendix for Adam (VAE lr
1e-4, betas (0.9, 0.999); D lr 1e-4, betas (0.5, 0.9)), batch 64 and 3e5 iterations;
Algorithm 1 for the second batch of permuted codes. The CLI maps its flags onto these fields; the resolved config is written as
``config.json`` in the run folder and inside every checkpoint, and restored on resume.

Presets (`preset(name)`):

- ``paper``: the run of Kim & Mnih 2018, Section 6: FactorVAE, gamma 35, D 6 x 1000, **5** D updates per VAE
  update, batch 64, z 10, 300k steps, permuted codes from a second batch (Algorithm 1).
- ``dlib``: disentanglement_lib's shared settings for its FactorVAE models: batch 64, z 10,
  300k steps, encoder/decoder FC width 256, 1 D update, permuted codes from the *same* batch
  (dlib permutes the codes of the batch it trains the VAE on). dlib sweeps gamma over
  10..100; gamma stays 35 unless ``--gamma`` is given.

- ``quickstart``: a first run that shows something within a few minutes on 2 CPU cores: the
  paper's model with gamma 50 (in the paper's and disentanglement_lib's sweeps) and
  disentanglement_lib's same-batch permutation, a 3x larger VAE learning rate (3e-4) and a 10x
  larger discriminator learning rate (1e-3: a discriminator that keeps up gives the TC term a
  gradient from the first thousand steps), bf16 on the fast path, 5k steps. Short of the
  paper's 300k, it is a demonstration, not a result.

`TrainConfig.validate` checks every field's range (seeds: [0, 2**63), what torch, numpy and
DALI all take); `check_settings_apply` refuses settings that would do nothing in the chosen
mode (a fast-path precision/loader with the reference step; a flag of the other model).

The defaults equal ``paper`` except ``d_steps = 1`` (the common choice; Kim & Mnih 2018, Section 6, note
that fewer D updates "work fine"), which makes a default step ~3x cheaper.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fastfvae.errors import FastFVAEError

MODELS = ("factorvae", "betavae")
PERM_BATCHES = ("second", "same")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
LOADERS = ("device", "torch", "dali")
#: Seeds are in [0, SEED_LIMIT): numpy's SeedSequence needs >= 0, torch.manual_seed < 2**64 and
#: DALI's pipeline seed is an int64.
SEED_LIMIT = 2**63


@dataclass
class TrainConfig:
    """A training run. Every field has the paper's default; see the module docstring for sources."""

    # --- objective ---------------------------------------------------------------------------
    #: "factorvae" (recon + KL + gamma * TC, with a discriminator) or "betavae" (recon + beta * KL).
    model: str = "factorvae"
    #: FactorVAE's TC weight (Kim & Mnih 2018, Section 6: 35; the full paper sweeps 10..100).
    gamma: float = 35.0
    #: beta-VAE's KL weight (used only with model="betavae"; 4 is Higgins et al.'s dSprites choice).
    beta: float = 4.0

    # --- architecture ------------------------------------------------------------------------
    #: Latent dimensions (paper: 10).
    z_dim: int = 10
    #: Width of the encoder's / decoder's fully connected layer (paper: 128; dlib: 256).
    fc_dim: int = 128
    #: Discriminator hidden width and number of hidden layers (Kim & Mnih 2018, Section 6: 6 layers of 1000).
    d_hidden: int = 1000
    d_layers: int = 6
    #: Discriminator LeakyReLU negative slope (paper: 0.2).
    d_slope: float = 0.2

    # --- optimisation ------------------------------------------------------------------------
    #: Number of VAE updates (paper: 3e5 iterations).
    steps: int = 300_000
    #: Images per batch (paper: 64). At least 2: permuting dimensions across a batch needs 2 rows.
    batch_size: int = 64
    #: Discriminator updates per VAE update (Kim & Mnih 2018, Section 6, used 5; 1 is the common choice).
    d_steps: int = 1
    #: Where the permuted codes come from: "second" = a second, independent batch (paper's
    #: Algorithm 1, 1Konny), "same" = the batch the VAE step used (disentanglement_lib).
    perm_batch: str = "second"
    #: VAE Adam learning rate and betas (paper: 1e-4, (0.9, 0.999)).
    vae_lr: float = 1e-4
    vae_betas: tuple[float, float] = (0.9, 0.999)
    #: Discriminator Adam learning rate and betas (paper: 1e-4, (0.5, 0.9)).
    d_lr: float = 1e-4
    d_betas: tuple[float, float] = (0.5, 0.9)
    #: Adam epsilon for both optimisers (Adam's / TensorFlow's default).
    adam_eps: float = 1e-8

    # --- run ---------------------------------------------------------------------------------
    #: Seeds the model initialisation, the batch order (EpochSampler) and the step noise generator.
    seed: int = 0
    #: dSprites file (.npz or .hdf5); None = `fastfvae.data.load_dsprites()`'s default (cached
    #: real file, else the procedural set).
    data: str | None = None
    #: "auto" (cuda if available, else cpu), "cpu" or "cuda".
    device: str = "auto"
    #: Run folder: config.json, train_log.jsonl, checkpoints, figures.
    out: str = "runs/fastfvae"
    #: Write a checkpoint every N steps (and always at the end); 0 = only at the end.
    ckpt_every: int = 10_000
    #: Log a JSONL line / refresh the progress numbers every N steps.
    log_every: int = 100
    #: The preset the config started from (recorded for the record only).
    preset: str | None = None

    # --- fast path / evaluation (their semantics live in fastfvae.fast / fastfvae.metrics) ------
    #: Use the fast step (fastfvae.fast) instead of the reference step. The CLI turns it on for
    #: every new run (``--reference`` turns it off); `run_training`'s own default step is the
    #: reference, so the dataclass default stays False.
    fast: bool = False
    #: Batch loader for the fast path ("device": the bit-packed set resident on the device).
    loader: str = "device"
    #: Arithmetic precision for the fast path ("fp32" for the reference step).
    precision: str = "fp32"
    #: Evaluate disentanglement metrics every N steps (0 = never during training).
    eval_every: int = 0

    #: Test hook, never set by the CLI: make the loss NaN at this step (checks the NaN guard).
    debug_nan_at_step: int | None = field(default=None, repr=False)

    # -------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise FastFVAEError (one line) for any out-of-range setting; returns self."""
        def bad(name: str, value: Any, expected: str) -> FastFVAEError:
            return FastFVAEError(f"{name} must be {expected}, got {value!r}")

        if self.model not in MODELS:
            raise bad("model", self.model, " or ".join(MODELS))
        if self.perm_batch not in PERM_BATCHES:
            raise bad("perm-batch", self.perm_batch, " or ".join(PERM_BATCHES))
        if self.device not in DEVICES:
            raise bad("device", self.device, ", ".join(DEVICES))
        if self.precision not in PRECISIONS:
            raise bad("precision", self.precision, " or ".join(PRECISIONS))
        if self.loader not in LOADERS:
            raise bad("loader", self.loader, ", ".join(LOADERS))
        for name in ("gamma", "beta", "d_slope"):
            value = getattr(self, name)
            if not (value >= 0.0 and value != float("inf")):
                raise bad(name.replace("_", "-"), value, "a finite number >= 0")
        for name in ("vae_lr", "d_lr", "adam_eps"):
            if not getattr(self, name) > 0.0:
                raise bad(name.replace("_", "-"), getattr(self, name), "> 0")
        for name in ("vae_betas", "d_betas"):
            betas = tuple(getattr(self, name))
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise bad(name.replace("_", "-"), betas, "two numbers in [0, 1)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < SEED_LIMIT:
            raise bad("seed", self.seed, "an integer in [0, 2**63) (torch, numpy and DALI all take it)")
        if self.batch_size < 2:
            raise bad("batch-size", self.batch_size, ">= 2 (permuting codes across a batch needs 2 rows)")
        minimum = {"z_dim": 1, "fc_dim": 1, "d_hidden": 1, "d_layers": 1, "d_steps": 1, "steps": 0,
                   "ckpt_every": 0, "log_every": 1, "eval_every": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(name.replace("_", "-"), value, f"an integer >= {low}")
        return self

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("debug_nan_at_step")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FastFVAEError(f"unknown config field(s) {', '.join(unknown)}; expected fields of TrainConfig")
        kwargs = {k: tuple(v) if k in ("vae_betas", "d_betas") else v for k, v in d.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


#: Fields a resumed run may change; every other field must match the checkpoint's config.
RESUMABLE_CHANGES = frozenset({
    "steps", "data", "device", "out", "ckpt_every", "log_every", "preset",
    "fast", "loader", "precision", "eval_every", "debug_nan_at_step",
})


def resume_conflicts(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Names of the fields where ``requested`` differs from the checkpoint's ``saved`` config
    in a way a resumed run cannot honour (anything but `RESUMABLE_CHANGES`)."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(requested)
    return [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]


#: Fields that only matter for one model: set explicitly for the other, they would do nothing.
MODEL_ONLY = {"beta": "betavae", "gamma": "factorvae", "d_steps": "factorvae", "perm_batch": "factorvae"}
#: Fields that only the fast path reads (the reference step always computes in fp32 from
#: `DSprites.float_batch`).
FAST_ONLY = ("precision", "loader")


def check_settings_apply(cfg: TrainConfig, given=(), source: str = "the config") -> None:
    """FastFVAEError (one line) if a setting would do nothing in ``cfg``'s mode, instead of
    silently ignoring it: a precision or loader other than the default with the reference step,
    and, among ``given`` (the fields the user set explicitly), a fast-path field with the
    reference step or a field of the other model (``beta`` for FactorVAE; ``gamma``,
    ``d_steps``, ``perm_batch`` for beta-VAE). ``source`` names where the fields not in
    ``given`` came from (a preset, a checkpoint), so the message points at it, not at a flag."""
    defaults = TrainConfig()
    if not cfg.fast:
        for name in FAST_ONLY:
            value, default = getattr(cfg, name), getattr(defaults, name)
            if name in given and not (name == "precision" and value == "fp32"):
                raise FastFVAEError(f"--{name} {value} only applies to the fast path, and this run uses the "
                                    f"reference step; drop --{name} or train with --fast")
            if name not in given and value != default:
                raise FastFVAEError(f"{source} sets {name} {value}, which only applies to the fast path, and this "
                                    f"run uses the reference step; train with --fast or pass --{name} {default}")
    for name, model in MODEL_ONLY.items():
        if name in given and cfg.model != model:
            flag = "--" + name.replace("_", "-")
            raise FastFVAEError(f"{flag} only applies to --model {model}, and this run trains {cfg.model}; "
                                f"drop {flag} or pass --model {model}")


def _paper() -> TrainConfig:
    return TrainConfig(model="factorvae", gamma=35.0, d_steps=5, steps=300_000, batch_size=64,
                       z_dim=10, perm_batch="second", preset="paper")


def _dlib() -> TrainConfig:
    return TrainConfig(model="factorvae", d_steps=1, steps=300_000, batch_size=64, z_dim=10,
                       fc_dim=256, perm_batch="same", preset="dlib")


def _quickstart() -> TrainConfig:
    """The first run: FactorVAE that visibly disentangles position and scale within a few minutes
    on 2 CPU cores (the README's first command); 5k steps is where its traversals show single
    latents for x, y and scale (docs/training.md, "Presets")."""
    return TrainConfig(model="factorvae", gamma=50.0, d_steps=1, steps=5000, batch_size=64, z_dim=10,
                       perm_batch="same", vae_lr=3e-4, d_lr=1e-3, fast=True, precision="bf16",
                       ckpt_every=1000, preset="quickstart")


PRESETS = {"paper": _paper, "dlib": _dlib, "quickstart": _quickstart}


def preset(name: str) -> TrainConfig:
    """The named preset's config (FastFVAEError for an unknown name)."""
    if name not in PRESETS:
        raise FastFVAEError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
