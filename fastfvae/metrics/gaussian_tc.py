"""Unsupervised scores of the codes alone, as disentanglement_lib 1.5's ``unsupervised_metrics``.

``num_train`` points in chunks of 16; on the covariance of the (mean) codes:
``gaussian_total_correlation`` = 0.5 (sum log diag(cov) - log det cov), the total
correlation of a Gaussian with that covariance (0 iff the dims are uncorrelated);
``gaussian_wasserstein_correlation`` (and ``_norm``, divided by the trace); and
``mutual_info_score``, the mean pairwise discrete mutual information of the 20-bin
histogram-discretised dims. No ground-truth labels are used (only to sample rows).
"""

from __future__ import annotations

import numpy as np

from fastfvae.metrics.sampling import discrete_mutual_info, discretize_histogram, generate_batch_factor_code

DEFAULTS = dict(num_train=10000, batch_size=16, num_bins=20)


def compute_unsupervised(ground_truth, representation_function, random_state,
                         num_train: int = 10000, batch_size: int = 16, num_bins: int = 20) -> dict:
    """dlib's ``unsupervised_metrics``: Gaussian TC, Gaussian Wasserstein correlation, mean MI."""
    mus, _ = generate_batch_factor_code(ground_truth, representation_function, num_train,
                                        random_state, batch_size)
    num_codes = mus.shape[0]
    cov = np.cov(mus)
    scores = {"gaussian_total_correlation": float(gaussian_total_correlation(cov))}
    wasserstein = gaussian_wasserstein_correlation(cov)
    scores["gaussian_wasserstein_correlation"] = float(wasserstein)
    scores["gaussian_wasserstein_correlation_norm"] = float(wasserstein / np.sum(np.diag(cov)))
    discrete = discretize_histogram(mus, num_bins)
    mutual_info = discrete_mutual_info(discrete, discrete)
    np.fill_diagonal(mutual_info, 0)
    pairs = num_codes ** 2 - num_codes
    scores["mutual_info_score"] = float(np.sum(mutual_info) / pairs) if pairs else 0.0
    return scores


def gaussian_total_correlation(cov: np.ndarray) -> float:
    """KL(N(0, cov) || N(0, diag(cov))) = 0.5 (sum log diag - log det)."""
    return 0.5 * (np.sum(np.log(np.diag(cov))) - np.linalg.slogdet(cov)[1])


def gaussian_wasserstein_correlation(cov: np.ndarray) -> float:
    """2 tr(cov) - 2 tr(sqrtm(cov * diag(cov)[:, None])), dlib's Wasserstein dependency."""
    import scipy.linalg

    sqrtm = scipy.linalg.sqrtm(cov * np.expand_dims(np.diag(cov), axis=1))
    return 2 * np.trace(cov) - 2 * np.trace(sqrtm)
