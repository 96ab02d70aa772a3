"""Mutual Information Gap (Chen et al. 2018), identical to disentanglement_lib 1.5.

Mirrors dlib's ``mig.compute_mig``: ``num_train`` points sampled in chunks of 16, each code
dim discretised into 20 equal-width histogram bins (in the codes' dtype), the mutual
information (nats) of every (dim, factor) pair by ``sklearn.metrics.mutual_info_score``, and
per factor the gap between the two most informative dims over the factor's entropy;
``discrete_mig`` is the mean over factors.
"""

from __future__ import annotations

import numpy as np

from fastfvae.metrics.sampling import (
    discrete_entropy, discrete_mutual_info, discretize_histogram, generate_batch_factor_code,
)

DEFAULTS = dict(num_train=10000, batch_size=16, num_bins=20)


def compute_mig(ground_truth, representation_function, random_state,
                num_train: int = 10000, batch_size: int = 16, num_bins: int = 20) -> dict:
    """dlib's ``compute_mig``: {discrete_mig}."""
    mus, ys = generate_batch_factor_code(ground_truth, representation_function, num_train,
                                         random_state, batch_size)
    return mig_of(mus, ys, num_bins)


def mig_of(mus: np.ndarray, ys: np.ndarray, num_bins: int = 20) -> dict:
    """dlib's ``_compute_mig`` on codes [D, n] and factors [K, n]."""
    m = discrete_mutual_info(discretize_histogram(mus, num_bins), ys)
    entropy = discrete_entropy(ys)
    sorted_m = np.sort(m, axis=0)[::-1]
    return {"discrete_mig": float(np.mean(np.divide(sorted_m[0, :] - sorted_m[1, :], entropy[:])))}
