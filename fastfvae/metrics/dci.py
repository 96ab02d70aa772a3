"""DCI: disentanglement, completeness, informativeness (Eastwood & Williams 2018).

``compute_dci`` is disentanglement_lib 1.5's ``dci.compute_dci`` bit for bit: ``num_train``
then ``num_test`` points in chunks of 16 from one RandomState, one
``GradientBoostingClassifier()`` per factor on all code dims, importances = |feature
importances|, informativeness = mean *accuracies* (dlib's keys say "informativeness" but hold
accuracies). dlib leaves the boosting's ``random_state`` at None, so its trees draw from
numpy's global RNG (feature tie-breaking moves the score in the 3rd decimal); dlib's
published-parity runs seed it with ``np.random.seed(seed)`` first. Here one
``RandomState(gbt_seed)`` shared by the K fits plays that role: the same draws, without
touching the global state. ``gbt_seed=None`` uses the global RNG as dlib does.

``compute_dci_fast`` swaps in ``HistGradientBoostingClassifier`` (binned features, many
times faster). Its scores are **not** dlib-identical; it reports the same keys under the
metric name ``dci_fast``.
"""

from __future__ import annotations

import numpy as np

from fastfvae.metrics.sampling import generate_batch_factor_code

#: ``gbt_seed`` is replaced by the evaluation seed in `fastfvae.metrics.evaluate_codes`
DEFAULTS = dict(num_train=10000, num_test=5000, batch_size=16, gbt_seed=0)


def compute_dci(ground_truth, representation_function, random_state, num_train: int = 10000,
                num_test: int = 5000, batch_size: int = 16, gbt_seed: int | None = 0) -> dict:
    """dlib's ``compute_dci`` (parity mode): {informativeness_train/test, disentanglement, completeness}."""
    from sklearn.ensemble import GradientBoostingClassifier

    gbt_rng = None if gbt_seed is None else np.random.RandomState(gbt_seed)
    return _dci(ground_truth, representation_function, random_state, num_train, num_test,
                batch_size, lambda: GradientBoostingClassifier(random_state=gbt_rng))


def compute_dci_fast(ground_truth, representation_function, random_state, num_train: int = 10000,
                     num_test: int = 5000, batch_size: int = 16, gbt_seed: int | None = 0) -> dict:
    """DCI with ``HistGradientBoostingClassifier``: same keys, NOT dlib-identical scores."""
    return _dci(ground_truth, representation_function, random_state, num_train, num_test,
                batch_size, lambda: _HistGBT(gbt_seed))


def _dci(ground_truth, representation_function, random_state, num_train, num_test, batch_size,
         make_model) -> dict:
    mus_train, ys_train = generate_batch_factor_code(ground_truth, representation_function,
                                                     num_train, random_state, batch_size)
    mus_test, ys_test = generate_batch_factor_code(ground_truth, representation_function,
                                                   num_test, random_state, batch_size)
    importance, train_acc, test_acc = importance_matrix(mus_train, ys_train, mus_test, ys_test, make_model)
    return {"informativeness_train": float(train_acc), "informativeness_test": float(test_acc),
            "disentanglement": float(disentanglement(importance)),
            "completeness": float(completeness(importance))}


def importance_matrix(x_train, y_train, x_test, y_test, make_model):
    """dlib's ``compute_importance_gbt``: ([D, K] importances, mean train acc, mean test acc)."""
    importance = np.zeros(shape=[x_train.shape[0], y_train.shape[0]], dtype=np.float64)
    train_acc, test_acc = [], []
    for j in range(y_train.shape[0]):
        model = make_model()
        model.fit(x_train.T, y_train[j, :])
        importance[:, j] = np.abs(model.feature_importances_)
        train_acc.append(np.mean(model.predict(x_train.T) == y_train[j, :]))
        test_acc.append(np.mean(model.predict(x_test.T) == y_test[j, :]))
    return importance, np.mean(train_acc), np.mean(test_acc)


def disentanglement(importance: np.ndarray) -> float:
    """Importance-weighted mean over codes of 1 - entropy (base K) of each code's row."""
    from scipy.stats import entropy

    per_code = 1. - entropy(importance.T + 1e-11, base=importance.shape[1])
    if importance.sum() == 0.:
        importance = np.ones_like(importance)
    code_importance = importance.sum(axis=1) / importance.sum()
    return np.sum(per_code * code_importance)


def completeness(importance: np.ndarray) -> float:
    """Importance-weighted mean over factors of 1 - entropy (base D) of each factor's column."""
    from scipy.stats import entropy

    per_factor = 1. - entropy(importance + 1e-11, base=importance.shape[0])
    if importance.sum() == 0.:
        importance = np.ones_like(importance)
    factor_importance = importance.sum(axis=0) / importance.sum()
    return np.sum(per_factor * factor_importance)


class _HistGBT:
    """``HistGradientBoostingClassifier`` with split-gain feature importances.

    The importance of a feature is the total gain of the splits on it over every tree,
    normalised to sum to 1 (the histogram model has no ``feature_importances_``; sklearn
    keeps each tree's nodes, gain included, in ``_predictors``).
    """

    def __init__(self, seed):
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.model = HistGradientBoostingClassifier(early_stopping=False, random_state=seed)

    def fit(self, x, y):
        self.model.fit(x, y)
        gains = np.zeros(x.shape[1], dtype=np.float64)
        for trees in self.model._predictors:
            for tree in trees:
                nodes = tree.nodes[~tree.nodes["is_leaf"].astype(bool)]
                np.add.at(gains, nodes["feature_idx"].astype(np.int64), nodes["gain"])
        total = gains.sum()
        self.feature_importances_ = gains / total if total > 0 else gains
        return self

    def predict(self, x):
        return self.model.predict(x)
