"""`fastfvae sweep SPEC --out DIR`: train every run of a spec (or a preset), pack by pack.

Exit codes: 0 every run finished, 2 bad input (one line, nothing written), 1 a run diverged
(NaN/inf), 130 / 143 stopped by Ctrl-C / SIGTERM (checkpoints saved; the same command again
carries on).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys

from fastfvae.errors import FastFVAEError

DESCRIPTION = """\
Train the runs of a sweep spec (TOML [[block]] tables: run-config fields, hyperparameters,
seeds = [...], grid = { key = [values] }, eval = { every = N, metrics = [...], budget = "dlib" |
"training" }) or of a preset, as packs of runs that share their method, architecture and
dataset. Each run is a folder DIR/runs/<name> with the layout of a `fastfvae train` run;
DIR/sweep.json records them all. The same command again skips finished runs and resumes the
others; a spec may add runs to DIR, not change or remove them. Ctrl-C or SIGTERM stops after
the current step with checkpoints saved. A run that diverges (NaN/inf) is marked
(runs/<name>/diverged.json) and skipped while the others train on; the sweep then exits 1.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fastfvae.study.spec import PRESETS
    from fastfvae.study.sweep import DEFAULT_PACK_SIZE

    p.add_argument("spec", nargs="?", default=None, metavar="SPEC", help="the sweep spec (a TOML file)")
    p.add_argument("--preset", default=None, metavar="{" + ",".join(PRESETS) + "}",
                   help="a built-in sweep instead of SPEC: seed-fig3 (Kim & Mnih 2018, Figure 3: beta-VAE beta "
                        "1-16 and FactorVAE gamma 10-100, 10 seeds, 120 runs), dlib-dsprites (disentanglement_lib's "
                        "unsupervised_study_v1 on dSprites: 6 models x 6 values x 50 seeds, 1800 runs)")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep folder (new, empty, or this sweep's)")
    p.add_argument("--pack", type=int, default=None, metavar="K",
                   help="runs trained together per pack (default: the sweep folder's, else "
                        + ", ".join(f"{k} on {d}" for d, k in DEFAULT_PACK_SIZE.items())
                        + "; resume with the same K to continue bit-exactly)")
    p.add_argument("--device", default=None, metavar="{auto,cpu,cuda}",
                   help="train every run there (default: each block's device)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="every run trains N steps instead of the spec's (a quick try; the same DIR later "
                        "continues the runs to the spec's steps)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and packs, train nothing, write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress display (one line per pack instead)")
    p.add_argument("--ray", default=None, metavar="auto|HOST:PORT",
                   help="run the packs as tasks on a running Ray cluster (auto: the one started on this machine; "
                        "HOST:PORT: its head node); DIR must be on a filesystem every node shares. "
                        "Needs pip install 'fastfvae[ray]'")


def load(args: argparse.Namespace):
    from fastfvae.study.spec import load_spec, preset_spec

    if (args.spec is None) == (args.preset is None):
        raise FastFVAEError("give a spec file (SPEC) or --preset NAME, exactly one of them")
    if args.steps is not None and args.steps < 1:
        raise FastFVAEError(f"--steps must be an integer >= 1, got {args.steps}")
    return load_spec(args.spec) if args.spec is not None else preset_spec(args.preset)


def dry_run_lines(plan, packs) -> list[str]:
    from fastfvae.study.spec import format_value
    from fastfvae.study.sweep import describe_pack, diverged_record, saved_step

    lines = [f"sweep {plan.out}: {len(plan.runs)} runs in {len(packs)} packs (from {plan.spec.source})"]
    for index, pack in enumerate(packs, 1):
        lines.append(f"pack {index}/{len(packs)}: {describe_pack(pack)}")
        for run in pack:
            step, bad = saved_step(run.config), diverged_record(run.config)
            state = ("new" if step is None else "done" if step >= run.config.steps
                     else f"at step {step} of {run.config.steps}")
            if bad is not None:
                state = f"diverged at step {bad.get('step')} (kept: {state})"
            values = " ".join([*(f"{k}={format_value(v)}" for k, v in run.point), f"seed={run.seed}"])
            lines.append(f"  {run.name}  {values}  steps={run.config.steps}  {state}")
    return lines


def run(args: argparse.Namespace) -> int:
    from fastfvae.cli.train import callbacks_for, duration
    from fastfvae.study.sweep import DIVERGED_FILE, plan_sweep, run_sweep
    from fastfvae.train.loop import StoppedBeforeTraining, TrainingDiverged

    spec = load(args)
    out = os.path.abspath(args.out) if args.ray is not None else args.out  # the same path on every Ray node
    plan = plan_sweep(spec, out, steps=args.steps, device=args.device, pack_size=args.pack)
    packs = plan.packs()
    if args.dry_run:
        print("\n".join(dry_run_lines(plan, packs)))
        return 0
    console = None
    if not args.no_progress:
        from rich.console import Console

        console = Console(stderr=True)

    def status(line: str) -> None:
        if console is not None:
            from rich.text import Text

            console.print(Text(line, style="bold"))
        else:
            print(f"fastfvae: {line}", file=sys.stderr, flush=True)

    try:
        if args.ray is not None:
            from fastfvae.study.ray_backend import run_sweep_on_ray

            result = run_sweep_on_ray(plan, args.ray, callbacks_for=functools.partial(_callbacks, args),
                                      status=status)
        else:
            result = run_sweep(plan, progress=not args.no_progress, console=console,
                               callbacks_for=lambda cfg, data: callbacks_for(cfg, args, data, evaluation=False),
                               status=status)
    except TrainingDiverged as exc:  # a divergence run_pack could not attribute to a run
        print(f"fastfvae: error: {exc}", file=sys.stderr)
        return 1
    except StoppedBeforeTraining as exc:
        print(f"fastfvae: {exc}; continue with the same command", file=sys.stderr)
        return 128 + int(exc.signum)
    if result.status == "interrupted":
        how = "stopped by SIGTERM" if result.stop_signal == signal.SIGTERM else "interrupted"
        where = f" in pack {result.pack}" if result.pack is not None else ""
        print(f"fastfvae: sweep {how}{where}; checkpoints saved, {result.done}/{result.runs} runs "
              f"done (continue with the same command)", file=sys.stderr)
        return 128 + int(result.stop_signal or signal.SIGINT)
    print(f"fastfvae: sweep {plan.out}: {result.done}/{result.runs} runs done ({len(result.trained)} trained now, "
          f"{duration(result.seconds)})", file=sys.stderr)
    if result.diverged:
        names = ", ".join(result.diverged)
        print(f"fastfvae: error: {len(result.diverged)} run(s) diverged (NaN/inf): {names}; each keeps its last good "
              f"checkpoint, if it saved one, and says where in runs/<name>/{DIVERGED_FILE} (delete that file to "
              "train it again)",
              file=sys.stderr)
        return 1
    return 0


def _callbacks(args: argparse.Namespace, cfg, data):
    """`fastfvae.cli.train.callbacks_for` of a Ray task's run (a module-level function: it pickles),
    without the evaluation: the run's pack evaluates it."""
    from fastfvae.cli.train import callbacks_for

    return callbacks_for(cfg, args, data, evaluation=False)


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="train many runs (a grid of hyperparameters x seeds) as packs",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
