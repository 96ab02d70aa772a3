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
#: ``--eval-every``'s log (`fastfvae.metrics.periodic`), one ``{"step", "factor_vae", "seconds"}`` line per evaluation.
EVAL_LOG_NAME = "eval_log.jsonl"
#: The metrics every log line has (None where a run's method has no such metric): the VAE's,
#: then FactorVAE's. A method's other metrics (its ``metric_names``) follow them.
METRIC_KEYS = ("loss", "recon", "kl", "tc", "d_loss", "d_acc")


class StackedMetrics(dict):
    """A step's metrics as views of one stacked vector: ``metrics[name] == values[i]``.

    A CUDA step produces its metrics as one vector (one clone per step); `IntervalMeter` adds
    that vector in one operation instead of one small kernel per metric. It is a plain dict
    for everything else (callbacks, the loop). Assigning a key (the loop's ``debug_nan_at_step``
    injection) detaches the dict from the vector, so the meter then adds the entries one by one
    and sees the assigned value.
    """

    def __init__(self, values: torch.Tensor, names) -> None:
        names = tuple(names)
        if values.shape != (len(names),):
            raise ValueError(f"stacked metrics: {len(names)} names for a vector of shape {tuple(values.shape)}")
        super().__init__((k, values[i]) for i, k in enumerate(names))
        self.values: torch.Tensor | None = values
        self.names = names

    def __setitem__(self, key, value) -> None:
        self.values = None
        super().__setitem__(key, value)


class IntervalMeter:
    """Sums per-step metric tensors (no device sync) and turns them into interval means.

    A `StackedMetrics` step is added as one vector (one device operation a step); any other
    dict entry by entry. Both give the same float32 sums, element for element, in the same
    order, so the means (and the JSONL log) do not depend on which form a step returned.
    """

    def __init__(self) -> None:
        self._entries: dict[str, torch.Tensor] = {}
        self._vector: torch.Tensor | None = None
        self._names: tuple[str, ...] = ()
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict) -> None:
        vector = getattr(metrics, "values", None) if isinstance(metrics, StackedMetrics) else None
        if vector is not None and (self._vector is None or metrics.names == self._names):
            vector = vector.detach().float()
            # out of place: the first step's vector is kept as it is, never written to
            self._vector = vector if self._vector is None else self._vector + vector
            self._names = metrics.names
        else:
            for k, v in metrics.items():
                v = v.detach().float()
                self._entries[k] = v if k not in self._entries else self._entries[k] + v
        self.count += 1

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """The interval's sum of each metric (0-dim tensors, still on the device)."""
        sums = dict(self._entries)
        if self._vector is not None:
            for i, k in enumerate(self._names):
                sums[k] = self._vector[i] if k not in sums else sums[k] + self._vector[i]
        return sums

    def flush(self) -> tuple[dict, float]:
        """(means as floats, None for metrics never seen; steps/s over the interval), then reset."""
        now = time.perf_counter()
        n = max(self.count, 1)
        sums = self.sums
        # the loop's own names (None when a method has no such metric), then a method's own ones
        names = list(METRIC_KEYS) + [k for k in sums if k not in METRIC_KEYS]
        seen = [k for k in names if k in sums]
        # one device-to-host read for all of them (float() per metric would be one sync each)
        totals = dict(zip(seen, torch.stack([sums[k] for k in seen]).tolist())) if seen else {}
        means = {k: (totals[k] / n if k in totals else None) for k in names}
        rate = self.count / max(now - self.t0, 1e-9)
        self._entries, self._vector, self._names = {}, None, ()
        self.count, self.t0 = 0, now
        return means, rate


class MetricLog:
    """Appends JSON lines (each with a ``"step"``) to ``<run>/<name>`` (default ``train_log.jsonl``)."""

    def __init__(self, out: Path, name: str = LOG_NAME) -> None:
        self.path = Path(out) / name

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class TrainProgress:
    """A rich progress bar: done/total, it/s, ETA, recon, KL, TC, D accuracy (disabled: a no-op).

    On a console that is not a terminal (a log file, a batch job's output, a pipe) a live bar
    draws nothing until it stops, so there it prints one plain line (step, it/s, ETA and the
    same numbers) at most every `LINE_EVERY_S` seconds instead, and one for the step it ends at."""

    #: seconds between two plain lines on a console that is not a terminal
    LINE_EVERY_S = 30.0

    def __init__(self, total: int, start: int, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.console = console or Console(stderr=True)
        self.total, self.lines = total, not self.console.is_terminal
        self._last_line = time.monotonic()
        self._stats, self._rate = "", None
        self._step = self._printed = None
        if self.lines:
            return
        self.progress = Progress(
            BarColumn(bar_width=12), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(compact=True),
            TextColumn("{task.fields[stats]}"),
            console=self.console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="", rate=None)

    def __enter__(self) -> "TrainProgress":
        if self.enabled and not self.lines:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if not self.lines:
            self.progress.stop()
        elif self._step is not None and self._step != self._printed:
            self._print_line()  # the step it ended at (the last, or where it was stopped)

    def update(self, step: int, means: dict | None = None, rate: float | None = None) -> None:
        if not self.enabled:
            return
        fields = {}
        if means is not None:
            fields["stats"] = (f"recon {_fmt(means['recon'], '.1f')} KL {_fmt(means['kl'], '.2f')} "
                               f"TC {_fmt(means['tc'], '.3f')} Dacc {_fmt(means['d_acc'], '.2f')}")
            fields["rate"] = rate
        if self.lines:
            self._line(step, fields)
            return
        self.progress.update(self.task, completed=step, **fields)

    def _line(self, step: int, fields: dict) -> None:
        self._stats, self._rate = fields.get("stats", self._stats), fields.get("rate", self._rate)
        self._step = step
        now = time.monotonic()
        if step < self.total and now - self._last_line >= self.LINE_EVERY_S:
            self._last_line = now
            self._print_line()

    def _print_line(self) -> None:
        step, self._printed = self._step, self._step
        rate = f"{self._rate:.1f} it/s" if self._rate else "-- it/s"
        eta = f", ETA {_duration((self.total - step) / self._rate)}" if self._rate and step < self.total else ""
        self.console.print(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), {rate}{eta}  "
                           f"{self._stats}".rstrip(), highlight=False, soft_wrap=True)
