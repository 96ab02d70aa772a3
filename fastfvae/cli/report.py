"""`fastfvae report DIR`: tables and figures of a sweep, or of any folder of run folders.

The work is `fastfvae.viz.report.write_report`; this module maps the flags onto it and prints
what it wrote. Exit codes: 0 written, 2 bad input (no runs, no evaluations, a bad log line, an
unwritable report folder, --tensorboard without the tensorboard package: one line).
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Read every run under DIR (a sweep folder: DIR/runs/*; or any folder holding run folders,
each a folder with config.json, at any depth) and write into DIR/report (or --out):
results.csv (one row per run and evaluation step: run, method, hyperparameters, seed,
dataset, step, factor_vae, beta_vae, mig, sap, dci, recon, numbers as in eval_log.jsonl),
final.csv (each run's last evaluation), and as PNG and SVG: figure3 (Kim & Mnih 2018,
Figure 3: reconstruction error, beta-VAE metric and FactorVAE metric against training steps,
a column per method, a line per setting of its swept hyperparameter, mean over seeds with a
shaded 95% Student-t interval), scatter (final FactorVAE / beta-VAE metric against final
reconstruction error, a point per run) and violins (final scores per method, a panel per
metric). --tensorboard also writes TensorBoard event files per run (pip install 'fastfvae[tb]').
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="tables and figures (paper Figure 3) of a sweep or folder of runs",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="a sweep folder, or a folder holding run folders")
    p.add_argument("--out", default=None, metavar="OUT", help="the report folder (default: DIR/report)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files, OUT/tensorboard/<run>/ (needs the [tb] extra)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastfvae.viz.report import write_report

    report = write_report(args.dir, out=args.out, tensorboard=args.tensorboard)
    methods = sorted({r.method for r in report.runs})
    evaluations = sum(len(r.evaluations) for r in report.runs)
    if report.without_evaluations:
        shown = ", ".join(report.without_evaluations[:5]) + (" ..." if len(report.without_evaluations) > 5 else "")
        print(f"note: {len(report.without_evaluations)} run(s) without evaluations left out: {shown}", file=sys.stderr)
    print(f"{len(report.runs)} run(s) ({', '.join(methods)}), {evaluations} evaluation(s)")
    for path in report.files:
        print(f"wrote {path}")
    return 0
