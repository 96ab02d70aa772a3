"""Disentanglement metrics during training: a ``cb(state, metrics)`` callback for ``--eval-every N``.

`periodic_evaluation(every, data, metrics, out_dir, seed, budget)` scores ``state.models.vae``
every ``every`` steps with `fastfvae.metrics.evaluate.evaluate_models` (disentanglement_lib's
metric functions; the rows they draw encoded once, in eval mode, without gradients), appends
one line per evaluation to ``<out_dir>/eval_log.jsonl`` (a `MetricLog`: a resumed run drops
the lines past its checkpoint, and the loop deletes the log of a run started afresh) and
prints one line to stderr. The model's training flag, memory layout and weights are left as
they were, and each metric draws from its own ``RandomState(seed)``, so the training's
randomness is untouched. A pack of K models trained together writes the same lines, one
`evaluate_models` call for all K at each evaluation (`log_record` makes each model's line).

The eval log, one JSON object per line (what a sweep report reads)::

    {"step": 5000,
     "factor_vae": 0.81, "beta_vae": 0.87, "mig": 0.12, "sap": 0.04, "recon": 61.3,
     "details": {"factor_vae": {"train_accuracy": ..., "eval_accuracy": 0.81, "num_active_dims": 10},
                 "beta_vae": {...}, "mig": {"discrete_mig": 0.12}, "sap": {"SAP_score": 0.04},
                 "recon": {"reconstruction_bce": 61.3}},
     "seconds": {"encode": 12.1, "metrics": 3.4, "by_metric": {"factor_vae": 0.9, ...}},
     "budget": "training"}

* ``step``: the training step (VAE updates) the scores are of;
* one top-level number per metric evaluated: its main score (`MAIN_SCORES`: FactorVAE and
  beta-VAE eval accuracy, MIG's ``discrete_mig``, ``SAP_score``, DCI's disentanglement,
  ``recon`` the mean BCE per image in nats, lower is better). The metrics of a line are
  exactly the keys of its ``details``: plot ``line[name] for name in line["details"]``;
* ``details``: every score each metric returns, with disentanglement_lib's keys;
* ``seconds``: ``encode`` the network time (producing the images and running the encoder,
  and the decoder for ``recon``; in a pack, the time for all K models together, the same
  in each of their lines), ``metrics`` this model's scoring, ``by_metric`` per metric;
* ``budget``: the sample budget (`BUDGETS`: ``dlib`` = disentanglement_lib's settings,
  ``training`` = the reduced ones, ``custom`` = a dict or overrides given).

Logs written before these metrics existed (`periodic_factor_vae`) hold
``{"step", "factor_vae": {dlib's dict}, "seconds": float}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
import time

from fastfvae.errors import FastFVAEError
from fastfvae.metrics.evaluate import (  # noqa: F401 (MAIN_SCORES, BUDGETS: importable here too)
    BUDGETS, MAIN_SCORES, TRAINING_METRICS, evaluate_models, factor_vae_score_of_model, grid_of_data, log_settings,
)
from fastfvae.train.progress import EVAL_LOG_NAME, MetricLog  # noqa: F401 (EVAL_LOG_NAME: importable here too)


def log_record(step: int, result: dict) -> dict:
    """The eval-log line of one model's `evaluate_models` result at ``step``."""
    return {"step": int(step), **result}


def summary_line(record: dict) -> str:
    """``step 5000: factor_vae 0.8100 beta_vae 0.8700 ... (encode 12.1s, metrics 3.4s)``."""
    scores = " ".join(f"{name} {record[name]:.4f}" for name in record["details"])
    seconds = record["seconds"]
    return f"step {record['step']}: {scores} (encode {seconds['encode']:.1f}s, metrics {seconds['metrics']:.1f}s)"


def check_every(every: int) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise FastFVAEError(f"--eval-every must be an integer >= 1 step, got {every!r}")
    return every


def periodic_evaluation(every: int, data, metrics=TRAINING_METRICS, out_dir=None, seed: int = 0,
                        budget="dlib", config: dict | None = None, batch_size: int | None = None,
                        precision: str = "fp32", stream=None):
    """A training callback scoring ``metrics`` every ``every`` steps.

    ``data``: a `GroundTruthData` (any registered dataset: what is encoded is what the model
    sees, `fastfvae.metrics.encode`) or a zero-argument function returning one (loaded at the
    first evaluation). ``budget``: a name of `BUDGETS` (default ``dlib``: disentanglement_lib's
    full settings, the numbers of a final evaluation; ``training`` for cheaper curves) or a dict
    of settings per metric; ``config``: settings on top of it. The metric names, the budget,
    the settings and a given dataset (a full factor grid) are checked here, before the run
    starts (one-line FastFVAEError).
    """
    check_every(every)
    log_settings(metrics, seed, budget, config)  # raises on a bad name or setting
    if not callable(data):
        grid_of_data(data)  # a dataset that is no full factor grid: now, not at the first evaluation
    holder = {}
    log = MetricLog(out_dir, EVAL_LOG_NAME) if out_dir is not None else None

    def callback(state, metrics_of_step=None) -> None:
        if state.step % every:
            return
        if "data" not in holder:
            holder["data"] = data() if callable(data) else data
        (result,) = evaluate_models([state.models.vae], holder["data"], metrics, seed=seed, budget=budget,
                                    config=config, batch_size=batch_size, precision=precision)
        record = log_record(state.step, result)
        if log is not None:
            log.write(record)  # a full disk: one-line FastFVAEError
        print(summary_line(record), file=stream or sys.stderr)

    return callback


def periodic_pack_evaluation(every: int, data, out_dirs, metrics=TRAINING_METRICS, seed: int = 0,
                             budget="dlib", config: dict | None = None, batch_size: int | None = None,
                             precision: str = "fp32", stream=None):
    """`periodic_evaluation` for a pack: ``evaluate(step, models)`` scores the K models (the
    pack's VAEs, in the order of ``out_dirs``) in one `evaluate_models` call every ``every``
    steps and appends each model's line to ``<out_dirs[k]>/eval_log.jsonl``. Returns the K
    records (None between evaluations). Checked like `periodic_evaluation`, here."""
    check_every(every)
    log_settings(metrics, seed, budget, config)
    if not callable(data):
        grid_of_data(data)
    logs = [MetricLog(out, EVAL_LOG_NAME) for out in out_dirs]
    holder = {}

    def evaluate(step: int, models) -> list[dict] | None:
        if step % every:
            return None
        models = list(models)
        if len(models) != len(logs):
            raise FastFVAEError(f"{len(models)} models for the {len(logs)} run folders of this pack")
        if "data" not in holder:
            holder["data"] = data() if callable(data) else data
        results = evaluate_models(models, holder["data"], metrics, seed=seed, budget=budget, config=config,
                                  batch_size=batch_size, precision=precision)
        records = [log_record(step, result) for result in results]
        for log, record in zip(logs, records):
            log.write(record)
        for out, record in zip(out_dirs, records):
            print(f"{Path(out).name}: {summary_line(record)}", file=stream or sys.stderr)
        return records

    return evaluate


def periodic_factor_vae(every: int, data, out_dir=None, seed: int = 0, config: dict | None = None,
                        batch_size: int | None = None, stream=None):
    """The first form of the callback, kept for callers of it: the FactorVAE metric alone
    (`factor_vae_score_of_model`), logged as ``{"step", "factor_vae": {dlib's dict}, "seconds"}``.
    `periodic_evaluation` writes the current schema."""
    check_every(every)
    holder = {}
    log = MetricLog(out_dir, EVAL_LOG_NAME) if out_dir is not None else None

    def callback(state, metrics=None) -> None:
        if state.step % every:
            return
        if "data" not in holder:
            holder["data"] = data() if callable(data) else data
        start = time.perf_counter()
        scores = factor_vae_score_of_model(state.models.vae, holder["data"], seed=seed, config=config,
                                           batch_size=batch_size)
        record = {"step": int(state.step), "factor_vae": scores, "seconds": time.perf_counter() - start}
        if log is not None:
            log.write(record)
        print(f"step {state.step}: FactorVAE metric eval_accuracy {scores['eval_accuracy']:.4f} "
              f"(train {scores['train_accuracy']:.4f}, {record['seconds']:.1f}s)", file=stream or sys.stderr)

    return callback
