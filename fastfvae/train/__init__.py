"""Training: the config, the reference step, the loop, checkpoints."""

from fastfvae.train.config import PRESETS, TrainConfig, preset  # noqa: F401
