"""What every metric samples with: ground truths, representation functions, code tables.

A *ground truth* is any object with ``sample_factors(n, random_state) -> int [n, K]``,
``rows_from_factors(factors) -> int [n]`` and ``num_factors`` or ``latent_grid`` (a
`fastfvae.data.FactorGrid`, or a `DSprites` through its latent grid). Observations are row
indices: in dSprites (and every parity table) there is exactly one observation per factor
combination, and disentanglement_lib's ``sample_observations_from_factors`` draws nothing
(docs/metrics-parity.md §3), so sampling an observation is computing its row.

A *representation function* maps int64 rows [n] to float codes [n, D]. The metric functions
call it once per sampling phase with every row of that phase (e.g. the 960,000 rows of the
FactorVAE training votes), which gives the same codes as dlib's batch-by-batch calls for any
deterministic representation, and lets a code table answer with one gather.
"""

from __future__ import annotations

import numpy as np

from fastfvae.errors import FastFVAEError


def num_factors_of(ground_truth) -> int:
    """K, the number of ground-truth factors."""
    if hasattr(ground_truth, "num_factors"):
        return int(ground_truth.num_factors)
    return len(ground_truth.latent_grid.sizes)


def check_codes(codes, num_rows: int | None = None) -> np.ndarray:
    """A C-contiguous floating [N, D] code table (float32 unless given float64); raises on bad input."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise FastFVAEError(f"codes must be a 2-D array [rows, code dims], got shape {list(codes.shape)}")
    if codes.dtype != np.float64:
        codes = codes.astype(np.float32, copy=False)
    codes = np.ascontiguousarray(codes)
    if num_rows is not None and codes.shape[0] != num_rows:
        raise FastFVAEError(
            f"codes have {codes.shape[0]} rows but the factor sizes give {num_rows} combinations; "
            "expected one code row per factor combination, row-major over the factors"
        )
    if not np.isfinite(codes).all():
        bad = int((~np.isfinite(codes)).any(axis=1).sum())
        raise FastFVAEError(f"codes contain NaN or infinite values in {bad} rows; expected finite codes")
    return codes


class CodeTable:
    """Representation function of a precomputed code table: ``rows -> codes[rows]``.

    ``num_rows``: the number of rows the table must have (None: any), as in `check_codes`.
    """

    def __init__(self, codes: np.ndarray, num_rows: int | None = None):
        self.codes = check_codes(codes, num_rows)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.codes[np.asarray(rows, dtype=np.int64)]


def sample_rows(ground_truth, num_points: int, random_state: np.random.RandomState,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """dlib's sampling loop: ``sample(min(rest, batch_size))`` chunks -> (factors [n, K], rows [n])."""
    chunks = []
    start = 0
    while start < num_points:
        size = min(num_points - start, batch_size)
        chunks.append(ground_truth.sample_factors(size, random_state))
        start += size
    factors = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, num_factors_of(ground_truth)), np.int64)
    return factors, ground_truth.rows_from_factors(factors)


def generate_batch_factor_code(ground_truth, representation_function, num_points: int,
                               random_state: np.random.RandomState, batch_size: int = 16):
    """dlib's ``utils.generate_batch_factor_code``: (codes [D, n], factors [K, n]), transposed views."""
    factors, rows = sample_rows(ground_truth, num_points, random_state, batch_size)
    codes = np.asarray(representation_function(rows))
    return codes.T, factors.T


def discretize_histogram(target: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """dlib's ``_histogram_discretize`` on [D, n]: bin ids 1..num_bins, in the codes' dtype."""
    discretized = np.zeros_like(target)
    for i in range(target.shape[0]):
        edges = np.histogram(target[i, :], num_bins)[1][:-1]
        discretized[i, :] = np.digitize(target[i, :], edges)
    return discretized


def discrete_mutual_info(mus: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """dlib's ``discrete_mutual_info``: [D, K] float64 of ``mutual_info_score(ys[j], mus[i])``."""
    from sklearn.metrics import mutual_info_score

    m = np.zeros([mus.shape[0], ys.shape[0]])
    for i in range(mus.shape[0]):
        for j in range(ys.shape[0]):
            m[i, j] = mutual_info_score(ys[j, :], mus[i, :])
    return m


def discrete_entropy(ys: np.ndarray) -> np.ndarray:
    """dlib's ``discrete_entropy``: empirical entropy (nats) of each row of [K, n]."""
    from sklearn.metrics import mutual_info_score

    return np.array([mutual_info_score(ys[j, :], ys[j, :]) for j in range(ys.shape[0])], dtype=np.float64)
