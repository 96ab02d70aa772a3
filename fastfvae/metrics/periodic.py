"""The FactorVAE metric during training: a ``cb(state, metrics)`` callback for ``--eval-every N``.

Every ``every`` steps it scores ``state.models.vae`` with `factor_vae_score_of_model` (dlib's
settings unless ``config`` says otherwise; only the rows the metric draws are encoded),
appends ``{"step", "factor_vae": {...}, "seconds"}`` to ``<out_dir>/eval_log.jsonl`` (a
`MetricLog`: a resumed run drops the lines past its checkpoint) and
prints one line to stderr. The model's training flag is restored, and the metric draws from
its own ``RandomState(seed)``, so training randomness is untouched.
"""

from __future__ import annotations

import sys
import time

from fastfvae.errors import FastFVAEError
from fastfvae.metrics.evaluate import factor_vae_score_of_model
from fastfvae.train.progress import EVAL_LOG_NAME, MetricLog  # noqa: F401 (EVAL_LOG_NAME: importable here too)


def periodic_factor_vae(every: int, data, out_dir=None, seed: int = 0, config: dict | None = None,
                        batch_size: int = 1024, stream=None):
    """A training callback; ``data`` is a `GroundTruthData` (any registered dataset; what is
    encoded is what the model sees, `fastfvae.metrics.encode`) or a zero-argument function
    returning one."""
    if every < 1:
        raise FastFVAEError(f"--eval-every must be >= 1 step, got {every}")
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
            log.write(record)  # a full disk: one-line FastFVAEError
        print(f"step {state.step}: FactorVAE metric eval_accuracy {scores['eval_accuracy']:.4f} "
              f"(train {scores['train_accuracy']:.4f}, {record['seconds']:.1f}s)", file=stream or sys.stderr)

    return callback
