"""The FactorVAE disentanglement metric (Kim & Mnih 2018, Section 4), identical to disentanglement_lib 1.5.

Fix one factor, sample a batch of 64 with that factor shared, normalise each code dim's
variance over the batch by its global variance, and let the dim of least normalised variance
vote for the fixed factor; a majority-vote classifier maps dims to factors, and the score is
its accuracy. Mirrors dlib's ``factor_vae.compute_factor_vae`` draw for draw
(docs/metrics-parity.md §4.1), quirks included:

* dims whose global std is below ``prune_threshold`` (0.05 in dlib's study) take no part;
  the argmin indexes the *active* dims, so votes land in the first ``#active`` columns;
* ``num_active_dims`` reports the length of the active mask (= D), or 0 when none is active.

Speed without changing bits: all RNG draws happen first, in dlib's order; then the codes of
every sampled batch are gathered at once into [n, 64, D] and ``np.var(axis=1, ddof=1)``
computes all batch variances in one call. For a C-contiguous float32 array numpy reduces
the batch axis in the same sequential order as dlib's ``np.var(axis=0)`` on each [64, D]
batch (checked bit for bit in tests/test_metrics_factor_vae.py).
"""

from __future__ import annotations

import numpy as np

from fastfvae.metrics.sampling import num_factors_of

DEFAULTS = dict(batch_size=64, num_train=10000, num_eval=5000, num_variance_estimate=10000,
                prune_threshold=0.05)


def compute_factor_vae(ground_truth, representation_function, random_state,
                       batch_size: int = 64, num_train: int = 10000, num_eval: int = 5000,
                       num_variance_estimate: int = 10000, prune_threshold: float = 0.05) -> dict:
    """dlib's ``compute_factor_vae``: {train_accuracy, eval_accuracy, num_active_dims}."""
    factors = ground_truth.sample_factors(num_variance_estimate, random_state)
    codes = np.asarray(representation_function(ground_truth.rows_from_factors(factors)))
    global_variances = np.var(codes, axis=0, ddof=1)
    active_dims = np.sqrt(global_variances) >= prune_threshold
    if not active_dims.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}

    num_dims = global_variances.shape[0]
    train_votes = _votes(ground_truth, representation_function, random_state, batch_size,
                         num_train, global_variances, active_dims, num_dims)
    eval_votes = _votes(ground_truth, representation_function, random_state, batch_size,
                        num_eval, global_variances, active_dims, num_dims)
    classifier = np.argmax(train_votes, axis=0)
    columns = np.arange(train_votes.shape[1])
    train_accuracy = np.sum(train_votes[classifier, columns]) * 1. / np.sum(train_votes)
    eval_accuracy = np.sum(eval_votes[classifier, columns]) * 1. / np.sum(eval_votes)
    return {"train_accuracy": float(train_accuracy), "eval_accuracy": float(eval_accuracy),
            "num_active_dims": int(len(active_dims))}


def sample_fixed_factor_batches(ground_truth, random_state, batch_size: int,
                                num_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """dlib's per-vote draws: (fixed factor k [n], rows [n, batch_size]).

    Per batch: ``k = randint(K)``, ``sample_factors(batch_size)`` (all K columns drawn), then
    column k is overwritten with row 0's value.
    """
    num_factors = num_factors_of(ground_truth)
    fixed = np.empty(num_batches, dtype=np.int64)
    factors = np.empty((num_batches, batch_size, num_factors), dtype=np.int64)
    for b in range(num_batches):
        k = random_state.randint(num_factors)
        batch = ground_truth.sample_factors(batch_size, random_state)
        batch[:, k] = batch[0, k]
        fixed[b] = k
        factors[b] = batch
    rows = ground_truth.rows_from_factors(factors.reshape(-1, num_factors))
    return fixed, rows.reshape(num_batches, batch_size)


def _votes(ground_truth, representation_function, random_state, batch_size, num_points,
           global_variances, active_dims, num_dims) -> np.ndarray:
    """dlib's ``_generate_training_batch``: the K x D vote matrix of ``num_points`` batches."""
    fixed, rows = sample_fixed_factor_batches(ground_truth, random_state, batch_size, num_points)
    codes = np.asarray(representation_function(rows.reshape(-1)))
    codes = np.ascontiguousarray(codes.reshape(num_points, batch_size, -1))
    local_variances = np.var(codes, axis=1, ddof=1)
    ratios = local_variances[:, active_dims] / global_variances[active_dims]
    argmins = np.argmin(ratios, axis=1)
    votes = np.zeros((num_factors_of(ground_truth), num_dims), dtype=np.int64)
    np.add.at(votes, (fixed, argmins), 1)
    return votes
