"""`fastfvae traverse CKPT`: redraw a run's figures (reconstructions, traversals PNG/GIF, loss curves).

The images shown come from the run's dataset (its config's ``dataset`` and ``data``, through
`fastfvae.data.registry`; ``--data PATH`` replaces the file): gray figures for a 1-channel
dataset, RGB for a 3-channel one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastfvae.cli.eval import run_dataset
from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import checkpoint_path, load_models
from fastfvae.train import loop
from fastfvae.train.progress import LOG_NAME, read_log

DESCRIPTION = """\
Draw the figures of a trained model: reconstructions.png, traversals.png (each latent dim
swept over [-3, 3] around a few fixed images, one row per dim, dims ordered by KL),
traversals.gif, and loss_curves.png when the run's train_log.jsonl is beside the checkpoint.
The images come from the run's dataset (RGB figures for a colour one).
"""


def run(args: argparse.Namespace) -> int:
    from fastfvae.viz.figures import write_run_figures

    if args.images < 1:
        raise FastFVAEError(f"--images must be >= 1, got {args.images}")
    vae, _, cfg = load_models(args.checkpoint)
    run_dir = checkpoint_path(args.checkpoint).parent
    out = Path(args.out) if args.out else run_dir
    # loop.load_training_data looked up when called, like the train command's (one place to replace it)
    dataset, data_path = run_dataset(cfg, args.data)
    data = loop.make_out_then_load(out, lambda: loop.load_training_data(data_path, dataset))
    log = run_dir / LOG_NAME
    records = read_log(log) if log.exists() else None
    paths = write_run_figures(vae, data, out, records, num_images=args.images)
    print(f"figures: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("traverse", help="draw a checkpoint's reconstructions and latent traversals",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="a run folder or a checkpoint.pt file")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the figures (default: the run folder)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="the run's dataset file for the images shown (default: the run's --data, else the "
                        "dataset's default)")
    p.add_argument("--images", type=int, default=3, metavar="N", help="fixed images in the traversals (default 3)")
    p.set_defaults(func=run)
