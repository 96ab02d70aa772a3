"""Disentanglement metrics, score for score equal to disentanglement_lib 1.5.

Pure functions in dlib's style ``compute_x(ground_truth, representation_function,
random_state, **settings)`` (one module per metric), and the fast paths
`evaluate_codes` (a precomputed code table), `evaluate_model` (encode once, then score) and
`evaluate_models` (K models, each batch of images encoded by all of them; the eval log of
`periodic_evaluation`, the metrics during training).
"""

from fastfvae.metrics.beta_vae import compute_beta_vae  # noqa: F401
from fastfvae.metrics.dci import compute_dci, compute_dci_fast  # noqa: F401
from fastfvae.metrics.encode import CachedEncoder, PerBatchEncoder, encode_dataset, encode_rows_many  # noqa: F401
from fastfvae.metrics.evaluate import (  # noqa: F401
    BUDGETS, DEFAULT_METRICS, DLIB_QUICK_METRICS, MAIN_SCORES, METRICS, MODEL_METRICS, TRAINING_METRICS,
    evaluate_codes, evaluate_model, evaluate_models, factor_vae_score_of_model, reconstruction_of_model,
    reconstruction_of_models,
)
from fastfvae.metrics.factor_vae import compute_factor_vae  # noqa: F401
from fastfvae.metrics.gaussian_tc import compute_unsupervised, gaussian_total_correlation  # noqa: F401
from fastfvae.metrics.mig import compute_mig  # noqa: F401
from fastfvae.metrics.periodic import periodic_evaluation, periodic_factor_vae  # noqa: F401
from fastfvae.metrics.reconstruction import reconstruction_error  # noqa: F401
from fastfvae.metrics.sampling import CodeTable, generate_batch_factor_code  # noqa: F401
from fastfvae.metrics.sap import compute_sap  # noqa: F401
