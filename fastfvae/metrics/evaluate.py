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
"""

from __future__ import annotations

import os
import time

import numpy as np

from fastfvae.data.grid import FactorGrid
from fastfvae.errors import FastFVAEError
from fastfvae.metrics import beta_vae, dci, factor_vae, gaussian_tc, mig, reconstruction, sap
from fastfvae.metrics.encode import (
    CachedEncoder, check_channels, encode_dataset, eval_mode, model_device, observed_batch,
)
from fastfvae.metrics.sampling import CodeTable

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


def evaluate_model(model_or_ckpt, data, metrics=DEFAULT_METRICS, seed: int = 0, batch_size: int = 1024,
                   device=None, config: dict | None = None, factor_sizes=None,
                   timings: dict | None = None, progress: bool = False) -> dict[str, dict]:
    """Encode every row of ``data`` once (encoder mean, eval mode, no grad), then `evaluate_codes`.

    ``model_or_ckpt``: a model with ``encode(x) -> (mu, logvar)`` or a checkpoint path
    (loaded with ``fastfvae.train.checkpoint.load_models``). ``metrics`` may include
    ``"reconstruction"`` (mean BCE per image of decode(mean code) on random rows).
    ``timings`` receives ``encode`` and each metric's seconds; ``progress`` shows the encoding.
    """
    metrics = check_request(metrics, seed, config, allow_model_metrics=True)
    model = load_model(model_or_ckpt, device)
    check_channels(model, data)
    grid = grid_of_data(data, factor_sizes)
    code_metrics = tuple(m for m in metrics if m in METRICS)
    results = {}
    if code_metrics:
        start = time.perf_counter()
        codes = encode_dataset(model, data, batch_size, device, progress)
        if timings is not None:
            timings["encode"] = time.perf_counter() - start
        code_config = {k: v for k, v in (config or {}).items() if k in METRICS}
        results.update(evaluate_codes(codes, grid.sizes, code_metrics, seed, code_config, timings))
    if "reconstruction" in metrics:
        start = time.perf_counter()
        results["reconstruction"] = reconstruction_of_model(
            model, data, seed, device=device, **settings_of("reconstruction", seed, config))
        if timings is not None:
            timings["reconstruction"] = time.perf_counter() - start
    return {name: results[name] for name in metrics}


def reconstruction_of_model(model, data, seed: int = 0, device=None, num_samples: int = 10000,
                            batch_size: int = 256) -> dict:
    """Mean BCE per image (nats) of ``decode(encoder mean)`` on ``num_samples`` random rows,
    against the observations the model sees (`observed_batch`: for colour / noisy dSprites,
    each row's fixed draw of its noise)."""
    check_channels(model, data)
    device = model_device(model) if device is None else device

    def reconstruct(x):
        with eval_mode(model):
            return model.decode(model.encode(x)[0])

    return reconstruction.reconstruction_error(reconstruct, lambda rows: observed_batch(data, rows, device),
                                               len(data), np.random.RandomState(seed),
                                               num_samples=num_samples, batch_size=batch_size)


def factor_vae_score_of_model(model, data, seed: int = 0, config: dict | None = None,
                              batch_size: int = 1024, device=None) -> dict:
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

