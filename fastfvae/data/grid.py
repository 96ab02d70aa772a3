"""A full factorial grid of discrete ground-truth factors, with disentanglement_lib's sampling.

dSprites (and the metric parity tables) hold exactly one observation per factor
combination, stored row-major over the factors (last factor fastest). So a factor
combination *is* a row index, and sampling observations is sampling factors.

`sample_factors` reproduces disentanglement_lib 1.5 draw for draw: one vectorised
``random_state.randint(size_k, size=n)`` call per factor, in factor order (see
docs/metrics-parity.md §3). Anything else changes every metric score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastfvae.errors import FastFVAEError


@dataclass(frozen=True)
class FactorGrid:
    """Factor sizes of a row-major factorial grid; rows are ``dot(factors, bases)``."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        if not sizes or any(s < 1 for s in sizes):
            raise FastFVAEError(f"factor sizes must be positive integers, got {list(self.sizes)}")
        object.__setattr__(self, "sizes", sizes)

    @property
    def num_factors(self) -> int:
        return len(self.sizes)

    @property
    def num_rows(self) -> int:
        return int(np.prod(self.sizes, dtype=np.int64))

    @property
    def bases(self) -> np.ndarray:
        """Row stride of each factor: ``bases[k] = prod(sizes[k+1:])``."""
        sizes = np.asarray(self.sizes, dtype=np.int64)
        return np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)

    def sample_factors(self, n: int, random_state: np.random.RandomState) -> np.ndarray:
        """[n, K] int64 factor classes: one ``randint(size_k, size=n)`` call per factor."""
        factors = np.zeros((n, self.num_factors), dtype=np.int64)
        for k, size in enumerate(self.sizes):
            factors[:, k] = random_state.randint(size, size=n)
        return factors

    def rows_from_factors(self, factors: np.ndarray) -> np.ndarray:
        """Row index of each factor combination (int64 [n])."""
        factors = np.asarray(factors, dtype=np.int64)
        if factors.ndim != 2 or factors.shape[1] != self.num_factors:
            raise FastFVAEError(
                f"factors must have shape [n, {self.num_factors}], got {list(factors.shape)}"
            )
        if (factors < 0).any() or (factors >= np.asarray(self.sizes)).any():
            raise FastFVAEError(f"factor classes out of range for factor sizes {list(self.sizes)}")
        return factors @ self.bases

    def factors_of(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of `rows_from_factors`: [n, K] int64 classes of each row."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise FastFVAEError(f"row indices must lie in [0, {self.num_rows}), got out-of-range rows")
        return (rows[:, None] // self.bases[None, :]) % np.asarray(self.sizes, dtype=np.int64)

    def all_factors(self) -> np.ndarray:
        """[num_rows, K] classes of every row, in row order."""
        return self.factors_of(np.arange(self.num_rows, dtype=np.int64))
