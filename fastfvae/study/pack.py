"""A pack: K runs of one method, architecture and dataset, trained together.

`train_pack(configs)` trains every config to its ``steps``, each in its own run folder
(``cfg.out``) with exactly the layout of a single `fastfvae train` run (``config.json``,
``checkpoint.pt``, ``train_log.jsonl``, ``eval_log.jsonl``), so ``fastfvae eval``,
``traverse`` and ``train --resume`` work on every run of it. A run folder that already holds a
checkpoint is resumed from it; a finished run is left as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import checkpoint_path, load_checkpoint
from fastfvae.train.config import TrainConfig
from fastfvae.train.loop import RunResult, run_training


def pack_key(cfg: TrainConfig) -> tuple:
    """What the runs of one pack must share: everything but the seed, the run folder and the
    method's float hyperparameters (which the pack stacks)."""
    d = cfg.to_dict()
    for name in ("seed", "out", "preset"):
        d.pop(name)
    hparams = d.pop("hparams")
    fixed = tuple(sorted((k, str(v)) for k, v in hparams.items() if not isinstance(v, float)))
    return tuple(sorted((k, str(v)) for k, v in d.items())) + fixed


def check_pack(configs: Sequence[TrainConfig]) -> None:
    """FastFVAEError (one line) unless ``configs`` can train as one pack."""
    if not configs:
        raise FastFVAEError("a pack needs at least one run")
    outs = [Path(c.out).resolve() for c in configs]
    if len(set(outs)) != len(outs):
        raise FastFVAEError("two runs of a pack share a run folder; each run needs its own --out")
    key = pack_key(configs[0])
    for cfg in configs[1:]:
        if pack_key(cfg) != key:
            raise FastFVAEError(f"{cfg.out} cannot join a pack with {configs[0].out}: the runs of a pack differ "
                                "only in seed and the method's float hyperparameters")


def finished(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` holds a checkpoint at (or past) ``cfg.steps``."""
    if not checkpoint_path(cfg.out).exists():
        return False
    return int(load_checkpoint(cfg.out)["state"]["step"]) >= cfg.steps


def train_pack(configs: Sequence[TrainConfig], *, data=None, progress: bool = True, console=None,
               callbacks_for=None) -> list[RunResult | None]:
    """Train the runs of a pack; returns one `RunResult` per config (None for a run that was
    already finished). ``callbacks_for(cfg, data)``: the per-step callbacks of each run."""
    configs = [cfg.validate() for cfg in configs]
    check_pack(configs)
    results: list[RunResult | None] = []
    for cfg in configs:
        if finished(cfg):
            results.append(None)
            continue
        resume = cfg.out if checkpoint_path(cfg.out).exists() else None
        callbacks = callbacks_for(cfg, data) if callbacks_for is not None else ()
        result = run_training(cfg, data=data, resume=resume, progress=progress, console=console, callbacks=callbacks)
        results.append(result)
        if result.status != "completed":
            break
    return results
