"""What a run reports: the JSONL log (`MetricLog`) and the rich progress bar (`TrainProgress`).

JSONL (``<run>/train_log.jsonl``), one line per logged step::

    {"step": 1000, "loss": ..., "recon": ..., "kl": ..., "tc": ..., "d_loss": ..., "d_acc": ...,
     "steps_per_s": ..., "elapsed_s": ...}

``loss``/``recon``/``kl``/``tc``/``d_loss``/``d_acc`` are means over the steps since the previous
line; ``steps_per_s`` is the rate over that interval; ``elapsed_s`` is the training wall time
since the run began (across resumes). ``tc``, ``d_loss``, ``d_acc`` are null for beta-VAE.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import atomic_write_text

LOG_NAME = "train_log.jsonl"
METRIC_KEYS = ("loss", "recon", "kl", "tc", "d_loss", "d_acc")


class IntervalMeter:
    """Sums per-step metric tensors (no device sync) and turns them into interval means."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.sums[k] = v.detach().float() if k not in self.sums else self.sums[k] + v.detach().float()
        self.count += 1

    def flush(self) -> tuple[dict, float]:
        """(means as floats, None for metrics never seen; steps/s over the interval), then reset."""
        now = time.perf_counter()
        n = max(self.count, 1)
        means = {k: (float(self.sums[k]) / n if k in self.sums else None) for k in METRIC_KEYS}
        rate = self.count / max(now - self.t0, 1e-9)
        self.sums, self.count, self.t0 = {}, 0, now
        return means, rate


class MetricLog:
    """Appends JSON lines to ``<run>/train_log.jsonl``."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOG_NAME

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (written after the checkpoint a run resumes from)."""
        if self.path.exists():
            kept = [line for line in read_log(self.path) if line["step"] <= step]
            atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append ``record``; an OSError (disk full) becomes a one-line FastFVAEError."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise FastFVAEError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def read_log(path: str | Path) -> list[dict]:
    """All records of a JSONL log (skips a torn last line)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.fields.get("rate")
        return Text("-- it/s" if not speed else f"{speed:.1f} it/s", style="progress.data.speed")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class TrainProgress:
    """A rich progress bar: done/total, it/s, ETA, recon, KL, TC, D accuracy (disabled: a no-op)."""

    def __init__(self, total: int, start: int, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.progress = Progress(
            BarColumn(bar_width=12), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(compact=True),
            TextColumn("{task.fields[stats]}"),
            console=console or Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="", rate=None)

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, means: dict | None = None, rate: float | None = None) -> None:
        if not self.enabled:
            return
        fields = {}
        if means is not None:
            fields["stats"] = (f"recon {_fmt(means['recon'], '.1f')} KL {_fmt(means['kl'], '.2f')} "
                               f"TC {_fmt(means['tc'], '.3f')} Dacc {_fmt(means['d_acc'], '.2f')}")
            fields["rate"] = rate
        self.progress.update(self.task, completed=step, **fields)
