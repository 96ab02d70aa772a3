"""`TrainConfig`: every setting of a training run in one dataclass, defaults from the paper.

Sources: Kim & Mnih, "Disentangling by Factorising" (ICML 2018), Section 6 for the
architecture, gamma = 35 and the discriminator; the ICML version's appendix for Adam (VAE lr
1e-4, betas (0.9, 0.999); D lr 1e-4, betas (0.5, 0.9)), batch 64 and 3e5 iterations;
Algorithm 1 for the second batch of permuted codes. The CLI maps its flags onto these fields; the resolved config is written as
``config.json`` in the run folder and inside every checkpoint, and restored on resume.

Presets (`preset(name)`; `preset_settings(name)`: what each sets), all FactorVAE runs:

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

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
LOADERS = ("device", "torch", "dali")
#: The sample budgets an evaluation during training may use (`fastfvae.metrics.evaluate.BUDGETS`).
EVAL_BUDGETS = ("dlib", "training")
COMPILE_MODES = ("auto", "none", "model")
NOISE_SOURCES = ("auto", "host", "device")
#: Seeds are in [0, SEED_LIMIT): numpy's SeedSequence needs >= 0, torch.manual_seed < 2**64 and
#: DALI's pipeline seed is an int64.
SEED_LIMIT = 2**63


def _method_class(model: str):
    from fastfvae import methods

    return methods.get(model)


def _hparam_names(model: str) -> set[str]:
    return set(_method_class(model).Hparams.__dataclass_fields__)


@dataclass(init=False)
class TrainConfig:
    """A training run. Every field has the paper's default; see the module docstring for sources.

    ``TrainConfig(model="betavae", beta=8.0)``: keyword arguments that are not fields are the
    method's hyperparameters (`fastfvae.methods`), kept in ``hparams`` with the method's
    defaults for the rest and readable as attributes (``cfg.beta``).
    """

    # --- objective ---------------------------------------------------------------------------
    #: The method (`fastfvae.methods.names()`): factorvae, betavae, vae, annealedvae, dipvae, betatcvae.
    model: str = "factorvae"
    #: The method's hyperparameters, every declared one (defaults filled in): `fastfvae.methods`.
    hparams: dict = field(default_factory=dict)

    # --- data and architecture ----------------------------------------------------------------
    #: The ground-truth dataset (`fastfvae.data.registry`): dsprites, color_dsprites,
    #: noisy_dsprites, shapes3d.
    dataset: str = "dsprites"
    #: Latent dimensions (paper: 10).
    z_dim: int = 10
    #: Width of the encoder's / decoder's fully connected layer (paper: 128; dlib: 256).
    fc_dim: int = 128

    # --- optimisation ------------------------------------------------------------------------
    #: Number of VAE updates (paper: 3e5 iterations).
    steps: int = 300_000
    #: Images per batch (paper: 64). At least 2: permuting dimensions across a batch needs 2 rows.
    batch_size: int = 64
    #: VAE Adam learning rate and betas (paper: 1e-4, (0.9, 0.999)).
    vae_lr: float = 1e-4
    vae_betas: tuple[float, float] = (0.9, 0.999)
    #: Adam epsilon for every optimiser (Adam's / TensorFlow's default).
    adam_eps: float = 1e-8

    # --- run ---------------------------------------------------------------------------------
    #: Seeds the model initialisation, the batch order (EpochSampler) and the step noise generator.
    seed: int = 0
    #: The dataset's file (dSprites .npz/.hdf5, 3dshapes.h5); None = the dataset's default
    #: (dSprites: the cached real file, else the procedural set; 3D Shapes: the cached download).
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

    # --- fast path (its mechanisms live in fastfvae.fast; none changes the algorithm) ---------
    #: Use the fast step (fastfvae.fast) instead of the reference step. The CLI turns it on for
    #: every new run (``--reference`` turns it off); `run_training`'s own default step is the
    #: reference, so the dataclass default stays False.
    fast: bool = False
    #: Batch loader for the fast path ("device": the stored set resident on the device).
    loader: str = "device"
    #: Arithmetic precision for the fast path ("fp32" for the reference step).
    precision: str = "fp32"
    #: torch.compile the networks: none | model | auto (model on CUDA, none on CPU).
    compile: str = "auto"
    #: Capture the whole iteration as one CUDA graph (None = on CUDA).
    cuda_graph: bool | None = None
    #: Where the step's noise is drawn: host (the reference's stream) | device (inside the CUDA
    #: graph) | auto (device with a CUDA graph, else host).
    noise: str = "auto"
    #: The CPU layers written out (split-backward convolutions, D by hand); None = when nothing
    #: is compiled or captured.
    by_hand: bool | None = None
    #: fastfvae.ops Triton ops (None = on CUDA when available).
    fused_ops: bool | None = None
    #: Convolutions in channels_last memory format.
    channels_last: bool = True
    #: Fused (and on CUDA capturable) Adam.
    fused_adam: bool = True

    # --- evaluation ----------------------------------------------------------------------------
    #: Evaluate disentanglement metrics every N steps (0 = never during training).
    eval_every: int = 0
    #: The metrics each evaluation scores (`fastfvae.metrics.periodic`): factor_vae, beta_vae,
    #: mig, sap, dci, recon.
    eval_metrics: tuple[str, ...] = ("factor_vae",)
    #: Their sample budget: "dlib" (disentanglement_lib's settings, every dSprites row encoded)
    #: or "training" (about a quarter of the rows: cheaper curves, estimates of the dlib scores).
    eval_budget: str = "dlib"

    #: Test hook, never set by the CLI: make the loss NaN at this step (checks the NaN guard).
    debug_nan_at_step: int | None = field(default=None, repr=False)

    def __init__(self, model: str = "factorvae", hparams: dict | None = None, **values: Any) -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("model", "hparams"):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                setattr(self, f.name, values.pop(f.name) if f.name in values else default)
        self.model = model
        given = dict(hparams or {})
        given.update(values)  # the rest: the method's hyperparameters
        self.hparams = resolve_hparams(model, given) if model_known(model) else given

    def __getattr__(self, name: str) -> Any:
        # the method's hyperparameters as attributes; only called when normal lookup fails
        hparams = self.__dict__.get("hparams")
        if hparams is not None and name in hparams:
            return hparams[name]
        raise AttributeError(f"{type(self).__name__} ({self.__dict__.get('model')}) has no field or "
                             f"hyperparameter {name!r}")

    def method(self):
        """A fresh `fastfvae.methods.Method` for this run's model and hyperparameters."""
        from fastfvae import methods

        return methods.make(self.model, **self.hparams)

    # -------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise FastFVAEError (one line) for any out-of-range setting; returns self."""
        def bad(name: str, value: Any, expected: str) -> FastFVAEError:
            return FastFVAEError(f"{name} must be {expected}, got {value!r}")

        self.method()  # unknown model, an undeclared hyperparameter, or a value out of its range
        for name, choices in (("device", DEVICES), ("precision", PRECISIONS), ("loader", LOADERS),
                              ("compile", COMPILE_MODES), ("noise", NOISE_SOURCES),
                              ("eval_budget", EVAL_BUDGETS)):
            if getattr(self, name) not in choices:
                raise bad(name.replace("_", "-"), getattr(self, name), ", ".join(choices))
        from fastfvae.data.registry import DATASETS

        if self.dataset not in DATASETS:
            raise bad("dataset", self.dataset, "one of " + ", ".join(DATASETS))
        for name in ("vae_lr", "adam_eps"):
            if not getattr(self, name) > 0.0:
                raise bad(name.replace("_", "-"), getattr(self, name), "> 0")
        betas = tuple(self.vae_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise bad("vae-betas", betas, "two numbers in [0, 1)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < SEED_LIMIT:
            raise bad("seed", self.seed, "an integer in [0, 2**63) (torch, numpy and DALI all take it)")
        if self.batch_size < 2:
            raise bad("batch-size", self.batch_size, ">= 2 (permuting codes across a batch needs 2 rows)")
        minimum = {"z_dim": 1, "fc_dim": 1, "steps": 0, "ckpt_every": 0, "log_every": 1, "eval_every": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(name.replace("_", "-"), value, f"an integer >= {low}")
        return self

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "debug_nan_at_step"}
        d["hparams"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.hparams.items()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From `to_dict`'s form; a config written before methods declared their own
        hyperparameters (``gamma``, ``beta``, ``d_steps`` ... as top-level fields) is read too."""
        d = dict(d)
        model = d.pop("model", "factorvae")
        hparams = dict(d.pop("hparams", None) or {})
        if model_known(model):
            declared = _hparam_names(model)
            for name in LEGACY_HPARAM_FIELDS:
                if name in d:
                    value = d.pop(name)
                    if name in declared:
                        hparams.setdefault(name, value)
        unknown = sorted(set(d) - _FIELD_NAMES)
        if unknown:
            raise FastFVAEError(f"unknown config field(s) {', '.join(unknown)}; expected fields of TrainConfig")
        tuples = ("vae_betas", "eval_metrics")
        return cls(model=model, hparams=hparams, **{k: tuple(v) if k in tuples else v for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with fields and hyperparameters changed. A new ``model`` keeps only the
        hyperparameters it declares too (with their values) and takes its defaults for the rest."""
        model = changes.pop("model", self.model)
        hparams = dict(changes.pop("hparams", None) or self.hparams)
        if model != self.model and model_known(model):
            declared = _hparam_names(model)
            hparams = {k: v for k, v in hparams.items() if k in declared}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "hparams")}
        for name in list(changes):
            if name in fields:
                fields[name] = changes.pop(name)
        hparams.update(changes)
        return TrainConfig(model=model, hparams=hparams, **fields)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))

#: Hyperparameters that were top-level config fields before methods declared their own.
LEGACY_HPARAM_FIELDS = ("gamma", "beta", "d_steps", "perm_batch", "d_lr", "d_betas", "d_hidden", "d_layers", "d_slope")


def model_known(model: str) -> bool:
    from fastfvae import methods

    try:
        methods.get(model)
    except FastFVAEError:
        return False
    return True


#: Names that ``fastfvae train`` uses for flags of its own that are not `TrainConfig` fields
#: (``--help``, ``--resume``, ``--reference``, the ``--no-*`` forms of its switches): a method's
#: hyperparameter becomes the flag of its name, so it may not take one of these either.
CLI_ONLY_NAMES = ("help", "resume", "no_progress", "no_figures", "reference", "no_fast", "no_cuda_graph",
                  "no_by_hand", "no_fused_ops", "no_channels_last", "no_fused_adam")


def check_hparam_names(cls) -> None:
    """FastFVAEError (one line) if method class ``cls`` declares a hyperparameter named like a
    `TrainConfig` field or one of ``fastfvae train``'s own flags: `TrainConfig` routes a keyword
    that is a field to the field, never to ``hparams``, and the CLI's flag for it would be the
    field's, so the hyperparameter could never be set (and the CLI's parser could not be built)."""
    for name in getattr(cls.Hparams, "__dataclass_fields__", {}):
        if name in _FIELD_NAMES:
            raise FastFVAEError(f"method {cls.name!r} declares hyperparameter {name!r}, which clashes with the "
                                f"TrainConfig field {name!r} (TrainConfig({name}=...) sets the field, never the "
                                f"hyperparameter); rename the hyperparameter")
        if name in CLI_ONLY_NAMES:
            raise FastFVAEError(f"method {cls.name!r} declares hyperparameter {name!r}, which clashes with "
                                f"fastfvae train's own flag --{name.replace('_', '-')}; rename the hyperparameter")


def resolve_hparams(model: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every hyperparameter ``model`` declares: ``given`` over its defaults (FastFVAEError for a
    name it does not declare, or for a declaration that clashes with a field, `check_hparam_names`;
    values are checked by `TrainConfig.validate`)."""
    cls = _method_class(model)
    check_hparam_names(cls)
    declared = _hparam_names(model)
    unknown = sorted(set(given) - declared)
    if unknown:
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise FastFVAEError(f"{flags} is not a hyperparameter of {model} (it takes: {', '.join(sorted(declared)) or 'none'})")
    defaults = cls.Hparams()
    values = {name: getattr(defaults, name) for name in sorted(declared)}
    for name, value in given.items():
        values[name] = tuple(value) if isinstance(values[name], tuple) and isinstance(value, list) else value
    return values


#: Fields a resumed run may change; every other field (and every hyperparameter) must match
#: the checkpoint's config.
RESUMABLE_CHANGES = frozenset({
    "steps", "data", "device", "out", "ckpt_every", "log_every", "preset", "fast", "loader", "precision",
    "compile", "cuda_graph", "noise", "by_hand", "fused_ops", "channels_last", "fused_adam", "eval_every",
    "eval_metrics", "eval_budget", "debug_nan_at_step",
})


def resume_conflicts(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Names of the fields (and hyperparameters) where ``requested`` differs from the checkpoint's
    ``saved`` config in a way a resumed run cannot honour (anything but `RESUMABLE_CHANGES`)."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(requested)
    conflicts = [k for k in a if k not in RESUMABLE_CHANGES | {"hparams"} and a[k] != b[k]]
    if saved.model == requested.model:
        conflicts += [k for k in saved.hparams if saved.hparams[k] != requested.hparams.get(k)]
    return conflicts


#: Fields that only the fast path reads (the reference step always computes in fp32 from the
#: dataset's ``float_batch``).
FAST_ONLY = ("precision", "loader", "compile", "cuda_graph", "noise", "by_hand", "fused_ops", "channels_last",
             "fused_adam")


def methods_declaring(name: str) -> list[str]:
    """The registered methods that declare hyperparameter ``name``."""
    from fastfvae import methods

    return [m for m in methods.names() if name in methods.get(m).Hparams.__dataclass_fields__]


def check_settings_apply(cfg: TrainConfig, given=(), source: str = "the config") -> None:
    """FastFVAEError (one line) if a setting would do nothing in ``cfg``'s mode, instead of
    silently ignoring it: a fast-path setting other than its default with the reference step,
    and, among ``given`` (the fields the user set explicitly), a fast-path field with the
    reference step or a hyperparameter the run's method does not declare. ``source`` names where
    the fields not in ``given`` came from (a preset, a checkpoint), so the message points at it,
    not at a flag."""
    defaults = TrainConfig()
    if not cfg.fast:
        for name in FAST_ONLY:
            value, default = getattr(cfg, name), getattr(defaults, name)
            flag = "--" + name.replace("_", "-")
            if name in given and not (name == "precision" and value == "fp32"):
                raise FastFVAEError(f"{flag} {value} only applies to the fast path, and this run uses the "
                                    f"reference step; drop {flag} or train with --fast")
            if name not in given and value != default:
                raise FastFVAEError(f"{source} sets {name} {value}, which only applies to the fast path, and this "
                                    f"run uses the reference step; train with --fast or pass {flag} {default}")
    for name in given:
        if name in _FIELD_NAMES or name in cfg.hparams:
            continue
        owners = methods_declaring(name)
        flag = "--" + name.replace("_", "-")
        if owners:
            raise FastFVAEError(f"{flag} only applies to --model {' / '.join(owners)}, and this run trains "
                                f"{cfg.model}; drop {flag} or pass --model {owners[0]}")
        raise FastFVAEError(f"{flag} is not a setting of {cfg.model}")


#: Each preset's settings as written: its run-config fields and its model's hyperparameters
#: (`preset_settings`; the CLI names the latter when a preset meets another ``--model``).
_PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": dict(model="factorvae", gamma=35.0, d_steps=5, steps=300_000, batch_size=64, z_dim=10,
                  perm_batch="second", preset="paper"),
    "dlib": dict(model="factorvae", d_steps=1, steps=300_000, batch_size=64, z_dim=10, fc_dim=256,
                 perm_batch="same", preset="dlib"),
    # The first run: FactorVAE that visibly disentangles position and scale within a few minutes
    # on 2 CPU cores (the README's first command); 5k steps is where its traversals show single
    # latents for x, y and scale (docs/training.md, "Presets").
    "quickstart": dict(model="factorvae", gamma=50.0, d_steps=1, steps=5000, batch_size=64, z_dim=10,
                       perm_batch="same", vae_lr=3e-4, d_lr=1e-3, fast=True, precision="bf16",
                       ckpt_every=1000, preset="quickstart"),
}


def _preset_builder(name: str):
    def build() -> TrainConfig:
        return TrainConfig(**_PRESET_SETTINGS[name])
    build.__name__ = f"_{name}"
    return build


PRESETS = {name: _preset_builder(name) for name in _PRESET_SETTINGS}


def preset_settings(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run-config fields, the hyperparameters) that preset ``name`` sets, as written (not the
    defaults it leaves); the model is among the fields."""
    preset(name)  # an unknown name: FastFVAEError
    settings = _PRESET_SETTINGS[name]
    fields = {k: v for k, v in settings.items() if k in _FIELD_NAMES}
    return fields, {k: v for k, v in settings.items() if k not in _FIELD_NAMES}


def preset_not_applying(name: str, model: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """What preset ``name`` sets that a run of another ``model`` cannot take from it: (its
    hyperparameters, its other fields that differ from the defaults); None when ``model`` is the
    preset's own (or unknown: the config's validation names the known ones). A preset is its
    model's config: another model's hyperparameters would be dropped or, under a shared name
    (FactorVAE's gamma is a TC weight, AnnealedVAE's a KL-capacity weight), change meaning, so
    `fastfvae train` and sweep blocks refuse the pair, naming these."""
    fields, hparams = preset_settings(name)
    if model == fields["model"] or not model_known(model):
        return None
    defaults = TrainConfig()
    rest = {k: v for k, v in fields.items() if k not in ("model", "preset", "fast") and v != getattr(defaults, k)}
    return hparams, rest  # `fast` left out: a new run is fast anyway


def preset(name: str) -> TrainConfig:
    """The named preset's config (FastFVAEError for an unknown name)."""
    if name not in PRESETS:
        raise FastFVAEError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
