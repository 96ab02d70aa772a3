"""Reconstruction error: mean binary cross-entropy per image (the paper's y-axis, Fig. 3-4).

``reconstruction_error(reconstruct, images_of, num_rows, random_state)`` samples
``num_samples`` rows uniformly (one ``randint(num_rows, size=n)`` call), and for batches of
them compares ``reconstruct(x)`` (logits) with the images ``x``: BCE summed over pixels,
averaged over images, in nats. Both callables are the caller's (metrics never import
models): ``images_of(rows) -> float32 {0,1} [n, ...]``, ``reconstruct(x) -> logits`` of the same
shape; numpy or torch arrays both work (they are converted with ``np.asarray``).
"""

from __future__ import annotations

import numpy as np

DEFAULTS = dict(num_samples=10000, batch_size=256)


def bce_with_logits_sum(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-image sum over pixels of the stable BCE with logits (float64 [n])."""
    logits = np.asarray(logits, dtype=np.float64).reshape(logits.shape[0], -1)
    targets = np.asarray(targets, dtype=np.float64).reshape(targets.shape[0], -1)
    loss = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    return loss.sum(axis=1)


def reconstruction_error(reconstruct, images_of, num_rows: int, random_state,
                         num_samples: int = 10000, batch_size: int = 256) -> dict:
    """{reconstruction_bce}: mean over ``num_samples`` random rows of the per-image BCE (nats)."""
    rows = random_state.randint(num_rows, size=num_samples)
    total = 0.0
    for start in range(0, num_samples, batch_size):
        x = images_of(rows[start:start + batch_size])
        logits = reconstruct(x)
        total += float(bce_with_logits_sum(_numpy(logits), _numpy(x)).sum())
    return {"reconstruction_bce": total / max(num_samples, 1)}


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)
