"""`fastfvae eval`: disentanglement scores of a checkpoint (or a code table), dlib-identical.

``fastfvae eval CKPT`` loads the VAE of a fastfvae checkpoint (a run folder or a .pt file)
and the run's dataset (its config's ``dataset`` and ``data``: any registered dataset,
`fastfvae.data.registry`; ``--data PATH`` replaces the file), encodes every image once as
the model sees it (`fastfvae.metrics.encode`) and scores the code table; ``CKPT`` may also
be an .npz holding ``codes`` [rows, D] and ``factor_sizes`` (a precomputed table, no model
needed).
Prints a table of every score with the seconds each metric took; ``--json`` writes them.

Everything is checked before the model is loaded or any image encoded: the metric names
(``--metrics a b`` or ``--metrics a,b``, before or after CKPT), ``--config``, ``--data``
(a readable file) and ``--json`` (its folder exists and accepts a new file; nothing is
created until the scores are written).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fastfvae.data.paths import check_input_file, check_output_file
from fastfvae.errors import FastFVAEError
from fastfvae.metrics.encode import CPU_BATCH_SIZE, DEVICE_BATCH_SIZE, PRECISIONS, check_precision
from fastfvae.metrics.evaluate import (
    DEFAULT_METRICS, METRICS, MODEL_METRICS, check_metric_names, evaluate_codes, evaluate_model,
)

DESCRIPTION = """\
Score a trained model with disentanglement_lib 1.5's metrics (bit-for-bit the same numbers
for the same codes and seed): factor_vae, beta_vae, mig, sap, dci (parity mode), plus
dci_fast (HistGradientBoosting, NOT dlib-identical), gaussian_tc (unsupervised: Gaussian
total correlation, Wasserstein correlation, mean pairwise MI of the codes) and reconstruction
(mean BCE per image; checkpoints only). Defaults are dlib's study settings; DCI at those
sizes takes minutes on a CPU (drop it with --metrics or use --fast-dci).
"""

#: Every metric name eval accepts, from the registry of fastfvae.metrics.evaluate.
KNOWN_METRICS = (*METRICS, *MODEL_METRICS)
#: What --data must be (checked readable before the model is loaded, when the dataset is
#: not known yet; the dataset's loader says more about a file it cannot read).
EXPECTED_DATA_FILE = "the run's dataset file (dSprites .npz/.hdf5, 3dshapes.h5)"
#: The dataset of a checkpoint whose config names none.
DEFAULT_DATASET = "dsprites"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="disentanglement metrics of a checkpoint or code table",
                              usage="%(prog)s CKPT [--metrics NAME[,NAME...]] [options]",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    # CKPT is optional to argparse only so that `--metrics a b CKPT` works: --metrics takes
    # every word after it, and `split_checkpoint` moves a trailing non-metric word back.
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None,
                   help="run folder, checkpoint.pt, or .npz code table (codes, factor_sizes)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help=f"metrics to compute, space- or comma-separated, from: {', '.join(KNOWN_METRICS)} "
                        f"(default: {','.join(DEFAULT_METRICS)}); CKPT may come before or after them")
    p.add_argument("--seed", type=int, default=0, help="seed of each metric's fresh RandomState, in [0, 2**32) (default 0)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="the run's dataset file, dSprites .npz/.hdf5 or 3dshapes.h5 (default: the run's "
                        "--data, else the dataset's default: for dSprites the cached real file, else the "
                        "procedural set)")
    p.add_argument("--fast-dci", action="store_true", help="replace dci by dci_fast (not dlib-identical)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help='per-metric settings with dlib names, e.g. \'{"dci": {"num_train": 2000}}\'')
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per encoder batch (default {CPU_BATCH_SIZE} on a CPU, {DEVICE_BATCH_SIZE} on a GPU)")
    p.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}", default="fp32",
                   help="encoder arithmetic: fp32, or bf16 autocast (faster; its codes differ from fp32's by "
                        "~1e-3, which can move a score: docs/metrics.md) (default fp32)")
    p.add_argument("--channels-last", action="store_true",
                   help="encode with a channels_last copy of the model (about 1.2x faster on a CPU; codes "
                        "differ in the last bits, which can move beta-VAE's score in the third decimal)")
    p.add_argument("--device", default=None, help="torch device for encoding (default: cuda if available, else cpu)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the scores and timings as JSON")
    p.set_defaults(func=run)


def parse_config(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FastFVAEError(f"--config is not valid JSON ({exc.msg}); expected e.g. '{{\"dci\": {{\"num_train\": 2000}}}}'") from None
    if not isinstance(config, dict):
        raise FastFVAEError("--config must be a JSON object of metric name -> settings")
    return config


def _split_names(words) -> list[str]:
    return [name for word in words for name in word.split(",") if name]


def _looks_like_metric(word: str) -> bool:
    """A word with no path separator and no extension: a mistyped metric name, not a path."""
    return os.sep not in word and "/" not in word and not Path(word).suffix


def split_checkpoint(args) -> None:
    """Take CKPT from the end of ``--metrics`` when it was given after them.

    ``eval --metrics factor_vae runs/x`` hands argparse a greedy ``--metrics`` that swallows
    the checkpoint; a last word that is not (a comma-separated list of) metric names is the
    checkpoint, unless it is no path and looks like a mistyped metric name (no path separator,
    no extension): that is reported as an unknown metric, not as a missing file. Sets
    ``args.ckpt`` and ``args.metrics``; raises when there is no CKPT.
    """
    if args.ckpt is None and args.metrics:
        last = args.metrics[-1]
        unknown = [name for name in _split_names([last]) if name not in KNOWN_METRICS]
        if unknown and not os.path.exists(last) and all(_looks_like_metric(name) for name in unknown):
            raise FastFVAEError(f"unknown metric {unknown[0]!r}; expected one of {', '.join(KNOWN_METRICS)} "
                                "(and no CKPT given: a run folder, checkpoint.pt or .npz code table)")
        if unknown:
            args.ckpt, args.metrics = last, args.metrics[:-1]
            if not args.metrics:
                raise FastFVAEError(f"--metrics is followed by {last!r} only; expected metric names, "
                                    f"e.g. --metrics factor_vae,mig {last}")
    if args.ckpt is None:
        raise FastFVAEError("no CKPT given; expected a run folder, checkpoint.pt or .npz code table, "
                            "e.g. fastfvae eval runs/factorvae --metrics factor_vae")


def metric_names(args) -> tuple[str, ...]:
    """The metric names asked for (``--fast-dci`` applied), checked before any model or data is loaded."""
    given = DEFAULT_METRICS if args.metrics is None else _split_names(args.metrics)
    for name in given:
        if name not in KNOWN_METRICS and os.path.exists(name):
            raise FastFVAEError(f"--metrics got {name!r}, which is a path, not a metric; expected one CKPT "
                                f"and metric names from {', '.join(KNOWN_METRICS)}")
    names = [("dci_fast" if args.fast_dci and n == "dci" else n) for n in given]
    return check_metric_names(tuple(dict.fromkeys(names)), allow_model_metrics=Path(args.ckpt).suffix != ".npz")


def load_code_table(path: Path):
    """(codes, factor_sizes) of an .npz code table; raises if it is not one."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file under an .npz name
            raise FastFVAEError(f"{path} holds a single array, not an .npz archive; "
                                "expected a code table with 'codes' and 'factor_sizes'")
        with loaded as npz:
            if "codes" not in npz or "factor_sizes" not in npz:
                raise FastFVAEError(f"{path} holds {sorted(npz.files)}; expected a code table with 'codes' and 'factor_sizes'")
            return npz["codes"], npz["factor_sizes"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, FastFVAEError):
            raise
        raise FastFVAEError(f"cannot read {path} as an .npz code table: {str(exc).splitlines()[0][:200]}") from None


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FastFVAEError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastFVAEError("--device cuda asked for but CUDA is not available")
    return device


def _load_checkpoint(path: str, device):
    """(VAE, TrainConfig) of a fastfvae checkpoint (a run folder or a .pt file)."""
    try:
        from fastfvae.train.checkpoint import load_models
    except ImportError as exc:  # pragma: no cover - the train part ships it
        raise FastFVAEError(f"cannot load checkpoints here ({exc}); use an .npz code table") from None
    vae, _, cfg = load_models(path, map_location=device)
    return vae, cfg


def _load_data(dataset: str, path: str | None):
    """The ground-truth dataset ``dataset`` from ``path`` (None: the dataset's default)."""
    from fastfvae.data.registry import load_dataset

    return load_dataset(dataset, path)


def run_dataset(cfg, data_flag: str | None) -> tuple[str, str | None]:
    """(dataset name, file) of a run: its config's ``dataset`` (dSprites for a config that
    names none) and ``data``, the file replaced by ``--data`` when given."""
    dataset = getattr(cfg, "dataset", None) or DEFAULT_DATASET
    return dataset, data_flag if data_flag is not None else getattr(cfg, "data", None)


#: Seeds numpy's RandomState accepts (each metric draws from a fresh RandomState(seed)).
SEED_LIMIT = 2**32


def run(args) -> int:
    if not 0 <= args.seed < SEED_LIMIT:
        raise FastFVAEError(f"--seed must be in [0, 2**32) (numpy RandomState seeds), got {args.seed}")
    split_checkpoint(args)
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        raise FastFVAEError(f"no such file or folder: {ckpt}; expected a run folder, checkpoint.pt or .npz code table")
    metrics = metric_names(args)
    config = parse_config(args.config)
    check_precision(args.precision)
    if args.batch_size is not None and args.batch_size < 1:
        raise FastFVAEError(f"--batch-size must be >= 1 image, got {args.batch_size}")
    if args.json:  # every output is checked writable before the (minutes-long) encoding
        check_output_file(args.json, "--json")
    if args.data is not None and ckpt.suffix != ".npz":  # before the model is loaded
        check_input_file(Path(args.data).expanduser(), EXPECTED_DATA_FILE)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if ckpt.suffix == ".npz":
        codes, factor_sizes = load_code_table(ckpt)
        scores = evaluate_codes(codes, factor_sizes, metrics, args.seed, config, timings)
        source = {"codes": str(ckpt)}
    else:
        device = _device(args.device)
        from fastfvae.fast.precision import check_bf16_runs

        check_bf16_runs(args.precision, device)
        model, cfg = _load_checkpoint(str(ckpt), device)  # before the data: a bad checkpoint fails fast
        dataset, data_path = run_dataset(cfg, args.data)
        data = _load_data(dataset, data_path)
        scores = evaluate_model(model, data, metrics, args.seed, args.batch_size, device, config,
                                timings=timings, progress=True, precision=args.precision,
                                channels_last=args.channels_last)
        source = {"checkpoint": str(ckpt), "dataset": dataset, "data": getattr(data, "source", None),
                  "device": str(device), "precision": args.precision,
                  "channels_last": args.channels_last}
    total = time.perf_counter() - start
    print_table(scores, timings, total)
    if args.json:
        report = {"scores": scores, "seconds": timings, "total_seconds": total, "seed": args.seed,
                  "config": config or {}, **source}
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise FastFVAEError(f"cannot write --json {args.json}: {exc.strerror or exc}") from None
    return 0


def print_table(scores: dict, timings: dict, total: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fastfvae eval (disentanglement_lib 1.5 metrics)")
    table.add_column("metric")
    table.add_column("score")
    table.add_column("value", justify="right")
    table.add_column("seconds", justify="right")
    if "encode" in timings:
        table.add_row("(encode dataset)", "", "", f"{timings['encode']:.2f}")
    for name, values in scores.items():
        for i, (key, value) in enumerate(values.items()):
            seconds = f"{timings[name]:.2f}" if i == 0 and name in timings else ""
            shown = f"{value}" if isinstance(value, int) else f"{value:.6g}"
            table.add_row(name if i == 0 else "", key, shown, seconds)
    table.add_row("total", "", "", f"{total:.2f}")
    Console().print(table)
