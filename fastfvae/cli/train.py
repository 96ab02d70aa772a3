"""`fastfvae train`: train FactorVAE or beta-VAE on dSprites, then draw the run's figures.

Flags map onto `fastfvae.train.config.TrainConfig` fields; a flag left out keeps the value
of the preset (``--preset``), of the resumed checkpoint (``--resume``), or the paper default.
A new run uses the fast step (`fastfvae.fast`, equal to the reference within its parity
tolerance) unless ``--reference`` (alias ``--no-fast``) asks for the readable reference loop; a
resumed run keeps the step it was trained with unless ``--fast`` / ``--reference`` says
otherwise. A flag that would do nothing in the chosen mode (``--precision bf16`` or
``--loader`` with ``--reference``, ``--beta`` with FactorVAE, ``--gamma`` / ``--d-steps`` /
``--perm-batch`` with beta-VAE) is refused with one line rather than ignored; ``--reference``
on a fast preset or run (the bf16 quickstart) sets precision and loader back to fp32 / device,
so a checkpoint of either step resumes under the other.

Exit codes: 0 done (the last lines name the checkpoint and figures and give the time taken
and steps/s), 2 bad input or an unwritable checkpoint (one line), 1 the run diverged (NaN/inf),
130 / 143 stopped by Ctrl-C / SIGTERM (after a checkpoint; before the first step: nothing written).

Extension points for other parts: `add_arguments` (more flags), `overrides_from_args`
(flag -> field), `step_builder_for` (the step implementation), `callbacks_for` (per-step hooks).
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import time

from fastfvae.train.checkpoint import checkpoint_path
from fastfvae.train.config import (
    FAST_ONLY, LOADERS, MODELS, PERM_BATCHES, PRECISIONS, PRESETS, TrainConfig, check_settings_apply, preset,
)
from fastfvae.train.loop import (
    ResumePoint, RunResult, StoppedBeforeTraining, TrainingDiverged, read_resume_point, run_training,
)
from fastfvae.train.progress import LOG_NAME, read_log

DEFAULTS = TrainConfig()

DESCRIPTION = """\
Train FactorVAE (Kim & Mnih 2018) or beta-VAE on dSprites.

Without --data it uses the cached real dSprites file if there is one, else the procedural
dSprites (identical content, rendered on the fly). Writes into --out: config.json,
train_log.jsonl, checkpoint.pt, reconstructions.png, traversals.png, traversals.gif and
loss_curves.png. One run per --out at a time (a second one is refused). Ctrl-C or SIGTERM
stops after the current step and saves a checkpoint; --resume continues a run bit-exactly
(CPU). New runs use the fast step (same algorithm, parity-tested); --reference runs the
readable reference loop.
"""

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train flags. Choices are checked by TrainConfig.validate / preset(), not argparse, so a
    bad value is a one-line FastFVAEError (exit 2) like every other bad input."""
    d = DEFAULTS
    p.add_argument("--model", metavar="{" + ",".join(MODELS) + "}", default=None,
                   help=f"factorvae: recon + KL + gamma*TC with a discriminator; betavae: recon + beta*KL "
                        f"(default {d.model})")
    p.add_argument("--gamma", type=float, default=None, help=f"FactorVAE TC weight, >= 0 (default {d.gamma:g})")
    p.add_argument("--beta", type=float, default=None, help=f"beta-VAE KL weight, >= 0 (default {d.beta:g})")
    p.add_argument("--steps", type=int, default=None, help=f"total VAE updates (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per batch, >= 2 (default {d.batch_size})")
    p.add_argument("--z-dim", type=int, default=None, help=f"latent dimensions, >= 1 (default {d.z_dim})")
    p.add_argument("--d-steps", type=int, default=None,
                   help=f"discriminator updates per VAE update (default {d.d_steps}; the paper preset uses 5)")
    p.add_argument("--perm-batch", metavar="{" + ",".join(PERM_BATCHES) + "}", default=None,
                   help="where D's permuted codes come from: 'second' = a second batch (paper's Algorithm 1), "
                        f"'same' = the VAE's batch (disentanglement_lib) (default {d.perm_batch})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed for init, batch order and noise, in [0, 2**63) (default {d.seed})")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="dSprites .npz/.hdf5 file (default: cached real file, else procedural dSprites)")
    p.add_argument("--device", metavar="{auto,cpu,cuda}", default=None,
                   help=f"where to train; auto = cuda if available (default {d.device})")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"run folder; must not hold a run unless resuming (default {d.out}; "
                        "with --resume: the resumed run's folder)")
    p.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                   help=f"checkpoint every N steps, 0 = only at the end (default {d.ckpt_every})")
    p.add_argument("--log-every", type=int, default=None, metavar="N",
                   help=f"log a JSONL line every N steps (default {d.log_every})")
    p.add_argument("--resume", default=None, metavar="DIR|CKPT",
                   help="continue the run in DIR (or from checkpoint file CKPT) with its saved config; "
                        "only --steps, --out, --data, --device, --ckpt-every, --log-every and the fast-path / "
                        "evaluation flags may change")
    p.add_argument("--preset", metavar="{" + ",".join(PRESETS) + "}", default=None,
                   help="start from a named config: paper (Kim & Mnih 2018, Section 6: gamma 35, 5 D steps, second batch, "
                        "300k steps), dlib (disentanglement_lib: FC 256, same-batch permutation, 300k steps), quickstart "
                        "(a first run of a few minutes on 2 CPU cores: gamma 50, larger learning rates, bf16, 5k steps)")
    p.add_argument("--fast", dest="fast", action="store_const", const=True, default=None,
                   help="the fast path (fastfvae.fast): same algorithm, fused step with less work (default "
                        "for new runs; a resumed run keeps its own step unless this flag or --reference is given)")
    p.add_argument("--reference", "--no-fast", dest="fast", action="store_const", const=False,
                   help="the readable reference loop (fastfvae.train.reference) instead of the fast path")
    p.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}", default=None,
                   help=f"fast path only: arithmetic: fp32 (parity with the reference) or bf16 (convolutions and GEMMs in bfloat16; weights, optimiser state and losses fp32) (default {d.precision})")
    p.add_argument("--loader", metavar="{" + ",".join(LOADERS) + "}", default=None,
                   help=f"fast path only: batches from device (resident bit-packed set), dali, torch (default {d.loader})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures at the end of the run")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="every N steps log the FactorVAE metric (dlib settings) to <out>/eval_log.jsonl; "
                        f"0 = never (default {d.eval_every})")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given explicitly on the command line (flag dest == field name)."""
    fields = TrainConfig.__dataclass_fields__
    return {dest: value for dest, value in vars(args).items() if dest in fields and value is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset / resumed config / defaults, then the explicit flags on top; validated, and
    refused (FastFVAEError) if an explicit flag would do nothing in the resulting mode."""
    return config_and_resume_point(args)[0]


def config_and_resume_point(args: argparse.Namespace) -> tuple[TrainConfig, ResumePoint | None]:
    """`config_from_args`, and the `ResumePoint` read for ``--resume`` (None without it), so the
    run does not read the checkpoint a second time."""
    point = read_resume_point(args.resume) if args.resume is not None else None
    if args.preset is not None:
        base, source = preset(args.preset), f"--preset {args.preset}"
    elif point is not None:
        base = point.config
        source = f"the resumed run's config ({checkpoint_path(args.resume)})"
    else:
        base, source = TrainConfig(), "the default config"
    overrides = overrides_from_args(args)
    given = set(overrides)
    if "fast" not in overrides and args.resume is None:
        overrides["fast"] = True  # the fast path for every new run (fp32: the reference within parity tolerance)
    if overrides.get("fast") is False:
        # --reference on a fast preset or run: its fast-only settings give way to the reference
        # step's (explicit --precision / --loader flags are still refused below)
        for name in FAST_ONLY:
            overrides.setdefault(name, getattr(DEFAULTS, name))
    if args.resume is not None and "out" not in overrides:
        overrides["out"] = str(checkpoint_path(args.resume).parent)
    cfg = base.replace(**overrides).validate()
    check_settings_apply(cfg, given, source)
    return cfg, point


def step_builder_for(cfg: TrainConfig):
    """The step implementation for ``cfg``: None = the reference step."""
    if cfg.fast:
        from fastfvae.fast import make_fast_step

        return make_fast_step
    return None


def training_data(cfg: TrainConfig):
    """A zero-argument function loading ``cfg.data`` on its first call only, so the run and its
    callbacks share one copy of the dataset (and a bad --out fails before it is loaded)."""
    from fastfvae.train import loop

    return functools.cache(lambda: loop.load_training_data(cfg.data))


def callbacks_for(cfg: TrainConfig, args: argparse.Namespace, data=None) -> list:
    """Per-step callbacks: the periodic FactorVAE metric with ``--eval-every N``. ``data``: the
    run's `training_data` (default: a loader of its own)."""
    if not cfg.eval_every:
        return []
    from fastfvae.metrics.periodic import periodic_factor_vae

    return [periodic_factor_vae(cfg.eval_every, data or training_data(cfg), out_dir=cfg.out)]


def write_outputs(result: RunResult, args: argparse.Namespace) -> dict:
    """The run's figures ({name: path}; none with --no-figures or for an interrupted run)."""
    from fastfvae.viz.figures import write_run_figures

    if args.no_figures or result.status != "completed":
        return {}
    records = read_log(result.out / LOG_NAME) if (result.out / LOG_NAME).exists() else []
    return write_run_figures(result.state.models.vae, result.data, result.out, records)


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 07 s``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def summary_lines(cfg: TrainConfig, result: RunResult, figures: dict, total_s: float) -> list[str]:
    """What a finished run prints: how long it took, the checkpoint, the figures to open."""
    start = result.state.step - result.steps_run
    what = f"for {result.state.step} steps" if start == 0 else f"from step {start} to {result.state.step}"
    rate = result.steps_run / result.seconds if result.seconds > 0 else float("nan")
    lines = [f"trained {cfg.model} {what} in {duration(result.seconds)} ({rate:.1f} steps/s; "
             f"{duration(total_s)} in all with set-up{' and figures' if figures else ''})",
             f"checkpoint: {result.checkpoint}"]
    if figures:
        lines.append(f"figures: {', '.join(str(p) for p in figures.values())}")
    return lines


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg, point = config_and_resume_point(args)
    if point is not None and point.payload is None:
        print(f"fastfvae: {checkpoint_path(args.resume).parent} has no checkpoint (its run stopped before the "
              f"first one): starting it again from step 0 with its config.json", file=sys.stderr)
    data = training_data(cfg)
    figures: dict = {}

    def finish(result: RunResult) -> None:  # inside the run: the folder is still this process's
        figures.update(write_outputs(result, args))

    try:
        result = run_training(cfg, data=data, resume=args.resume, resume_from=point, step_builder=step_builder_for(cfg),
                              callbacks=callbacks_for(cfg, args, data), progress=not args.no_progress,
                              on_finish=finish)
    except TrainingDiverged as exc:
        print(f"fastfvae: error: {exc}", file=sys.stderr)
        return 1
    except StoppedBeforeTraining as exc:
        print(f"fastfvae: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    step = result.state.step
    if result.status == "interrupted":
        how = "stopped by SIGTERM" if result.stop_signal == signal.SIGTERM else "interrupted"
        print(f"fastfvae: {how} at step {step}; checkpoint saved to {result.checkpoint} "
              f"(continue with: fastfvae train --resume {result.out})", file=sys.stderr)
        return 128 + int(result.stop_signal or signal.SIGINT)
    for line in summary_lines(cfg, result, figures, time.perf_counter() - t0):
        print(line, file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train FactorVAE / beta-VAE on dSprites", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
