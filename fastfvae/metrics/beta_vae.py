"""The beta-VAE disentanglement metric (Higgins et al. 2017), identical to disentanglement_lib 1.5.

Each training point fixes one factor k, samples two batches of 64 that share factor k, and
takes the batch mean of ``|code(x1) - code(x2)|`` as the feature; a logistic regression
predicts k. Mirrors dlib's ``beta_vae.compute_beta_vae_sklearn``: the classifier is
``LogisticRegression(random_state=rs)`` at the *installed* scikit-learn's defaults (lbfgs,
multinomial, C=1, max_iter=100 since 0.22; it draws nothing from rs). With the liblinear
default of scikit-learn < 0.22 the fit draws one seed from rs, which shifts the eval set:
published 2019 numbers differ for that reason (docs/metrics-parity.md §4.2).

The features are computed at once on [n, 64, D] gathers, in the codes' dtype, reducing the
batch axis sequentially as dlib's per-batch ``np.mean(axis=0)`` does, then stored in float64.
"""

from __future__ import annotations

import warnings

import numpy as np

from fastfvae.metrics.sampling import num_factors_of

DEFAULTS = dict(batch_size=64, num_train=10000, num_eval=5000)


def compute_beta_vae(ground_truth, representation_function, random_state,
                     batch_size: int = 64, num_train: int = 10000, num_eval: int = 5000) -> dict:
    """dlib's ``compute_beta_vae_sklearn``: {train_accuracy, eval_accuracy}."""
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = _training_batch(ground_truth, representation_function, random_state,
                                       batch_size, num_train)
    model = LogisticRegression(random_state=random_state)
    with warnings.catch_warnings():  # lbfgs' ConvergenceWarning at max_iter=100, as in dlib
        warnings.simplefilter("ignore")
        model.fit(train_x, train_y)
    train_accuracy = np.mean(model.predict(train_x) == train_y)
    eval_x, eval_y = _training_batch(ground_truth, representation_function, random_state,
                                     batch_size, num_eval)
    eval_accuracy = model.score(eval_x, eval_y)
    return {"train_accuracy": float(train_accuracy), "eval_accuracy": float(eval_accuracy)}


def sample_pair_batches(ground_truth, random_state, batch_size: int, num_points: int):
    """dlib's per-point draws: (k [n], rows1 [n, batch], rows2 [n, batch]).

    Per point: ``k = randint(K)``, ``f1 = sample_factors(batch)``, ``f2 = sample_factors(batch)``,
    then ``f2[:, k] = f1[:, k]``.
    """
    num_factors = num_factors_of(ground_truth)
    fixed = np.empty(num_points, dtype=np.int64)
    factors = np.empty((2, num_points, batch_size, num_factors), dtype=np.int64)
    for i in range(num_points):
        k = random_state.randint(num_factors)
        f1 = ground_truth.sample_factors(batch_size, random_state)
        f2 = ground_truth.sample_factors(batch_size, random_state)
        f2[:, k] = f1[:, k]
        fixed[i] = k
        factors[0, i] = f1
        factors[1, i] = f2
    rows = ground_truth.rows_from_factors(factors.reshape(-1, num_factors))
    rows = rows.reshape(2, num_points, batch_size)
    return fixed, rows[0], rows[1]


def _training_batch(ground_truth, representation_function, random_state, batch_size, num_points):
    """dlib's ``_generate_training_batch``: float64 features [n, D] and labels [n]."""
    fixed, rows1, rows2 = sample_pair_batches(ground_truth, random_state, batch_size, num_points)
    codes = np.asarray(representation_function(np.concatenate([rows1.reshape(-1), rows2.reshape(-1)])))
    codes = codes.reshape(2, num_points, batch_size, -1)
    features = np.mean(np.abs(codes[0] - codes[1]), axis=1)
    return features.astype(np.float64), fixed
