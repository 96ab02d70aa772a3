"""The report of a sweep (or of any folder of runs): tables and the paper's figures.

`write_report(folder)` finds the runs under ``folder`` (`find_runs`), reads each run's
``config.json`` and ``eval_log.jsonl`` (`load_run`) and writes into ``folder/report/``:

- ``results.csv``: one row per (run, evaluation step): run, method, each hyperparameter (the
  union of the runs' ``hparams`` names), seed, dataset, step, then each metric (`METRICS`, and
  any other number an eval log holds). The numbers are the logs' own (Python's float repr);
  a metric a line does not have is an empty cell.
- ``final.csv``: the same columns, one row per run: its last evaluation.
- ``figure3.png`` / ``.svg``: Kim & Mnih 2018, Figure 3 generalised (`figure3`): rows are the
  reconstruction error, the beta-VAE metric and the FactorVAE metric against training steps;
  one column per method, one line per setting of the method's swept hyperparameters (`settings`),
  the mean over seeds with its 95% t-interval shaded (`t_interval`).
- ``scatter.png`` / ``.svg``: each run's final FactorVAE metric, and beta-VAE metric, against its
  final reconstruction error (Kim & Mnih 2018, Figure 4's trade-off), colour per (method,
  setting), marker per method.
- ``violins.png`` / ``.svg``: per metric, one violin per method of its runs' final scores.

The plotting functions return the matplotlib `Figure` together with the numbers they plotted,
so what a figure shows can be checked against the tables. Figures are drawn on the Agg canvas
of a bare `matplotlib.figure.Figure` (no pyplot state), from numpy only; torch is imported only
by ``tensorboard=True`` (`write_tensorboard`, the ``[tb]`` extra).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fastfvae.errors import FastFVAEError
from fastfvae.train.config import LEGACY_HPARAM_FIELDS

#: The metric columns of the tables, in order (eval_log.jsonl's keys).
METRICS = ("factor_vae", "beta_vae", "mig", "sap", "dci", "recon")
#: A metric logged as the dict its scorer returns (older eval logs: ``"factor_vae": {...}``):
#: the entry that is its score.
HEADLINE_KEYS = {
    "factor_vae": "eval_accuracy", "beta_vae": "eval_accuracy", "mig": "discrete_mig", "sap": "SAP_score",
    "dci": "disentanglement", "recon": "reconstruction_bce",
}
#: Other names of a metric (``fastfvae eval``'s name for the reconstruction error).
METRIC_ALIASES = {"reconstruction": "recon"}
#: Keys of an eval log line that are not metrics.
NON_METRIC_KEYS = frozenset({"step", "details", "seconds"})
#: Axis labels of the metrics.
METRIC_LABELS = {
    "factor_vae": "FactorVAE metric", "beta_vae": "beta-VAE metric", "mig": "MIG", "sap": "SAP score",
    "dci": "DCI disentanglement", "recon": "reconstruction error (BCE, nats/image)",
}
#: Method names as the papers write them.
METHOD_TITLES = {
    "vae": "VAE", "betavae": "beta-VAE", "annealedvae": "annealed VAE", "factorvae": "FactorVAE",
    "dipvae": "DIP-VAE", "betatcvae": "beta-TC-VAE",
}
#: Column order of Figure 3: beta-VAE left and FactorVAE right as in the paper, other methods
#: after them (alphabetically).
PAPER_ORDER = ("betavae", "factorvae")
#: Figure 3's rows.
FIGURE3_ROWS = ("recon", "beta_vae", "factor_vae")
#: The values each metric can take (a shaded interval is drawn within them).
METRIC_RANGE = {"factor_vae": (0.0, 1.0), "beta_vae": (0.0, 1.0), "mig": (0.0, 1.0), "sap": (0.0, 1.0),
                "dci": (0.0, 1.0), "recon": (0.0, np.inf)}
#: The scatter's panels: a disentanglement metric against the reconstruction error.
SCATTER_METRICS = ("factor_vae", "beta_vae")
#: One sequential colour map per method (shade = setting) and one marker per method, in column order.
METHOD_CMAPS = ("Blues", "Reds", "Greens", "Purples", "Oranges", "Greys", "YlOrBr", "BuGn")
METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: What `figure3` shades around each mean.
CONFIDENCE = 0.95
#: The figure files, each written as PNG and SVG.
FIGURES = ("figure3", "scatter", "violins")
#: The report's default folder inside the folder reported on.
REPORT_FOLDER = "report"
CONFIG_NAME = "config.json"
EVAL_LOG_NAME = "eval_log.jsonl"
TRAIN_LOG_NAME = "train_log.jsonl"
SWEEP_SPEC_NAME = "sweep.json"


# --- runs ---------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run folder: what its config says and every evaluation of its eval log."""

    name: str
    path: Path
    method: str
    hparams: dict
    seed: object
    dataset: object
    #: Sorted by step: {"step": int, metric: float, ...} holding the metrics each line has.
    evaluations: list = field(default_factory=list)

    @property
    def final(self) -> dict | None:
        """The last evaluation (None without any)."""
        return self.evaluations[-1] if self.evaluations else None

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the evaluations holding ``metric``."""
        points = [(e["step"], e[metric]) for e in self.evaluations if metric in e]
        return (np.array([p[0] for p in points], dtype=np.int64), np.array([p[1] for p in points], dtype=np.float64))

    def train_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``key`` in the run's train_log.jsonl (empty without one)."""
        path = self.path / TRAIN_LOG_NAME
        if not path.is_file():
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        points = [(int(line["step"]), float(line[key])) for _, line in read_jsonl(path)
                  if isinstance(line.get(key), (int, float)) and not isinstance(line.get(key), bool) and "step" in line]
        return (np.array([p[0] for p in points], dtype=np.int64), np.array([p[1] for p in points], dtype=np.float64))


def runs_root(folder: Path) -> Path:
    """Where the runs of ``folder`` are: ``folder/runs`` for a sweep folder (one holding
    sweep.json and runs/), else ``folder`` itself."""
    if (folder / SWEEP_SPEC_NAME).is_file() and (folder / "runs").is_dir():
        return folder / "runs"
    return folder


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """The run folders (folders holding config.json) under ``folder``, at any depth, sorted;
    a report folder inside it is not searched. FastFVAEError (one line) if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FastFVAEError(f"{folder} is not a folder; expected a sweep folder or a folder of run folders")
    root = runs_root(folder)
    found = sorted(p.parent for p in root.rglob(CONFIG_NAME)
                   if p.is_file() and REPORT_FOLDER not in p.relative_to(root).parts[:-1])
    if not found:
        raise FastFVAEError(f"no runs under {folder}; expected run folders (each holding {CONFIG_NAME}), "
                            f"e.g. a sweep folder's runs/ or `fastfvae train --out` folders")
    return found


def read_jsonl(path: Path):
    """(line number, record) for each line of a JSONL log. A torn last line (no newline: a write
    in progress) is skipped; any other line that is not a JSON object is a FastFVAEError."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FastFVAEError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: torn
                continue
            raise FastFVAEError(f"{path}:{number} is not JSON; expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise FastFVAEError(f"{path}:{number} is not a JSON object; expected one JSON object per line")
        records.append((number, record))
    return records


def metric_value(name: str, value, where: str):
    """A metric's score as a float (a dict: its `HEADLINE_KEYS` entry), None where it has none."""
    if isinstance(value, dict):
        value = value.get(HEADLINE_KEYS.get(name, ""))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FastFVAEError(f"{where}: {name} is {value!r}; expected a number or a dict of scores")
    return float(value)


def read_evaluations(path: Path) -> list[dict]:
    """The evaluations of an eval log, sorted by step (a repeated step: the later line wins)."""
    by_step = {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise FastFVAEError(f"{where} has step {step!r}; expected an integer step")
        evaluation = {"step": step}
        for key, value in record.items():
            if key in NON_METRIC_KEYS:
                continue
            name = METRIC_ALIASES.get(key, key)
            if name in evaluation and name != key:
                continue  # "recon" and its alias in one line: "recon" wins
            if name not in METRICS and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                continue  # another metric's dict of scores: no headline number known
            score = metric_value(name, value, where)
            if score is not None:
                evaluation[name] = score
        by_step[step] = evaluation
    return [by_step[s] for s in sorted(by_step)]


def load_run(path: Path, name: str) -> Run:
    """The `Run` of a run folder (its config.json and, if present, eval_log.jsonl)."""
    config_path = path / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise FastFVAEError(f"cannot read {config_path}: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError:
        raise FastFVAEError(f"{config_path} is not JSON; expected a run's config (fastfvae train writes it)") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise FastFVAEError(f"{config_path} has no \"model\"; expected a run's config (fastfvae train writes it)")
    hparams = config.get("hparams")
    if hparams is None:  # written before methods declared their hyperparameters
        hparams = {k: config[k] for k in LEGACY_HPARAM_FIELDS if k in config}
    if not isinstance(hparams, dict):
        raise FastFVAEError(f"{config_path}: hparams is {hparams!r}; expected an object of hyperparameters")
    eval_log = path / EVAL_LOG_NAME
    evaluations = read_evaluations(eval_log) if eval_log.is_file() else []
    return Run(name=name, path=path, method=config["model"], hparams=hparams, seed=config.get("seed"),
               dataset=config.get("dataset"), evaluations=evaluations)


def load_runs(folder: str | os.PathLike) -> list[Run]:
    """Every run under ``folder`` (`find_runs`), named by its path below the runs' root
    (a sweep's runs: the run folder's name)."""
    folder = Path(folder)
    root = runs_root(folder)
    runs = []
    for path in find_runs(folder):
        name = path.relative_to(root).as_posix() if path != root else path.resolve().name
        runs.append(load_run(path, name))
    return runs


# --- settings -----------------------------------------------------------------------------------

def _key(value):
    """A sort key for hyperparameter values of any JSON type (numbers by value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (1, json.dumps(value, sort_keys=True))
    return (0, float(value))


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def swept_names(runs: list[Run]) -> list[str]:
    """The hyperparameters (and ``dataset``) whose values differ across ``runs``, sorted."""
    names = sorted({k for r in runs for k in r.hparams})
    swept = [k for k in names if len({json.dumps(r.hparams.get(k), sort_keys=True) for r in runs}) > 1]
    if len({json.dumps(r.dataset) for r in runs}) > 1:
        swept.append("dataset")
    return swept


def setting_of(run: Run, swept: list[str]) -> tuple:
    return tuple(run.dataset if k == "dataset" else run.hparams.get(k) for k in swept)


def setting_label(swept: list[str], setting: tuple, method: str) -> str:
    """``beta=4``; ``beta=4, dataset=dsprites`` for a combination; the method's name when
    nothing is swept."""
    if not swept:
        return METHOD_TITLES.get(method, method)
    return ", ".join(f"{k}={format_value(v)}" for k, v in zip(swept, setting))


def methods_in_order(runs: list[Run]) -> list[str]:
    present = {r.method for r in runs}
    return [m for m in PAPER_ORDER if m in present] + sorted(present - set(PAPER_ORDER))


@dataclass
class Setting:
    """The runs (seeds) of one method at one setting of its swept hyperparameters."""

    method: str
    label: str
    runs: list
    color: tuple
    marker: str
    #: The hyperparameters whose values tell the method's settings apart (`swept_names`).
    swept: list


def settings(runs: list[Run]) -> dict[str, list[Setting]]:
    """{method: its `Setting`s, sorted by the swept values}, for every method in column order.
    Colours: one colour map per method, darker for later settings; one marker per method."""
    import matplotlib

    out = {}
    for index, method in enumerate(methods_in_order(runs)):
        mine = [r for r in runs if r.method == method]
        swept = swept_names(mine)
        groups: dict[tuple, list] = {}
        for r in mine:
            groups.setdefault(setting_of(r, swept), []).append(r)
        ordered = sorted(groups, key=lambda s: tuple(_key(v) for v in s))
        cmap = matplotlib.colormaps[METHOD_CMAPS[index % len(METHOD_CMAPS)]]
        shades = np.linspace(0.45, 0.95, len(ordered)) if len(ordered) > 1 else [0.75]
        out[method] = [Setting(method, setting_label(swept, s, method), groups[s], tuple(cmap(float(shade))),
                               METHOD_MARKERS[index % len(METHOD_MARKERS)], swept)
                       for s, shade in zip(ordered, shades)]
    return out


# --- tables -------------------------------------------------------------------------------------

def table_columns(runs: list[Run]) -> list[str]:
    hparams = sorted({k for r in runs for k in r.hparams})
    extra = sorted({k for r in runs for e in r.evaluations for k in e} - set(METRICS) - {"step"})
    return ["run", "method", *hparams, "seed", "dataset", "step", *METRICS, *extra]


def _row(run: Run, evaluation: dict) -> dict:
    row = {"run": run.name, "method": run.method, "seed": run.seed, "dataset": run.dataset}
    row.update(run.hparams)
    row.update(evaluation)
    return row


def results_rows(runs: list[Run]) -> list[dict]:
    """One row per (run, evaluation), in run then step order."""
    return [_row(r, e) for r in runs for e in r.evaluations]


def final_rows(runs: list[Run]) -> list[dict]:
    """One row per run that has an evaluation: its last one."""
    return [_row(r, r.final) for r in runs if r.final is not None]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict, bool)):
        return json.dumps(value)
    return str(value)


def csv_text(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


# --- statistics ---------------------------------------------------------------------------------

def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its Student-t confidence interval,
    mean -+ t_{(1+confidence)/2, n-1} * s / sqrt(n), with s the sample standard deviation
    (ddof=1). With one value the interval is undefined: (value, nan, nan)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    n = values.size
    if n < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def mean_curve(series: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Per step of any of the ``series`` ((steps, values) per seed): the mean over the seeds
    evaluated at that step, its t-interval and the number of seeds."""
    steps = np.unique(np.concatenate([s for s, _ in series])) if series else np.zeros(0, dtype=np.int64)
    out = {"steps": steps, "mean": [], "low": [], "high": [], "n": []}
    for step in steps:
        at = [v[s == step][-1] for s, v in series if np.any(s == step)]
        mean, low, high = t_interval(at)
        for k, x in zip(("mean", "low", "high", "n"), (mean, low, high, len(at))):
            out[k].append(x)
    for k in ("mean", "low", "high"):
        out[k] = np.array(out[k], dtype=np.float64)
    out["n"] = np.array(out["n"], dtype=np.int64)
    return out


def recon_source(runs: list[Run]) -> str:
    """Where a method's reconstruction error comes from: its eval logs' ``recon`` if any of its
    runs has one, else the training log's ``recon`` (the same quantity, BCE summed over pixels
    averaged over images, on training batches)."""
    return "eval_log" if any("recon" in e for r in runs for e in r.evaluations) else "train_log"


def _series(run: Run, metric: str, source: str):
    return run.train_series("recon") if metric == "recon" and source == "train_log" else run.series(metric)


# --- figures ------------------------------------------------------------------------------------

def figure3(runs: list[Run]) -> tuple[Figure, dict]:
    """Kim & Mnih 2018, Figure 3, one column per method: the `FIGURE3_ROWS` against training
    steps, a line per setting (mean over its seeds) with the 95% t-interval shaded where a step
    has two or more seeds.

    Returns (figure, plotted): ``plotted[(method, metric)] = {setting label: mean_curve(...)}``,
    plus ``plotted[(method, "recon_source")]`` (`recon_source`).
    """
    groups = settings(runs)
    methods = list(groups)
    fig = Figure(figsize=(4.6 * len(methods), 9.5), layout="constrained")
    axes = fig.subplots(len(FIGURE3_ROWS), len(methods), squeeze=False, sharex="col")
    plotted = {}
    for col, method in enumerate(methods):
        source = recon_source([r for s in groups[method] for r in s.runs])
        plotted[(method, "recon_source")] = source
        for row, metric in enumerate(FIGURE3_ROWS):
            ax = axes[row, col]
            curves = {}
            for setting in groups[method]:
                series = [x for x in (_series(r, metric, source) for r in setting.runs) if x[0].size]
                if not series:
                    continue
                curve = mean_curve(series)
                curves[setting.label] = curve
                ax.plot(curve["steps"], curve["mean"], color=setting.color, marker=".", label=setting.label)
                shaded = curve["n"] >= 2
                if shaded.any():
                    # drawn within the metric's range: with 2 seeds t(0.975, 1) = 12.7 puts a
                    # score's interval far outside [0, 1] (the curve's numbers keep it whole)
                    low, high = METRIC_RANGE.get(metric, (-np.inf, np.inf))
                    ax.fill_between(curve["steps"][shaded], np.clip(curve["low"][shaded], low, high),
                                    np.clip(curve["high"][shaded], low, high),
                                    color=setting.color, alpha=0.25, linewidth=0)
            plotted[(method, metric)] = curves
            title = f"{METHOD_TITLES.get(method, method)}: {METRIC_LABELS[metric].split(' (')[0]}"
            if metric == "recon" and source == "train_log":
                title += " (training log)"
            ax.set_title(title)
            ax.set_xlabel("training steps")
            ax.set_ylabel(METRIC_LABELS[metric])
            ax.grid(alpha=0.3)
            if curves:
                ax.legend(fontsize="small", title=", ".join(groups[method][0].swept) or None)
            else:
                ax.text(0.5, 0.5, "not evaluated", transform=ax.transAxes, ha="center", va="center", color="grey")
    sep = "\n" if len(methods) < 2 else " "  # one column is too narrow for the title on one line
    fig.suptitle(f"Kim & Mnih 2018, Figure 3:{sep}mean over seeds, shaded {CONFIDENCE:.0%} t-interval")
    return fig, plotted


def final_recon(run: Run, source: str):
    """A run's final reconstruction error: its last evaluation's ``recon`` (eval_log source) or
    the training log's last ``recon`` (train_log source); None if it has none."""
    if source == "train_log":
        _, values = run.train_series("recon")
        return float(values[-1]) if values.size else None
    return run.final.get("recon") if run.final else None


def scatter_figure(runs: list[Run]) -> tuple[Figure, dict]:
    """Per `SCATTER_METRICS` panel, one point per run: its final score (last evaluation) against
    its final reconstruction error; colour per (method, setting), marker per method.

    Returns (figure, plotted): ``plotted[metric] = [{"run", "method", "setting", "recon", "score"}]``.
    """
    groups = settings(runs)
    fig = Figure(figsize=(6.2 * len(SCATTER_METRICS), 5.2), layout="constrained")
    axes = fig.subplots(1, len(SCATTER_METRICS), squeeze=False)[0]
    plotted = {}
    for ax, metric in zip(axes, SCATTER_METRICS):
        points = []
        for method, method_settings in groups.items():
            source = recon_source([r for s in method_settings for r in s.runs])
            for setting in method_settings:
                mine = []
                for r in setting.runs:
                    recon, score = final_recon(r, source), (r.final or {}).get(metric)
                    if recon is not None and score is not None:
                        mine.append({"run": r.name, "method": method, "setting": setting.label,
                                     "recon": recon, "score": score})
                if mine:
                    label = setting.label if setting.label.startswith(METHOD_TITLES.get(method, method)) \
                        else f"{METHOD_TITLES.get(method, method)} {setting.label}"
                    ax.scatter([p["recon"] for p in mine], [p["score"] for p in mine], color=setting.color,
                               marker=setting.marker, edgecolors="black", linewidths=0.5, s=45, label=label)
                points += mine
        plotted[metric] = points
        ax.set_xlabel(f"final {METRIC_LABELS['recon']}")
        ax.set_ylabel(f"final {METRIC_LABELS[metric]}")
        ax.set_title(f"{METRIC_LABELS[metric]} vs reconstruction error")
        ax.grid(alpha=0.3)
        if points:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not evaluated", transform=ax.transAxes, ha="center", va="center", color="grey")
    fig.suptitle("Final disentanglement against final reconstruction error, one point per run")
    return fig, plotted


def violin_figure(runs: list[Run]) -> tuple[Figure, dict]:
    """One panel per metric some run's last evaluation has; in each, one violin per method of its
    runs' final scores (every setting and seed), the scores drawn over it as points. A method
    with fewer than two distinct scores gets its points only (no density to draw).

    Returns (figure, plotted): ``plotted[metric] = {method: [final scores]}``.
    """
    groups = settings(runs)
    methods = list(groups)
    finals = [r for r in runs if r.final is not None]
    metrics = [m for m in METRICS if any(m in r.final for r in finals)]
    fig = Figure(figsize=(max(3.2, 0.9 * len(methods) + 1.6) * max(len(metrics), 1), 4.6), layout="constrained")
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    plotted = {}
    for ax, metric in zip(axes, metrics):
        scores = {m: [r.final[metric] for r in finals if r.method == m and metric in r.final] for m in methods}
        scores = {m: v for m, v in scores.items() if v}
        plotted[metric] = scores
        positions = np.arange(1, len(scores) + 1)
        spread = [(p, v) for p, v in zip(positions, scores.values()) if len(set(v)) > 1]
        if spread:
            parts = ax.violinplot([v for _, v in spread], positions=[p for p, _ in spread], showmeans=True)
            colors = {p: groups[m][len(groups[m]) // 2].color for p, m in zip(positions, scores)}
            for body, (p, _) in zip(parts["bodies"], spread):
                body.set_facecolor(colors[p])
        for p, v in zip(positions, scores.values()):
            offsets = np.linspace(-0.08, 0.08, len(v)) if len(v) > 1 else np.zeros(1)
            ax.scatter(p + offsets, v, color="black", s=10, zorder=3)
        ax.set_xticks(positions, [METHOD_TITLES.get(m, m) for m in scores], rotation=20)
        ax.set_xlabel("method")
        ax.set_ylabel(f"final {METRIC_LABELS[metric]}")
        ax.set_title(f"final {METRIC_LABELS[metric].split(' (')[0]} per method")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Final scores per method (all settings and seeds)")
    return fig, plotted


# --- writing ------------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """``write(temp_path)``, then rename over ``path``: a failed write leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_figure(fig: Figure, path: Path) -> None:
    fmt = path.suffix.lstrip(".")
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))


@dataclass
class Report:
    """What `write_report` wrote and the numbers behind it."""

    out: Path
    runs: list
    files: list
    figures: dict
    plotted: dict
    without_evaluations: list


def check_tensorboard() -> None:
    """FastFVAEError (one line) unless the ``[tb]`` extra (the tensorboard package) imports."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise FastFVAEError("--tensorboard needs the tensorboard package; install it with "
                            "pip install 'fastfvae[tb]'") from None


def write_tensorboard(runs: list[Run], out: Path) -> list[Path]:
    """One TensorBoard event folder per run under ``out``: ``eval/<metric>`` scalars at each
    evaluation step (the tables' numbers) and ``train/<key>`` for each train_log.jsonl number."""
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    folders = []
    for run in runs:
        folder = out / run.name
        writer = SummaryWriter(log_dir=str(folder))
        try:
            writer.add_text("config", json.dumps({"method": run.method, "hparams": run.hparams, "seed": run.seed,
                                                  "dataset": run.dataset}, sort_keys=True))
            for evaluation in run.evaluations:
                for metric, value in evaluation.items():
                    if metric != "step":
                        writer.add_scalar(f"eval/{metric}", value, evaluation["step"])
            train_log = run.path / TRAIN_LOG_NAME
            for _, line in read_jsonl(train_log) if train_log.is_file() else []:
                for key, value in line.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        writer.add_scalar(f"train/{key}", value, int(line["step"]))
        finally:
            writer.close()
        folders.append(folder)
    return folders


def write_report(folder: str | os.PathLike, out: str | os.PathLike | None = None,
                 tensorboard: bool = False) -> Report:
    """Read every run under ``folder`` and write the tables and figures into ``out`` (default
    ``folder/report``), plus ``out/tensorboard/<run>/`` with ``tensorboard=True``.

    Everything is read and checked before anything is written: no runs, no evaluations in any
    run, a bad log line, ``out`` not a folder or the tensorboard package missing are one-line
    FastFVAEErrors, leaving nothing behind. Each file is written whole (temp file, then
    renamed); a failed write removes a report folder this call created.
    """
    folder = Path(folder)
    if tensorboard:
        check_tensorboard()
    runs = load_runs(folder)
    evaluated = [r for r in runs if r.evaluations]
    if not evaluated:
        raise FastFVAEError(f"none of the {len(runs)} run(s) under {folder} has evaluations in {EVAL_LOG_NAME}; "
                            "expected runs trained with --eval-every N")
    out = Path(out) if out is not None else folder / REPORT_FOLDER
    if out.exists() and not out.is_dir():
        raise FastFVAEError(f"{out} exists and is not a folder; expected a folder for the report")

    columns = table_columns(evaluated)
    tables = {"results.csv": csv_text(columns, results_rows(evaluated)),
              "final.csv": csv_text(columns, final_rows(evaluated))}
    figures, plotted = {}, {}
    for name, draw in (("figure3", figure3), ("scatter", scatter_figure), ("violins", violin_figure)):
        figures[name], plotted[name] = draw(evaluated)

    created = not out.exists()
    files = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in tables.items():
            _atomic_write(out / name, lambda tmp, text=text: tmp.write_text(text))
            files.append(out / name)
        for name, fig in figures.items():
            for suffix in (".png", ".svg"):
                _save_figure(fig, out / f"{name}{suffix}")
                files.append(out / f"{name}{suffix}")
        if tensorboard:
            write_tensorboard(evaluated, out / "tensorboard")
            files.append(out / "tensorboard")
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise FastFVAEError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    return Report(out=out, runs=runs, files=files, figures=figures, plotted=plotted,
                  without_evaluations=[r.name for r in runs if not r.evaluations])
