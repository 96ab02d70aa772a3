"""`fastfvae train`: train a method (`fastfvae.methods`) on a dataset, then draw the run's figures.

Flags map onto `fastfvae.train.config.TrainConfig` fields; a flag left out keeps the value
of the preset (``--preset``), of the resumed checkpoint (``--resume``), or the paper default.
A new run uses the fast step (`fastfvae.fast`, equal to the reference within its parity
tolerance) unless ``--reference`` (alias ``--no-fast``) asks for the readable reference loop; a
resumed run keeps the step it was trained with unless ``--fast`` / ``--reference`` says
otherwise. Each method's hyperparameters are flags generated from its declaration
(``fastfvae train --model NAME --help`` lists them). A flag that would do nothing in the chosen
mode (``--precision bf16`` or ``--loader`` with ``--reference``, a hyperparameter the method does
not declare: ``--beta`` with FactorVAE; a FactorVAE ``--preset`` with another ``--model``) is refused
with one line rather than ignored; ``--reference``
on a fast preset or run (the bf16 quickstart) sets precision and loader back to fp32 / device,
so a checkpoint of either step resumes under the other. bf16 on a machine that cannot run it
(`fastfvae.fast.precision.bf16_support`: oneDNN refuses bf16 on an AVX2-only CPU) is refused
with one line when it was asked for (``--precision bf16``, a resumed bf16 run); a preset's bf16
trains in fp32 where bf16 would not be the faster choice, with a one-line notice.

Exit codes: 0 done (the last lines name the checkpoint and figures and give the time taken
and steps/s), 2 bad input or an unwritable checkpoint (one line), 1 the run diverged (NaN/inf),
130 / 143 stopped by Ctrl-C / SIGTERM (after a checkpoint; before the first step: nothing written).

Extension points for other parts: `add_arguments` (more flags), `overrides_from_args`
(flag -> field), `step_builder_for` (the step implementation), `callbacks_for` (per-step hooks).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from fastfvae.errors import FastFVAEError

from fastfvae.train.checkpoint import checkpoint_path
from fastfvae.train.config import (
    COMPILE_MODES, EVAL_BUDGETS, FAST_ONLY, LOADERS, NOISE_SOURCES, PRECISIONS, PRESETS, TrainConfig, check_settings_apply,
    methods_declaring, preset, preset_not_applying, preset_settings,
)
from fastfvae.train.loop import (
    ResumePoint, RunResult, StoppedBeforeTraining, TrainingDiverged, lazy_training_data, read_resume_point,
    run_training,
)
from fastfvae.train.progress import LOG_NAME, read_log

DEFAULTS = TrainConfig()

DESCRIPTION = """\
Train a VAE-family model (FactorVAE, Kim & Mnih 2018; beta-VAE; annealed VAE; DIP-VAE;
beta-TC-VAE; --model NAME --help lists a method's hyperparameters) on a ground-truth dataset.

Without --data it uses the dataset's default file (dSprites: the cached real file if there is
one, else the procedural dSprites, identical content rendered on the fly). Writes into --out:
config.json, train_log.jsonl, checkpoint.pt, reconstructions.png, traversals.png,
traversals.gif and loss_curves.png. One run per --out at a time (a second one is refused).
Ctrl-C or SIGTERM stops after the current step and saves a checkpoint; --resume continues a
run bit-exactly (CPU). New runs use the fast step (same algorithm, parity-tested);
--reference runs the readable reference loop.
"""


def _choices(values) -> str:
    return "{" + ",".join(values) + "}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def hparam_flags() -> dict[str, list]:
    """Every registered method's hyperparameters: {name: [(method, dataclass field), ...]}."""
    import dataclasses

    from fastfvae import methods

    flags: dict[str, list] = {}
    for name in methods.names():
        for f in dataclasses.fields(methods.get(name).Hparams):
            flags.setdefault(f.name, []).append((name, f))
    return flags


def _hparam_type(default):
    if isinstance(default, bool):
        return None
    return type(default) if isinstance(default, (int, float, str)) else None


def add_hparam_arguments(p, only: str | None = None) -> None:
    """One flag per hyperparameter name of the registered methods (or of method ``only``),
    generated from the methods' declarations; dest = the hyperparameter's name."""
    group = p.add_argument_group(f"{only} hyperparameters" if only else
                                 "method hyperparameters (fastfvae train --model NAME --help lists one method's)")
    for name, owners in hparam_flags().items():
        owners = [(m, f) for m, f in owners if only in (None, m)]
        if not owners:
            continue
        method, f = owners[0]
        default = f.default
        kwargs = {"default": None, "dest": name}
        if isinstance(default, tuple):
            kwargs.update(type=float, nargs=len(default), metavar=tuple("AB"[:len(default)]))
        elif _hparam_type(default) is not None:
            kwargs["type"] = _hparam_type(default)
        if only:
            source = f" [{f.metadata['source']}]" if f.metadata.get("source") else ""
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            kwargs["help"] = f"{f.metadata.get('help', '')} (default {shown}){source}".replace("%", "%%")
        else:
            kwargs["help"] = f"{f.metadata.get('help', '')} ({', '.join(m for m, _ in owners)})".replace("%", "%%")
        group.add_argument(_flag(name), **kwargs)


class _HelpForModel(argparse.Action):
    """``--help``: the flags, with one method's hyperparameters when ``--model`` came first."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        model = getattr(namespace, "model", None)
        from fastfvae import methods

        if model is None:
            parser.print_help()
        elif model in methods.names():
            shown = argparse.ArgumentParser(prog=parser.prog, description=parser.description,
                                            formatter_class=parser.formatter_class, add_help=False)
            add_arguments(shown, hparams_of=model)
            shown.print_help()
        else:  # the generic help would hide the typo: one line, as training with it would say
            try:
                methods.get(model)
            except FastFVAEError as exc:
                parser.exit(2, f"fastfvae: error: {exc}\n")
        parser.exit()


def add_arguments(p: argparse.ArgumentParser, hparams_of: str | None = None) -> None:
    """The train flags. Choices are checked by TrainConfig.validate / preset(), not argparse, so a
    bad value is a one-line FastFVAEError (exit 2) like every other bad input."""
    from fastfvae import methods
    from fastfvae.data.registry import DATASETS
    from fastfvae.metrics.evaluate import MAIN_SCORES

    d = DEFAULTS
    p.add_argument("-h", "--help", action=_HelpForModel, help="show this help (after --model NAME: that "
                   "method's hyperparameters) and exit")
    p.add_argument("--model", metavar=_choices(methods.names()), default=None,
                   help="the method: " + "; ".join(f"{n}: {methods.get(n).summary}" for n in methods.names())
                   + f" (default {d.model})")
    p.add_argument("--dataset", metavar=_choices(DATASETS), default=None,
                   help=f"the ground-truth dataset (default {d.dataset})")
    p.add_argument("--steps", type=int, default=None, help=f"total VAE updates (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per batch, >= 2 (default {d.batch_size})")
    p.add_argument("--z-dim", type=int, default=None, help=f"latent dimensions, >= 1 (default {d.z_dim})")
    p.add_argument("--fc-dim", type=int, default=None,
                   help=f"width of the encoder's / decoder's FC layer (default {d.fc_dim}; dlib 256)")
    p.add_argument("--vae-lr", type=float, default=None, help=f"VAE Adam learning rate (default {d.vae_lr:g})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed for init, batch order and noise, in [0, 2**63) (default {d.seed})")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="the dataset's file: dSprites .npz/.hdf5, 3dshapes.h5 (default: the dataset's "
                        "cached file; dSprites without one: the procedural set)")
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
    p.add_argument("--preset", metavar=_choices(PRESETS), default=None,
                   help="start from a named FactorVAE config: paper (Kim & Mnih 2018, Section 6: gamma 35, 5 D steps, "
                        "second batch, 300k steps), dlib (disentanglement_lib: FC 256, same-batch permutation, 300k "
                        "steps), quickstart (a first run of a few minutes on 2 CPU cores: gamma 50, larger learning "
                        "rates, bf16, 5k steps); with another --model it is refused, naming what would not apply")
    p.add_argument("--fast", dest="fast", action="store_const", const=True, default=None,
                   help="the fast path (fastfvae.fast): same algorithm, fused step with less work (default "
                        "for new runs; a resumed run keeps its own step unless this flag or --reference is given)")
    p.add_argument("--reference", "--no-fast", dest="fast", action="store_const", const=False,
                   help="the readable reference loop (fastfvae.train.reference) instead of the fast path")
    p.add_argument("--precision", metavar=_choices(PRECISIONS), default=None,
                   help=f"fast path only: arithmetic: fp32 (parity with the reference) or bf16 (convolutions and GEMMs in bfloat16; weights, optimiser state and losses fp32; refused on a CPU that cannot run it, see the last line of `fastfvae info`) (default {d.precision})")
    p.add_argument("--loader", metavar=_choices(LOADERS), default=None,
                   help=f"fast path only: batches from device (resident stored set), dali, torch (default {d.loader})")
    p.add_argument("--compile", metavar=_choices(COMPILE_MODES), default=None,
                   help="fast path only: torch.compile the networks (auto: on CUDA; default auto)")
    _switch(p, "cuda-graph", "fast path only: capture the whole iteration as one CUDA graph (default: on CUDA)")
    p.add_argument("--noise", metavar=_choices(NOISE_SOURCES), default=None,
                   help="fast path only: draw the step's noise on the host (the reference's stream) or on the "
                        "device inside the CUDA graph (default auto: device with a CUDA graph)")
    _switch(p, "by-hand", "fast path only: the CPU layers written out (default: when nothing is compiled)")
    _switch(p, "fused-ops", "fast path only: the fastfvae.ops Triton ops (default: on CUDA)")
    _switch(p, "channels-last", "fast path only: convolutions in channels_last (default on)")
    _switch(p, "fused-adam", "fast path only: fused Adam (default on; off needs --no-cuda-graph)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures at the end of the run")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="every N steps score the --eval-metrics (at --eval-budget) and append them to "
                        f"<out>/eval_log.jsonl; 0 = never (default {d.eval_every})")
    p.add_argument("--eval-metrics", nargs="+", action=_MetricNames, default=None, metavar="NAME",
                   help=f"what --eval-every scores, space- or comma-separated: {', '.join(MAIN_SCORES)} "
                        f"(default {','.join(d.eval_metrics)})")
    p.add_argument("--eval-budget", choices=EVAL_BUDGETS, default=None,
                   help="the sample budget of --eval-every: dlib = disentanglement_lib's settings, training = "
                        f"about a quarter of the rows, cheaper curves (default {d.eval_budget})")
    add_hparam_arguments(p, only=hparams_of)


class _MetricNames(argparse.Action):
    """``--eval-metrics a b`` or ``a,b``: a tuple of names (checked by `callbacks_for`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(name for value in values for name in value.split(",") if name))


def _switch(p, name: str, help: str) -> None:
    dest = name.replace("-", "_")
    p.add_argument("--" + name, dest=dest, action="store_const", const=True, default=None, help=help)
    p.add_argument("--no-" + name, dest=dest, action="store_const", const=False, help=argparse.SUPPRESS)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config fields and method hyperparameters given explicitly on the command line
    (flag dest == field or hyperparameter name)."""
    names = set(TrainConfig.__dataclass_fields__) | set(hparam_flags())
    return {dest: value for dest, value in vars(args).items() if dest in names and value is not None}


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
        if args.model is not None:
            check_preset_applies(args.preset, args.model)
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
    check_hparams_apply(overrides.get("model", base.model), overrides)
    cfg = base.replace(**overrides).validate()
    check_settings_apply(cfg, given, source)
    cfg, notice = precision_for_this_machine(cfg, given, source)
    if notice:
        print(f"fastfvae: {notice}", file=sys.stderr)
    return cfg, point


def precision_for_this_machine(cfg: TrainConfig, given=(), source: str = "the config") -> tuple[TrainConfig, str | None]:
    """``cfg`` with a precision this machine can run, and a one-line notice when it says more
    than the config does. An explicit ``--precision bf16`` (in ``given``) or one from a resumed
    run that the device cannot run at all: FastFVAEError. bf16 from a preset (``source``) where
    it is not native (no AVX-512 BF16 / AMX, a pre-Ampere GPU): fp32 instead, since there bf16
    is the slower choice; explicit bf16 where it is emulated: kept, with the notice."""
    if not (cfg.fast and cfg.precision == "bf16"):
        return cfg, None
    from fastfvae.fast.precision import BF16_NATIVE, BF16_UNSUPPORTED, bf16_support, check_bf16_runs
    from fastfvae.train.state import resolve_device

    device = resolve_device(cfg.device)
    level, why = bf16_support(device)
    if level == BF16_NATIVE:
        return cfg, None
    if "precision" in given:
        check_bf16_runs(cfg.precision, device)
        return cfg, f"--precision bf16 runs emulated here ({why}): expect it slower than --precision fp32"
    if cfg.preset is not None and source.startswith("--preset"):
        cannot = "cannot run here" if level == BF16_UNSUPPORTED else "would be slower than fp32 here"
        return cfg.replace(precision="fp32"), f"{source} trains in fp32: its bf16 {cannot} ({why})"
    check_bf16_runs(cfg.precision, device, source=f"bf16 from {source}")
    return cfg, None


def _as_flags(settings: dict) -> str:
    """``{"fc_dim": 256, "fast": True}`` as the flags that give them: ``--fc-dim 256 --fast``."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            flags.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            flags.append(f"{_flag(name)} {' '.join(map(str, value))}")
        else:
            flags.append(f"{_flag(name)} {value}")
    return " ".join(flags)


def check_preset_applies(name: str, model: str) -> None:
    """FastFVAEError (one line) for ``--preset NAME --model MODEL`` when the preset is another
    model's: its hyperparameters are that model's (FactorVAE's gamma is a TC weight, AnnealedVAE's
    gamma a KL-capacity weight), so they would be dropped or, for a name both declare, carried
    into a different meaning. The line names them and the flags that give the preset's other
    settings, so the run asked for is one command away and nothing changes silently."""
    mismatch = preset_not_applying(name, model)
    if mismatch is None:
        return
    hparams, rest = mismatch
    owner = preset_settings(name)[0]["model"]
    shown = ", ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in hparams.items())
    other = f"drop --preset and give its other settings as flags ({_as_flags(rest)})" if rest else \
        "drop --preset (its other settings are the defaults)"
    raise FastFVAEError(f"--preset {name} is a {owner} preset and its {owner} settings ({shown}) "
                        f"do not apply to --model {model}; pass --model {owner}, or {other}")


def check_hparams_apply(model: str, overrides: dict) -> None:
    """FastFVAEError (one line) for a hyperparameter flag that ``model`` does not declare."""
    from fastfvae import methods

    declared = set(methods.get(model).Hparams.__dataclass_fields__)
    for name in overrides:
        if name in hparam_flags() and name not in declared and name not in TrainConfig.__dataclass_fields__:
            owners = methods_declaring(name)
            raise FastFVAEError(f"{_flag(name)} only applies to --model {' / '.join(owners)}, and this run "
                                f"trains {model}; drop {_flag(name)} or pass --model {owners[0]}")


def step_builder_for(cfg: TrainConfig):
    """The step implementation for ``cfg``: None = the reference step."""
    if cfg.fast:
        from fastfvae.fast import make_fast_step

        return make_fast_step
    return None


def callbacks_for(cfg: TrainConfig, args: argparse.Namespace, data=None, evaluation: bool = True) -> list:
    """Per-step callbacks: with ``--eval-every N``, the ``--eval-metrics`` at ``--eval-budget``
    (`fastfvae.metrics.periodic.periodic_evaluation`). The metric names are checked even
    without ``--eval-every``, before the run starts. ``data``: the run's `training_data`
    (default: a loader of its own). ``evaluation=False``: no evaluation callback (a sweep's
    packs evaluate their runs themselves, `fastfvae.study.pack.pack_evaluation`)."""
    from fastfvae.metrics.evaluate import check_log_metric_names

    check_log_metric_names(cfg.eval_metrics)
    if not (cfg.eval_every and evaluation):
        return []
    from fastfvae.metrics.periodic import periodic_evaluation

    return [periodic_evaluation(cfg.eval_every, data or lazy_training_data(cfg), cfg.eval_metrics, out_dir=cfg.out,
                                budget=cfg.eval_budget)]


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
    data = lazy_training_data(cfg)
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
    p = subparsers.add_parser("train", help="train FactorVAE, beta-VAE and the other methods", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    add_arguments(p)
    p.set_defaults(func=run)
