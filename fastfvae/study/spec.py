"""A sweep spec: TOML ``[[block]]`` tables, each expanding to runs (grid point x seed).

    [[block]]
    model = "factorvae"            # any field of the run config (config.json's names) ...
    dataset = "dsprites"
    steps = 300000
    d_steps = 5                    # ... and the method's hyperparameters, at the top level
    seeds = [0, 1, 2]              # one run per seed (default: [seed], i.e. [0])
    grid = { gamma = [10.0, 20.0] }  # the cartesian product of these values
    eval = { every = 10000, metrics = ["factor_vae", "mig"], budget = "training" }  # -> eval_every, ...
                                   # eval_metrics, eval_budget (default "dlib")

Optional keys besides: ``name`` (the block's label in run names and messages, default the
model's name), ``preset`` (a `fastfvae.train.config.preset` the block starts from instead of the
defaults) and ``hparams`` (a table of hyperparameters, as config.json holds them). As with
``fastfvae train``, a run uses the fast path unless the block says ``fast = false``.

Everything is checked before anything runs: an unknown key, a value of the wrong type or out
of range, a hyperparameter the block's method does not declare, a setting that would do
nothing (`check_settings_apply`), two runs that would train the same thing: each is a one-line
`FastFVAEError` naming the spec, the block and the key.

Each run gets a readable folder name, ``<label>-<grid key><value>...-seed<seed>``
(``factorvae-gamma10-seed0``); runs of different blocks that would share a name get the
settings in which they differ added (``dipvae-dip_type_ii-lambda_d_factor1-lambda_od1-seed0``), and a
name still shared after that a numeric suffix, so names depend only on the spec.

`PRESETS` are specs written in Python: ``seed-fig3`` (Kim & Mnih 2018, Figure 3) and
``dlib-dsprites`` (disentanglement_lib's ``unsupervised_study_v1`` on dSprites).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfvae.errors import FastFVAEError
from fastfvae.train.config import (
    FAST_ONLY, RESUMABLE_CHANGES, TrainConfig, check_settings_apply, methods_declaring, preset as config_preset,
    preset_not_applying, preset_settings,
)

#: Keys of a block that are not run-config fields.
BLOCK_KEYS = ("name", "seeds", "grid", "eval", "hparams")
#: Run-config fields a block cannot set: the sweep names each run's folder and seeds it from
#: ``seeds``; the model is fixed per block (its hyperparameters depend on it).
NOT_IN_GRID = ("out", "model", "preset", "seed")
#: The metrics a periodic evaluation can score (`TrainConfig.eval_metrics`), where
#: `fastfvae.metrics.evaluate` does not list them (`MAIN_SCORES`: one main score per metric).
EVAL_METRICS = ("factor_vae", "beta_vae", "mig", "sap", "dci", "recon")


def eval_metric_names() -> tuple[str, ...]:
    """The names ``eval.metrics`` may hold: those the periodic evaluation scores."""
    from fastfvae.metrics import evaluate

    return tuple(getattr(evaluate, "MAIN_SCORES", None) or EVAL_METRICS)
#: Fields whose default is None: the kind of value they take when set.
_OPTIONAL_KINDS = {"data": "str", "preset": "str", "cuda_graph": "bool", "by_hand": "bool", "fused_ops": "bool"}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in ("hparams", "debug_nan_at_step")}
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Block:
    """One ``[[block]]``, checked: its settings (fields and hyperparameters, typed), seeds and grid."""
    index: int                      # 1-based, in the spec's order
    label: str                      # ``name`` or the model
    model: str
    preset: str | None
    settings: dict                  # field / hyperparameter -> value, every run of the block
    seeds: tuple[int, ...]
    grid: tuple[tuple[str, tuple], ...]  # (key, values) in the spec's order

    def where(self, source: str) -> str:
        return f"{source}, block {self.index} ({self.label})"


@dataclass(frozen=True)
class Spec:
    source: str                     # the spec file, or "--preset NAME"
    blocks: tuple[Block, ...]
    raw: tuple[dict, ...]           # the blocks as written (recorded in sweep.json)


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its folder name, where it comes from, its config (``out`` set)."""
    name: str
    block: int
    label: str
    point: tuple[tuple[str, Any], ...]  # the grid values of this run
    config: TrainConfig

    @property
    def seed(self) -> int:
        return self.config.seed


# --- reading ----------------------------------------------------------------------------------
def load_spec(path: str | Path) -> Spec:
    """Read and check the TOML spec at ``path`` (FastFVAEError, one line, for any problem)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FastFVAEError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise FastFVAEError(f"spec {path} is not UTF-8 text; expected a TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FastFVAEError(f"spec {path} is not valid TOML: {' '.join(str(exc).split())}") from None
    return parse_spec(data, str(path))


def parse_spec(data: dict, source: str) -> Spec:
    """Check a spec given as parsed TOML: ``{"block": [table, ...]}``."""
    extra = sorted(set(data) - {"block"})
    if extra:
        raise FastFVAEError(f"{source}: unknown top-level key {extra[0]!r}; a spec holds [[block]] tables only")
    blocks = data.get("block")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
        raise FastFVAEError(f"{source}: expected one or more [[block]] tables")
    return Spec(source, tuple(_parse_block(i + 1, b, source) for i, b in enumerate(blocks)), tuple(blocks))


def _kind_of_field(name: str) -> str:
    f = _FIELDS[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if name == "vae_betas":
        return "pair"
    if name == "eval_metrics":
        return "strs"
    if default is None:
        return _OPTIONAL_KINDS.get(name, "any")
    return _kind_of_value(default)


def _kind_of_value(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    if isinstance(default, tuple):
        return "pair" if len(default) == 2 and all(isinstance(v, float) for v in default) else "any"
    return "any"


_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "pair": "a list of two numbers", "strs": "a list of strings"}


def _typed(kind: str, value: Any) -> Any:
    """``value`` as ``kind`` (an int where a float is declared becomes a float, so that runs of
    ``gamma = 10`` and ``gamma = 20.5`` pack together); raises ValueError if it is not one."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and number(value):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "pair" and isinstance(value, list) and len(value) == 2 and all(map(number, value)):
        return tuple(float(v) for v in value)
    if kind == "strs" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    if kind == "any" and isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(_EXPECTED.get(kind, "a number, string or boolean"))


def _hparam_kinds(model: str) -> dict[str, str]:
    from fastfvae import methods

    defaults = methods.get(model).Hparams()
    return {f.name: _kind_of_value(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)}


def _parse_block(index: int, table: dict, source: str) -> Block:
    where = f"{source}, block {index}"
    name = table.get("name")
    if name is not None and (not isinstance(name, str) or not name or _NAME_CHARS.search(name)):
        raise FastFVAEError(f"{where}: name must be a non-empty string of letters, digits, '.', '_', '+' or '-', "
                            f"got {name!r}")
    base_name = table.get("preset")
    if base_name is not None and not isinstance(base_name, str):
        raise FastFVAEError(f"{where}: preset must be a string, got {base_name!r}")
    try:
        base = config_preset(base_name) if base_name is not None else TrainConfig()
    except FastFVAEError as exc:
        raise FastFVAEError(f"{where}: preset: {exc}") from None
    model = table.get("model", base.model)
    from fastfvae import methods

    if not isinstance(model, str) or model not in methods.names():
        raise FastFVAEError(f"{where}: model must be one of {', '.join(methods.names())}, got {model!r}")
    mismatch = preset_not_applying(base_name, model) if base_name is not None else None
    if mismatch is not None:  # as `fastfvae train --preset X --model Y`
        hparams, rest = mismatch
        shown = ", ".join(f"{k} {v}" for k, v in hparams.items())
        other = (f"drop preset and set its other settings ({', '.join(f'{k} = {v!r}' for k, v in rest.items())})"
                 if rest else "drop preset (its other settings are the defaults)")
        raise FastFVAEError(f"{where}: preset {base_name} is a {base.model} preset and its {base.model} settings "
                            f"({shown}) do not apply to model {model}; use model = \"{base.model}\", or {other}")
    label = name or model
    where = f"{source}, block {index} ({label})"
    hkinds = _hparam_kinds(model)

    def kind(key: str, context: str = "") -> str:
        """The kind of value ``key`` takes in this block; FastFVAEError if it is no setting of it."""
        if key in _FIELDS:
            return _kind_of_field(key)
        if key in hkinds:
            return hkinds[key]
        owners = methods_declaring(key)
        if owners:
            raise FastFVAEError(f"{where}: {context}{key!r} is not a hyperparameter of {model} (it takes: "
                                f"{', '.join(sorted(hkinds)) or 'none'}; {key} belongs to {' / '.join(owners)})")
        known = [*_FIELDS, *hkinds, *BLOCK_KEYS]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FastFVAEError(f"{where}: unknown key {context}{key!r}: expected a run config field, a hyperparameter "
                            f"of {model}, {', '.join(BLOCK_KEYS)}{hint}")

    def typed(key: str, value: Any, context: str = "") -> Any:
        k = kind(key, context)
        try:
            return _typed(k, value)
        except ValueError as exc:
            raise FastFVAEError(f"{where}: {context}{key} must be {exc}, got {value!r}") from None

    settings: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("name", "preset", "model", "seeds", "grid", "eval", "hparams"):
            continue
        if key == "out":
            raise FastFVAEError(f"{where}: out is set by the sweep (<--out>/runs/<run name>); remove it")
        settings[key] = typed(key, value)

    hparams = table.get("hparams", {})
    if not isinstance(hparams, dict):
        raise FastFVAEError(f"{where}: hparams must be a table of {model}'s hyperparameters, got {hparams!r}")
    for key, value in hparams.items():
        if key not in hkinds:
            kind(key, "hparams.")  # raises, naming the owners
            raise FastFVAEError(f"{where}: hparams.{key} is not a hyperparameter of {model}")
        if key in settings:
            raise FastFVAEError(f"{where}: {key} is given twice (at the top level and in hparams)")
        settings[key] = typed(key, value, "hparams.")

    evaluation = table.get("eval")
    if evaluation is not None:
        if not isinstance(evaluation, dict):
            raise FastFVAEError(f"{where}: eval must be a table {{ every = N, metrics = [...] }}, got {evaluation!r}")
        for key in evaluation:
            if key not in ("every", "metrics", "budget"):
                raise FastFVAEError(f"{where}: unknown key eval.{key}: expected every, metrics or budget")
        for key, field_name in (("every", "eval_every"), ("metrics", "eval_metrics"), ("budget", "eval_budget")):
            if key in evaluation:
                if field_name in settings:
                    raise FastFVAEError(f"{where}: {field_name} is given twice (as {field_name} and eval.{key})")
                settings[field_name] = typed(field_name, evaluation[key], "eval.")
    if "eval_metrics" in settings:
        known = eval_metric_names()
        unknown = [m for m in settings["eval_metrics"] if m not in known]
        if unknown:
            raise FastFVAEError(f"{where}: eval.metrics: unknown metric {unknown[0]!r}; expected some of "
                                f"{', '.join(known)}")

    if "seed" in settings and "seeds" in table:
        raise FastFVAEError(f"{where}: seed and seeds are both given; give seeds = [...] only")
    seeds = table.get("seeds", [settings.pop("seed", base.seed)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise FastFVAEError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise FastFVAEError(f"{where}: seeds lists {_first_repeat(seeds)} twice")
    settings.pop("seed", None)

    grid = table.get("grid", {})
    if not isinstance(grid, dict):
        raise FastFVAEError(f"{where}: grid must be a table {{ key = [values] }}, got {grid!r}")
    axes = []
    for key, values in grid.items():
        if key in NOT_IN_GRID:
            raise FastFVAEError(f"{where}: grid.{key}: {key} cannot be swept in a grid "
                                + ("(use seeds)" if key == "seed" else "(one block per value)"))
        if key in settings:
            raise FastFVAEError(f"{where}: {key} is given twice (as a setting and in grid)")
        if not isinstance(values, list) or not values:
            raise FastFVAEError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
        typed_values = tuple(typed(key, v, "grid.") for v in values)
        if len(set(map(repr, typed_values))) != len(typed_values):
            raise FastFVAEError(f"{where}: grid.{key} lists {_first_repeat(list(typed_values))!r} twice")
        axes.append((key, typed_values))
    return Block(index, label, model, base_name, settings, tuple(seeds), tuple(axes))


def _first_repeat(values: list) -> Any:
    seen = set()
    for v in values:
        if repr(v) in seen:
            return v
        seen.add(repr(v))
    return None


# --- expanding --------------------------------------------------------------------------------
def block_base(block: Block) -> TrainConfig:
    """The config every run of ``block`` starts from: its preset (or the defaults), its model and
    settings; the fast path unless the block says ``fast = false`` (then the fast-only settings
    it does not give take their defaults, as ``fastfvae train --reference`` does)."""
    base = config_preset(block.preset) if block.preset is not None else TrainConfig()
    changes = {"model": block.model, **block.settings}
    changes.setdefault("fast", True)
    if changes["fast"] is False:
        for name in FAST_ONLY:
            changes.setdefault(name, getattr(TrainConfig(), name))
    return base.replace(**changes)


def expand(spec: Spec, runs_dir: str | Path, *, steps: int | None = None, device: str | None = None) -> list[SweepRun]:
    """Every run of ``spec``, named, with ``out`` = ``runs_dir/<name>``, each config checked.

    ``steps`` / ``device``: override every run's (a quick try; ``eval_every`` larger than
    ``steps`` becomes ``steps``, so a run that evaluates at its end still does)."""
    runs_dir = Path(runs_dir)
    drafts: list[tuple[Block, tuple, TrainConfig]] = []
    for block in spec.blocks:
        base = block_base(block)
        keys = [k for k, _ in block.grid]
        for values in itertools.product(*(v for _, v in block.grid)):
            point = tuple(zip(keys, values))
            for seed in block.seeds:
                changes: dict[str, Any] = {**dict(point), "seed": seed}
                if steps is not None:
                    changes["steps"] = steps
                if device is not None:
                    changes["device"] = device
                cfg = base.replace(**changes)
                if steps is not None and cfg.eval_every > steps:
                    cfg = cfg.replace(eval_every=steps)
                drafts.append((block, point, cfg))
    _check_no_repeats(drafts, spec.source)
    names = _names(drafts)
    runs = []
    for (block, point, cfg), name in zip(drafts, names):
        cfg = cfg.replace(out=str(runs_dir / name))
        _check_run(block, point, cfg, spec.source)
        runs.append(SweepRun(name, block.index, block.label, point, cfg))
    return runs


def _check_run(block: Block, point: tuple, cfg: TrainConfig, source: str) -> None:
    where = block.where(source)
    if point:
        where += ", grid " + " ".join(f"{k}={format_value(v)}" for k, v in point)
    where += f", seed {cfg.seed}"
    try:
        cfg.validate()
        given = set(block.settings) | {k for k, _ in block.grid}
        check_settings_apply(cfg, given, f"preset {block.preset}" if block.preset else "the defaults")
    except FastFVAEError as exc:
        raise FastFVAEError(f"{where}: {exc}") from None


def identity(config: TrainConfig | dict) -> str:
    """What a run trains: its config without the settings a resumed run may change
    (`RESUMABLE_CHANGES`: steps, device, fast path, evaluation ...) and without its folder. Two
    runs with the same identity are one run; a sweep folder's runs are matched by it."""
    d = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    return json.dumps({k: v for k, v in d.items() if k not in RESUMABLE_CHANGES and k != "out"}, sort_keys=True)


def _check_no_repeats(drafts, source: str) -> None:
    seen: dict[str, tuple[Block, tuple, TrainConfig]] = {}
    for block, point, cfg in drafts:
        key = identity(cfg)
        if key in seen:
            other = seen[key][0]
            what = " ".join([*(f"{k}={format_value(v)}" for k, v in point), f"seed={cfg.seed}"])
            raise FastFVAEError(f"{block.where(source)}: its run {what} trains the same as a run of block "
                                f"{other.index} ({other.label}); remove one (runs differing only in steps, device, "
                                "fast-path or evaluation settings are one run)")
        seen[key] = (block, point, cfg)


# --- naming -----------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A value as it appears in a run name: 10.0 -> "10", 1e-05 -> "1e-05", (0.5, 0.9) -> "0.5_0.9"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (list, tuple)):
        return "_".join(format_value(v) for v in value)
    return str(value)


def name_part(key: str, value: Any) -> str:
    """``gamma10``, ``lambda_od1``; a string or boolean value after an underscore: ``dip_type_ii``."""
    sep = "_" if isinstance(value, (str, bool)) else ""
    return _NAME_CHARS.sub("_", f"{key}{sep}{format_value(value)}")


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    d = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and k not in ("out", "seed", "hparams")}
    d.update(cfg.to_dict()["hparams"])
    return d


def _names(drafts) -> list[str]:
    """Run folder names: label, grid parts, seed; across blocks, the differing settings added."""
    parts = [[block.label, *(name_part(k, v) for k, v in point)] for block, point, _ in drafts]
    seeds = [f"seed{cfg.seed}" for _, _, cfg in drafts]
    names = ["-".join([*p, s]) for p, s in zip(parts, seeds)]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    for members in groups.values():
        if len({drafts[i][0].index for i in members}) < 2:
            continue
        flats = [_flat(drafts[i][2]) for i in members]
        keys = sorted({k for f in flats for k in f if any(g.get(k, object()) != f[k] for g in flats)})
        grid_keys = {k for i in members for k, _ in drafts[i][1]}
        for i, flat in zip(members, flats):
            extra = [name_part(k, flat[k]) for k in keys if k in flat and k not in grid_keys and k != "model"]
            block_label, *grid_parts = parts[i]
            names[i] = "-".join([block_label, *sorted(extra), *grid_parts, seeds[i]])
    return dedupe(names)


def dedupe(names: list[str], taken: set[str] = frozenset()) -> list[str]:
    """``names`` made unique (and not in ``taken``): a repeat gets ``-2``, ``-3`` ... in order."""
    used = set(taken)
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in used:
            n += 1
            candidate = f"{name}-{n}"
        used.add(candidate)
        out.append(candidate)
    return out


# --- presets ----------------------------------------------------------------------------------
_EVAL_FIG3 = {"every": 10_000, "metrics": ["factor_vae", "beta_vae", "mig", "sap", "recon"]}
#: disentanglement_lib scores each model once, after training (its metric configs), here with the
#: metrics fastfvae reproduces.
_EVAL_DLIB = {"every": 300_000, "metrics": ["factor_vae", "beta_vae", "mig", "sap", "dci"]}


def _seed_fig3() -> list[dict]:
    """Kim & Mnih 2018, Figure 3: beta-VAE over beta and FactorVAE over gamma on dSprites, 10
    seeds each, 300k steps, the paper's settings (Section 6: FactorVAE with 5 D updates and
    permuted codes from a second batch); the grids are the paper's and disentanglement_lib's."""
    common = {"dataset": "dsprites", "steps": 300_000, "seeds": list(range(10)), "eval": _EVAL_FIG3}
    return [
        {"model": "betavae", **common, "grid": {"beta": [1.0, 2.0, 4.0, 6.0, 8.0, 16.0]}},
        {"model": "factorvae", "preset": "paper", **common, "grid": {"gamma": [10.0, 20.0, 30.0, 40.0, 50.0, 100.0]}},
    ]


def _dlib_dsprites() -> list[dict]:
    """disentanglement_lib's ``unsupervised_study_v1`` on dSprites (``config/unsupervised_study_v1/
    sweep.py``): 6 models x 6 values x 50 seeds, dlib's shared settings (``shared.gin``, the
    ``dlib`` preset: batch 64, z 10, 300k steps, FC width 256, 1 D update, same-batch permutation)."""
    # The FactorVAE block starts from the `dlib` preset; the other methods take its shared
    # settings (a preset is its model's config) as plain fields.
    fields, _ = preset_settings("dlib")
    shared = {k: v for k, v in fields.items() if k not in ("model", "preset", "steps")}
    common = {"dataset": "dsprites", "steps": 300_000, "seeds": list(range(50)), "eval": _EVAL_DLIB, **shared}
    lambda_od = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
    return [  # dlib's order: beta_vae, factor_vae, dip_vae_i, dip_vae_ii, beta_tc_vae, annealed_vae
        {"model": "betavae", **common, "grid": {"beta": [1.0, 2.0, 4.0, 6.0, 8.0, 16.0]}},
        {"model": "factorvae", "preset": "dlib", **common, "grid": {"gamma": [10.0, 20.0, 30.0, 40.0, 50.0, 100.0]}},
        {"model": "dipvae", "name": "dipvae_i", **common, "dip_type": "i", "lambda_d_factor": 10.0,
         "grid": {"lambda_od": lambda_od}},
        {"model": "dipvae", "name": "dipvae_ii", **common, "dip_type": "ii", "lambda_d_factor": 1.0,
         "grid": {"lambda_od": lambda_od}},
        {"model": "betatcvae", **common, "grid": {"beta": [1.0, 2.0, 4.0, 6.0, 8.0, 10.0]}},
        {"model": "annealedvae", **common, "gamma": 1000.0, "iteration_threshold": 100_000,
         "grid": {"c_max": [5.0, 10.0, 25.0, 50.0, 75.0, 100.0]}},
    ]


PRESETS = {"seed-fig3": _seed_fig3, "dlib-dsprites": _dlib_dsprites}


def preset_spec(name: str) -> Spec:
    """The named sweep preset (FastFVAEError for an unknown name)."""
    if name not in PRESETS:
        raise FastFVAEError(f"unknown sweep preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return parse_spec({"block": PRESETS[name]()}, f"--preset {name}")
