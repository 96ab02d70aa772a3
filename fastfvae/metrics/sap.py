"""Separated Attribute Predictability (Kumar et al. 2018), identical to disentanglement_lib 1.5.

Mirrors dlib's ``sap_score.compute_sap`` for discrete factors: ``num_train`` then
``num_test`` points in chunks of 16 from the same RandomState; for every (code dim, factor)
a ``LinearSVC(C=0.01, class_weight="balanced")`` on that single dim, scored by test
accuracy; per factor the gap between the two best dims; ``SAP_score`` is the mean gap.
With ``continuous_factors=True`` the score matrix is dlib's squared correlation instead.
"""

from __future__ import annotations

import warnings

import numpy as np

from fastfvae.metrics.sampling import generate_batch_factor_code

DEFAULTS = dict(num_train=10000, num_test=5000, batch_size=16, continuous_factors=False)


def compute_sap(ground_truth, representation_function, random_state, num_train: int = 10000,
                num_test: int = 5000, batch_size: int = 16, continuous_factors: bool = False) -> dict:
    """dlib's ``compute_sap``: {SAP_score}."""
    mus, ys = generate_batch_factor_code(ground_truth, representation_function, num_train,
                                         random_state, batch_size)
    mus_test, ys_test = generate_batch_factor_code(ground_truth, representation_function, num_test,
                                                   random_state, batch_size)
    matrix = score_matrix(mus, ys, mus_test, ys_test, continuous_factors)
    ordered = np.sort(matrix, axis=0)
    return {"SAP_score": float(np.mean(ordered[-1, :] - ordered[-2, :]))}


def score_matrix(mus, ys, mus_test, ys_test, continuous_factors: bool) -> np.ndarray:
    """dlib's ``compute_score_matrix``: [D, K] predictability of factor j from dim i alone."""
    from sklearn.svm import LinearSVC

    matrix = np.zeros([mus.shape[0], ys.shape[0]])
    for i in range(mus.shape[0]):
        for j in range(ys.shape[0]):
            mu_i, y_j = mus[i, :], ys[j, :]
            if continuous_factors:
                cov = np.cov(mu_i, y_j, ddof=1)
                var_mu, var_y = cov[0, 0], cov[1, 1]
                matrix[i, j] = cov[0, 1] ** 2 * 1. / (var_mu * var_y) if var_mu > 1e-12 else 0.
                continue
            classifier = LinearSVC(C=0.01, class_weight="balanced")
            with warnings.catch_warnings():  # liblinear's ConvergenceWarning, as in dlib
                warnings.simplefilter("ignore")
                classifier.fit(mu_i[:, np.newaxis], y_j)
            pred = classifier.predict(mus_test[i, :][:, np.newaxis])
            matrix[i, j] = np.mean(pred == ys_test[j, :])
    return matrix
