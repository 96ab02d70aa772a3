"""FactorVAE metric: vectorised == dlib's per-batch loop bit for bit, known answers, quirks."""

import numpy as np
import pytest

from fastfvae.data.grid import FactorGrid
from fastfvae.metrics import CodeTable, compute_factor_vae, evaluate_codes
from metrics_helpers import load_table

SIZES = (3, 6, 10, 8, 8)
SMALL = {"factor_vae": {"num_train": 2000, "num_eval": 2000, "num_variance_estimate": 5000}}


def dlib_literal_factor_vae(grid, representation, rs, batch_size, num_train, num_eval,
                            num_variance_estimate, prune_threshold):
    """A line-by-line transcription of dlib's compute_factor_vae: one batch at a time."""
    factors = grid.sample_factors(num_variance_estimate, rs)
    reps = np.vstack([representation(grid.rows_from_factors(factors[i:i + 64]))
                      for i in range(0, num_variance_estimate, 64)])
    global_var = np.var(reps, axis=0, ddof=1)
    active = np.sqrt(global_var) >= prune_threshold

    def votes(n):
        v = np.zeros((len(grid.sizes), global_var.shape[0]), dtype=np.int64)
        for _ in range(n):
            k = rs.randint(len(grid.sizes))
            f = grid.sample_factors(batch_size, rs)
            f[:, k] = f[0, k]
            local = np.var(representation(grid.rows_from_factors(f)), axis=0, ddof=1)
            v[k, np.argmin(local[active] / global_var[active])] += 1
        return v

    train, ev = votes(num_train), votes(num_eval)
    cls = np.argmax(train, axis=0)
    idx = np.arange(train.shape[1])
    return {"train_accuracy": float(np.sum(train[cls, idx]) * 1. / np.sum(train)),
            "eval_accuracy": float(np.sum(ev[cls, idx]) * 1. / np.sum(ev)),
            "num_active_dims": len(active)}


def test_batched_variance_is_bitwise_per_batch_variance():
    rng = np.random.default_rng(0)
    for dims in (1, 7, 10, 33):
        codes = (rng.standard_normal((500, 64, dims)) * rng.uniform(1e-3, 1e3, dims)).astype(np.float32)
        codes += rng.uniform(-50, 50, dims).astype(np.float32)
        batched = np.var(codes, axis=1, ddof=1)
        looped = np.stack([np.var(codes[b], axis=0, ddof=1) for b in range(codes.shape[0])])
        assert batched.dtype == np.float32
        assert np.array_equal(batched, looped)


@pytest.mark.parametrize("table", ["entangled", "ignore"])
def test_vectorised_equals_dlib_literal_loop(table):
    codes, sizes = load_table(table)
    grid, rep = FactorGrid(sizes), CodeTable(codes)
    settings = dict(batch_size=64, num_train=600, num_eval=300, num_variance_estimate=2000,
                    prune_threshold=0.05)
    ours = compute_factor_vae(grid, rep, np.random.RandomState(3), **settings)
    ref = dlib_literal_factor_vae(grid, rep, np.random.RandomState(3), **settings)
    assert ours == ref


def _one_dim_per_factor(sizes=SIZES, drop=None):
    grid = FactorGrid(sizes)
    f = grid.all_factors().astype(np.float32) / (np.asarray(sizes, np.float32) - 1)
    return np.delete(f, drop, axis=1) if drop is not None else f


def test_perfectly_disentangled_code_scores_one():
    scores = evaluate_codes(_one_dim_per_factor(), SIZES, ("factor_vae",), config=SMALL)["factor_vae"]
    assert scores == {"train_accuracy": 1.0, "eval_accuracy": 1.0, "num_active_dims": 5}


def test_code_ignoring_a_factor_scores_about_k_minus_1_over_k():
    scores = evaluate_codes(_one_dim_per_factor(drop=2), SIZES, ("factor_vae",), config=SMALL)["factor_vae"]
    assert abs(scores["eval_accuracy"] - 4 / 5) < 0.03
    assert abs(scores["train_accuracy"] - 4 / 5) < 0.03
    assert scores["eval_accuracy"] < 1.0


def test_num_active_dims_quirk_reports_mask_length():
    codes = _one_dim_per_factor()
    codes = np.concatenate([codes, np.full((codes.shape[0], 3), 0.5, np.float32)], axis=1)  # 3 dead dims
    scores = evaluate_codes(codes, SIZES, ("factor_vae",), config=SMALL)["factor_vae"]
    assert scores["num_active_dims"] == 8  # dlib reports D, not the 5 active dims
    assert scores["eval_accuracy"] == 1.0


def test_no_active_dim_gives_zeros():
    codes = np.zeros((int(np.prod(SIZES)), 4), np.float32)
    scores = evaluate_codes(codes, SIZES, ("factor_vae",), config=SMALL)["factor_vae"]
    assert scores == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}
