"""Run several metrics on a code table or a model, each with a fresh ``RandomState(seed)``.

``evaluate_codes(codes, factor_sizes, metrics, seed, config)`` is the fast path: a
ground-truth dataset holds one image per factor combination and the representation (the
encoder mean, eval mode) is deterministic, so the codes of every row, looked up by row,
give exactly the scores disentanglement_lib gets by encoding each sampled batch.
``evaluate_model`` encodes the whole dataset once (`fastfvae.metrics.encode`: what the
model sees, any registered dataset) and calls it. For a dataset with observation noise
(colour / noisy dSprites) each row is encoded with one fixed draw of its noise, where dlib
draws it anew per sampled observation (see `fastfvae.metrics.encode`). As in dlib's
``evaluate.py``, each metric gets its own ``np.random.RandomState(seed)``; parity DCI also
seeds its boosting trees with ``seed``.

``evaluate_models(models, data, metrics, seed, budget)`` scores K models at once, for
evaluations during training (`fastfvae.metrics.periodic`) and for packs of K models trained
together: the rows the metrics will draw are worked out first (`planned_rows`), each batch of
their images is produced once and given to every model (`encode_rows_many`), and each model's
metrics then look its codes up. It returns one eval-log record per model (the schema is in
`fastfvae.metrics.periodic`). A model's scores do not depend on the other models it is
evaluated with: K models together give exactly the scores of K calls with one model each.
"""

from __future__ import annotations

import os
import time

import numpy as np

from fastfvae.data.grid import FactorGrid
from fastfvae.errors import FastFVAEError
from fastfvae.metrics import beta_vae, dci, factor_vae, gaussian_tc, mig, reconstruction, sap
from fastfvae.metrics.encode import (
    CachedEncoder, autocast, check_channels, check_models, check_precision, default_batch_size, encode_dataset,
    encode_rows_many, inference_models, keep_host_memory, observed_batch,
)
from fastfvae.metrics.sampling import CodeTable, check_codes, sample_rows

#: name -> (function, default settings = dlib's unsupervised_study_v1 metric configs)
METRICS = {
    "factor_vae": (factor_vae.compute_factor_vae, factor_vae.DEFAULTS),
    "beta_vae": (beta_vae.compute_beta_vae, beta_vae.DEFAULTS),
    "mig": (mig.compute_mig, mig.DEFAULTS),
    "sap": (sap.compute_sap, sap.DEFAULTS),
    "dci": (dci.compute_dci, dci.DEFAULTS),
    "dci_fast": (dci.compute_dci_fast, dci.DEFAULTS),
    "gaussian_tc": (gaussian_tc.compute_unsupervised, gaussian_tc.DEFAULTS),
}
#: metrics that need the model itself, not just its codes (evaluate_model only)
MODEL_METRICS = {"reconstruction": reconstruction.DEFAULTS}
DEFAULT_METRICS = ("factor_vae", "beta_vae", "mig", "sap", "dci")
#: dlib's default evaluation without DCI (minutes at dlib's sizes): the quick, common set
DLIB_QUICK_METRICS = ("factor_vae", "beta_vae", "mig", "sap")


def check_metric_names(metrics, allow_model_metrics: bool = False) -> tuple[str, ...]:
    """The names as a tuple; raises on an unknown (or, for codes, a model-only) name."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    known = list(METRICS) + (list(MODEL_METRICS) if allow_model_metrics else [])
    for name in metrics:
        if name in MODEL_METRICS and not allow_model_metrics:
            raise FastFVAEError(f"metric {name!r} needs a model, not a code table; use evaluate_model")
        if name not in known:
            raise FastFVAEError(f"unknown metric {name!r}; expected one of {', '.join(known)}")
    if not metrics:
        raise FastFVAEError("no metrics asked for; expected at least one of " + ", ".join(known))
    return metrics


def settings_of(name: str, seed: int, config: dict | None) -> dict:
    """Default settings of metric ``name`` with the overrides of ``config[name]``."""
    defaults = METRICS[name][1] if name in METRICS else MODEL_METRICS[name]
    settings = dict(defaults)
    if "gbt_seed" in settings:
        settings["gbt_seed"] = seed
    overrides = (config or {}).get(name, {}) or {}
    if not isinstance(overrides, dict):
        raise FastFVAEError(f"config[{name!r}] must be a dict of settings, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise FastFVAEError(f"unknown setting(s) {unknown} for metric {name!r}; expected some of {sorted(settings)}")
    settings.update(overrides)
    return settings


def check_request(metrics, seed: int, config: dict | None, allow_model_metrics: bool = False) -> tuple[str, ...]:
    """Validate metric names, config and settings before any work; returns the names."""
    metrics = check_metric_names(metrics, allow_model_metrics)
    if config is not None:
        if not isinstance(config, dict):
            raise FastFVAEError(f"config must be a dict of metric name -> settings, got {type(config).__name__}")
        if config:  # an empty config overrides nothing
            check_metric_names(tuple(config), allow_model_metrics=True)
    for name in metrics:
        settings_of(name, seed, config)
    return metrics


def run_metrics(ground_truth, representation_function, metrics=DEFAULT_METRICS, seed: int = 0,
                config: dict | None = None, timings: dict | None = None) -> dict[str, dict]:
    """Each metric on (ground truth, representation), a fresh ``RandomState(seed)`` apiece."""
    metrics = check_request(metrics, seed, config)
    all_settings = {name: settings_of(name, seed, config) for name in metrics}
    results = {}
    for name in metrics:
        function = METRICS[name][0]
        start = time.perf_counter()
        results[name] = function(ground_truth, representation_function,
                                 np.random.RandomState(seed), **all_settings[name])
        if timings is not None:
            timings[name] = time.perf_counter() - start
    return results


def evaluate_codes(codes, factor_sizes, metrics=DEFAULT_METRICS, seed: int = 0,
                   config: dict | None = None, timings: dict | None = None) -> dict[str, dict]:
    """Scores of a code table: ``codes[r]`` is the code of factor combination ``r``.

    ``codes``: float [prod(factor_sizes), D], rows row-major over the factors (last
    fastest, the dSprites order). Returns ``{metric: {dlib key: value}}``. ``config``
    overrides settings per metric with dlib's parameter names, e.g.
    ``{"dci": {"num_train": 2000, "num_test": 1000}}``. ``timings``, if given, receives the
    seconds each metric took.
    """
    grid = FactorGrid(tuple(int(s) for s in np.asarray(factor_sizes).reshape(-1)))
    metrics = check_request(metrics, seed, config)
    table = CodeTable(codes, grid.num_rows)
    return run_metrics(grid, table, metrics, seed, config, timings)


def grid_of_data(data, factor_sizes=None) -> FactorGrid:
    """The factor grid whose row-major rows are the rows of ``data``.

    A full dataset (every factor combination of its ``latent_grid``: the full dSprites, its
    variants, 3dshapes) uses its own grid; a smaller set must hold a full grid, in row-major
    order, over the factors that vary in its ``latents_classes`` (or give ``factor_sizes``).
    """
    if factor_sizes is not None:
        grid = FactorGrid(tuple(factor_sizes))
    elif getattr(data, "is_full", False):
        return data.latent_grid
    elif not hasattr(data, "latents_classes"):
        name = getattr(data, "name", type(data).__name__)
        raise FastFVAEError(f"this {name} set holds {len(data)} of its {data.latent_grid.num_rows} factor "
                            "combinations and no factor table; expected the full dataset (or factor_sizes)")
    else:
        classes = np.asarray(data.latents_classes)
        varying = classes.max(axis=0) > 0
        grid = FactorGrid(tuple(int(s) for s in classes[:, varying].max(axis=0) + 1))
        if grid.num_rows != len(data) or not np.array_equal(classes[:, varying], grid.all_factors()):
            raise FastFVAEError(
                f"the {len(data)} rows of this dataset are not a full row-major factor grid; "
                "expected every factor combination once, last factor fastest"
            )
    if grid.num_rows != len(data):
        raise FastFVAEError(f"factor sizes {list(grid.sizes)} give {grid.num_rows} rows, the data has {len(data)}")
    return grid


def load_model(model_or_ckpt, device=None):
    """A model with ``encode``: returned as is, or the VAE of a fastfvae checkpoint path."""
    if isinstance(model_or_ckpt, (str, os.PathLike)):
        try:
            from fastfvae.train.checkpoint import load_models
        except ImportError as exc:  # pragma: no cover - the train part ships it
            raise FastFVAEError(f"cannot load checkpoints here ({exc}); pass a model instead") from None
        vae, _, _ = load_models(model_or_ckpt, map_location=device or "cpu")
        return vae
    if not hasattr(model_or_ckpt, "encode"):
        raise FastFVAEError(f"{type(model_or_ckpt).__name__} is neither a checkpoint path nor a model with encode()")
    if device is not None:
        model_or_ckpt = model_or_ckpt.to(device)
    return model_or_ckpt


def evaluate_model(model_or_ckpt, data, metrics=DEFAULT_METRICS, seed: int = 0, batch_size: int | None = None,
                   device=None, config: dict | None = None, factor_sizes=None,
                   timings: dict | None = None, progress: bool = False, channels_last: bool = False,
                   precision: str = "fp32") -> dict[str, dict]:
    """Encode every row of ``data`` once (encoder mean, eval mode, no grad), then `evaluate_codes`.

    ``model_or_ckpt``: a model with ``encode(x) -> (mu, logvar)`` or a checkpoint path
    (loaded with ``fastfvae.train.checkpoint.load_models``). ``metrics`` may include
    ``"reconstruction"`` (mean BCE per image of decode(mean code) on random rows).
    ``timings`` receives ``encode`` and each metric's seconds; ``progress`` shows the encoding.
    ``batch_size``, ``channels_last``, ``precision``: `fastfvae.metrics.encode.encode_rows_many`.
    """
    check_precision(precision)
    metrics = check_request(metrics, seed, config, allow_model_metrics=True)
    model = load_model(model_or_ckpt, device)
    check_channels(model, data)
    grid = grid_of_data(data, factor_sizes)
    code_metrics = tuple(m for m in metrics if m in METRICS)
    results = {}
    if code_metrics:
        start = time.perf_counter()
        codes = encode_dataset(model, data, batch_size, device, progress, channels_last, precision)
        if timings is not None:
            timings["encode"] = time.perf_counter() - start
        code_config = {k: v for k, v in (config or {}).items() if k in METRICS}
        results.update(evaluate_codes(codes, grid.sizes, code_metrics, seed, code_config, timings))
    if "reconstruction" in metrics:
        start = time.perf_counter()
        results["reconstruction"] = reconstruction_of_model(
            model, data, seed, device=device, channels_last=channels_last, precision=precision,
            **settings_of("reconstruction", seed, config))
        if timings is not None:
            timings["reconstruction"] = time.perf_counter() - start
    return {name: results[name] for name in metrics}


def reconstruction_of_model(model, data, seed: int = 0, device=None, num_samples: int = 10000,
                            batch_size: int = 256, channels_last: bool = False,
                            precision: str = "fp32") -> dict:
    """Mean BCE per image (nats) of ``decode(encoder mean)`` on ``num_samples`` random rows,
    against the observations the model sees (`observed_batch`: for colour / noisy dSprites,
    each row's fixed draw of its noise). `reconstruction_of_models` of one model."""
    if device is not None:
        model = model.to(device)
    return reconstruction_of_models([model], data, seed, num_samples, batch_size, channels_last, precision)[0]


def reconstruction_of_models(models, data, seed: int = 0, num_samples: int = 10000, batch_size: int = 256,
                             channels_last: bool = False, precision: str = "fp32") -> list[dict]:
    """`reconstruction.reconstruction_error` of each model, each batch of images produced once
    for all of them: the same rows (one ``randint(len(data), size=num_samples)`` from
    ``RandomState(seed)``), batches and float64 sums as `reconstruction_error`, per model.
    The networks see each batch in slices of `default_batch_size` images (the encoder's
    batch, for the same reason)."""
    import torch

    check_precision(precision)
    models = list(models)
    device = check_models(models, data)
    keep_host_memory(device)
    network_batch = default_batch_size(device)
    rows = np.random.RandomState(seed).randint(len(data), size=num_samples)
    totals = [0.0] * len(models)
    with inference_models(models, channels_last) as prepared, autocast(device, precision):
        for start in range(0, num_samples, batch_size):
            x = observed_batch(data, rows[start:start + batch_size], device)
            targets = x.float().cpu().numpy()
            for k, model in enumerate(prepared):
                logits = torch.cat([model.decode(model.encode(x[i:i + network_batch])[0]).float()
                                    for i in range(0, x.shape[0], network_batch)])
                totals[k] += float(reconstruction.bce_with_logits_sum(logits.cpu().numpy(), targets).sum())
    return [{"reconstruction_bce": total / max(num_samples, 1)} for total in totals]


def factor_vae_score_of_model(model, data, seed: int = 0, config: dict | None = None,
                              batch_size: int | None = None, device=None) -> dict:
    """The FactorVAE metric of a model during training (for ``--eval-every``).

    ``config``: FactorVAE settings (dlib names, e.g. ``{"num_train": 1000, "num_eval": 500}``).
    Encodes only the rows the metric draws, each once (with dlib's sizes that is nearly
    the whole dataset); restores the model's training flag. Same scores as
    ``evaluate_model(model, data, ("factor_vae",))`` up to encoder batch-size effects.
    """
    settings = settings_of("factor_vae", seed, {"factor_vae": config or {}})
    grid = grid_of_data(data)
    encoder = CachedEncoder(model, data, batch_size, device)
    return factor_vae.compute_factor_vae(grid, encoder, np.random.RandomState(seed), **settings)



# --- K models at once: evaluate_models ------------------------------------------------------------

#: The metrics `evaluate_models` (and an evaluation during training) can score, each with the
#: key of its main score: the number an eval-log line holds under the metric's name.
#: ``recon`` is `reconstruction_of_models` (the ``reconstruction`` metric of `evaluate_model`).
MAIN_SCORES = {
    "factor_vae": "eval_accuracy",
    "beta_vae": "eval_accuracy",
    "mig": "discrete_mig",
    "sap": "SAP_score",
    "dci": "disentanglement",
    "dci_fast": "disentanglement",
    "gaussian_tc": "gaussian_total_correlation",
    "recon": "reconstruction_bce",
}
#: What an evaluation during training scores unless told otherwise.
TRAINING_METRICS = ("factor_vae", "beta_vae", "mig", "sap", "recon")

#: Sample budgets: settings per metric on top of dlib's defaults (dlib's parameter names).
#:
#: * ``dlib``: disentanglement_lib's ``unsupervised_study_v1`` settings, unchanged: the scores a
#:   paper reports and ``fastfvae eval`` computes; use it for final evaluations. FactorVAE and
#:   beta-VAE then draw about 2.9 M rows, so the whole dataset is encoded.
#: * ``training``: a curve through training. The vote and pair counts of FactorVAE and beta-VAE,
#:   whose draws are 64 images per point, go down (FactorVAE 1,000 / 500 votes: the standard
#:   error of its eval accuracy is at most 0.5 / sqrt(500) = 0.022; beta-VAE 500 / 250 points,
#:   at most 0.032), and DCI's (its boosting time grows with the points) and the reconstruction's;
#:   FactorVAE's 10,000 points for the global variances (they decide which dims are pruned),
#:   MIG's 10,000 (its histogram mutual information is biased at small n) and SAP's
#:   10,000 / 5,000 (1,500 batches of 16 rows: cheap) stay as dlib has them. About 227,000 rows
#:   drawn for the default metrics instead of 2.9 M: about a quarter of dSprites is encoded.
BUDGETS = {
    "dlib": {},
    "training": {
        "factor_vae": {"num_train": 1000, "num_eval": 500},
        "beta_vae": {"num_train": 500, "num_eval": 250},
        "dci": {"num_train": 1000, "num_test": 500},
        "dci_fast": {"num_train": 1000, "num_test": 500},
        "recon": {"num_samples": 1000},
    },
}


def _internal_name(name: str) -> str:
    return "reconstruction" if name == "recon" else name


def check_log_metric_names(metrics) -> tuple[str, ...]:
    """The names as a tuple (duplicates dropped); one-line FastFVAEError listing the valid
    names for an unknown one or none."""
    if isinstance(metrics, str):
        metrics = tuple(name for name in metrics.split(",") if name)
    metrics = tuple(dict.fromkeys(metrics))
    for name in metrics:
        if name not in MAIN_SCORES:
            hint = " (evaluations during training call it recon)" if name == "reconstruction" else ""
            raise FastFVAEError(f"unknown metric {name!r}{hint}; expected some of {', '.join(MAIN_SCORES)}")
    if not metrics:
        raise FastFVAEError("no metrics asked for; expected some of " + ", ".join(MAIN_SCORES))
    return metrics


def log_settings(metrics, seed: int = 0, budget="dlib", config: dict | None = None) -> dict[str, dict]:
    """{metric: its settings}: dlib's defaults, then the ``budget`` (a name of `BUDGETS` or a
    dict like them), then ``config`` (the same form); everything checked, before any work."""
    metrics = check_log_metric_names(metrics)
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise FastFVAEError(f"unknown sample budget {budget!r}; expected one of {', '.join(BUDGETS)} "
                                "or a dict of metric -> settings")
        budget = BUDGETS[budget]
    layers = []
    for what, layer in (("budget", budget), ("config", config)):
        if layer is None:
            continue
        if not isinstance(layer, dict):
            raise FastFVAEError(f"{what} must be a dict of metric name -> settings, got {type(layer).__name__}")
        for name in layer:
            if name not in MAIN_SCORES:
                raise FastFVAEError(f"{what} names unknown metric {name!r}; expected some of {', '.join(MAIN_SCORES)}")
        layers.append(layer)
    settings = {}
    for name in metrics:
        merged = {}
        for layer in layers:
            given = layer.get(name) or {}
            if not isinstance(given, dict):
                raise FastFVAEError(f"the settings of {name!r} must be a dict, got {type(given).__name__}")
            merged.update(given)
        settings[name] = settings_of(_internal_name(name), seed, {_internal_name(name): merged})
    return settings


def _draws(name: str, s: dict) -> int:
    """How many rows metric ``name`` samples with settings ``s`` (repeats included)."""
    if name == "factor_vae":
        return s["num_variance_estimate"] + (s["num_train"] + s["num_eval"]) * s["batch_size"]
    if name == "beta_vae":
        return 2 * (s["num_train"] + s["num_eval"]) * s["batch_size"]
    if name in ("mig", "gaussian_tc"):
        return s["num_train"]
    return s["num_train"] + s["num_test"]  # sap, dci, dci_fast


def _sampled_rows(grid, name: str, s: dict, seed: int) -> list[np.ndarray]:
    """The rows metric ``name`` draws from ``RandomState(seed)``, replaying its sampling (the
    metric modules' own samplers, in the metric's order) without any codes."""
    rs = np.random.RandomState(seed)
    if name == "factor_vae":
        out = [grid.rows_from_factors(grid.sample_factors(s["num_variance_estimate"], rs))]
        for n in (s["num_train"], s["num_eval"]):
            out.append(factor_vae.sample_fixed_factor_batches(grid, rs, s["batch_size"], n)[1].reshape(-1))
        return out
    if name == "beta_vae":
        out = []
        for n in (s["num_train"], s["num_eval"]):
            _, rows1, rows2 = beta_vae.sample_pair_batches(grid, rs, s["batch_size"], n)
            out += [rows1.reshape(-1), rows2.reshape(-1)]
        return out
    if name in ("mig", "gaussian_tc"):
        return [sample_rows(grid, s["num_train"], rs, s["batch_size"])[1]]
    return [sample_rows(grid, n, rs, s["batch_size"])[1] for n in (s["num_train"], s["num_test"])]


def planned_rows(grid, settings: dict[str, dict], seed: int = 0) -> np.ndarray:
    """Sorted int64 rows to encode for the code metrics of ``settings``.

    When the metrics draw at least as many rows as the dataset holds (dlib's budget: about
    2.9 M draws from dSprites' 737,280 rows, which leave under 2% of them undrawn), every row;
    otherwise the union of the rows they draw (`_sampled_rows`). A row a metric asks for
    outside the plan is still encoded, by `PlannedCodes`, so the plan decides speed only.
    """
    code_metrics = [m for m in settings if m != "recon"]
    if not code_metrics:
        return np.zeros(0, dtype=np.int64)
    if sum(_draws(m, settings[m]) for m in code_metrics) >= grid.num_rows:
        return np.arange(grid.num_rows, dtype=np.int64)
    return np.unique(np.concatenate([rows for m in code_metrics for rows in _sampled_rows(grid, m, settings[m], seed)]))


class PlannedCodes:
    """A representation function over the codes of planned rows (``position[row]`` is a row's
    index in ``codes``, -1 when not planned); rows outside the plan are encoded on first
    request by ``encode_missing(rows) -> codes`` and kept (``unplanned`` counts them)."""

    def __init__(self, codes: np.ndarray, position: np.ndarray, encode_missing):
        self.codes, self.position, self.encode_missing = codes, position, encode_missing
        self.unplanned = 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        where = self.position[rows]
        if (where < 0).any():
            missing = np.unique(rows[where < 0])
            extra = check_codes(self.encode_missing(missing))
            self.position = self.position.copy()  # shared by the models: this model's own from now on
            self.position[missing] = np.arange(len(missing)) + self.codes.shape[0]
            self.codes = np.concatenate([self.codes, extra])
            self.unplanned += len(missing)
            where = self.position[rows]
        return self.codes[where]


def evaluate_models(models, data, metrics=TRAINING_METRICS, seed: int = 0, budget="dlib",
                    config: dict | None = None, batch_size: int | None = None,
                    channels_last: bool = False, precision: str = "fp32",
                    progress: bool = False) -> list[dict]:
    """Score K models (plain VAEs on one device) on ``data``: one eval-log record each.

    ``metrics``: names of `MAIN_SCORES`; ``budget``: a name of `BUDGETS` or a dict like them,
    ``config``: settings on top of it (dlib's names, e.g. ``{"factor_vae": {"num_eval": 1000}}``).
    Everything is checked before any encoding. The planned rows (`planned_rows`) are encoded
    in batches, each produced once and given to all K models, in eval mode without gradients
    (`encode_rows_many`: ``batch_size``, ``channels_last``, ``precision``); ``recon`` runs
    its own rows through all K models the same way. Each metric gets its own
    ``RandomState(seed)``, as in dlib, and the metric functions are dlib's (`METRICS`).

    Returns, per model, ``{metric: main score (float), ..., "details": {metric: every
    score}, "seconds": {"encode": s, "metrics": s, "by_metric": {metric: s}}, "budget": name}``.
    ``seconds.encode`` is the network time of the call (the shared encoding and the
    reconstruction pass), the same in every record of a call; ``seconds.metrics`` is this
    model's own scoring.
    """
    import time as _time

    check_precision(precision)
    settings = log_settings(metrics, seed, budget, config)
    models = list(models)
    check_models(models, data)
    grid = grid_of_data(data)
    budget_name = budget if isinstance(budget, str) and not config else "custom"
    code_metrics = [m for m in settings if m != "recon"]

    start = _time.perf_counter()
    rows = planned_rows(grid, settings, seed)
    tables = encode_rows_many(models, data, rows, batch_size, progress=progress, channels_last=channels_last,
                              precision=precision) if code_metrics else [None] * len(models)
    recon = None
    if "recon" in settings:
        recon = reconstruction_of_models(models, data, seed, channels_last=channels_last, precision=precision,
                                         **settings["recon"])
    encode_seconds = _time.perf_counter() - start

    position = np.full(grid.num_rows, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    records = []
    for k, model in enumerate(models):
        details, by_metric = {}, {}
        if code_metrics:
            try:
                codes = check_codes(tables[k])
            except FastFVAEError as exc:
                raise FastFVAEError(f"model {k}: {exc}") from None
            table = PlannedCodes(codes, position, lambda missing, model=model: encode_rows_many(
                [model], data, missing, batch_size, channels_last=channels_last, precision=precision)[0])
        for name in settings:
            t0 = _time.perf_counter()
            if name == "recon":
                details[name] = recon[k]
            else:
                details[name] = METRICS[name][0](grid, table, np.random.RandomState(seed), **settings[name])
            by_metric[name] = _time.perf_counter() - t0
        record = {name: float(details[name][MAIN_SCORES[name]]) for name in settings}
        record.update(details=details, budget=budget_name,
                      seconds={"encode": encode_seconds, "metrics": sum(by_metric.values()), "by_metric": by_metric})
        records.append(record)
    return records
