"""Pack phase of the GPU check: run-steps/s of K runs as one vectorised step, and what that makes
of the ``seed-fig3`` preset (Kim & Mnih 2018, Figure 3: 120 runs x 300k steps).

    python -m bench.gpu_check_pack --json OUT [--device cuda] [--ks 1,8,32,60] [--steps 20]

For each of the preset's two methods at its settings (beta-VAE with the defaults; FactorVAE with
the ``paper`` preset: 5 D updates, permuted codes from a second batch), for each K: the first K
of that method's runs in the preset's order as one pack step (`fastfvae.study.pack.make_pack_step`,
the device's mechanism: on CUDA the graphed pack, one CUDA graph a step; ``--mechanism
stacked`` for the eager stacked pack; a pack of one is the single fast step, `FastStep`, as a
sweep trains it), a few warm-up steps, then ``steps`` timed steps. Recorded per K: the mechanism
that ran, the pack's steps/s and its run-steps/s (K x steps/s: what a sweep advances), or the
error (out of memory ends that method's larger Ks). Where the device's own mechanism fails at a
K (on CUDA the graphed pack: a capture that fails), its error row is kept and the eager stacked
pack is measured at that K as well.

The projection: each method's 60 runs x 300k steps at its best run-steps/s (a method's packs
cannot hold the other method's runs), summed: the hours ``fastfvae sweep --preset seed-fig3``
would train for on this device, evaluation not counted. The JSON is rewritten after every K, so
a run cut at its timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from fastfvae.data import DSprites
from fastfvae.study.spec import expand, preset_spec
from fastfvae.train.config import TrainConfig

#: the preset's runs per method and steps per run
FIG3_RUNS_PER_METHOD = 60
FIG3_STEPS = 300_000
WARMUP_STEPS = 3


def fig3_configs(device: str, batch_size: int, d_hidden: int | None) -> dict[str, list[TrainConfig]]:
    """method -> the configs of its runs in the seed-fig3 preset (grid value x seed, the sweep's
    order), on ``device``, at ``batch_size`` (and FactorVAE's D width ``d_hidden`` if given)."""
    out: dict[str, list[TrainConfig]] = {}
    for run in expand(preset_spec("seed-fig3"), "unused"):
        changes = {"device": device, "batch_size": batch_size}
        if d_hidden is not None and run.config.model == "factorvae":
            changes["d_hidden"] = d_hidden
        out.setdefault(run.config.model, []).append(run.config.replace(**changes))
    return out


def random_bits(rows: int) -> DSprites:
    """Images of random bits: a step's cost does not depend on the pixels."""
    rng = np.random.default_rng(0)
    return DSprites(rng.integers(0, 256, (rows, 512), dtype=np.uint8), np.zeros((rows, 6), np.int64),
                    np.zeros((rows, 6)), source="random-bits")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runs: list[TrainConfig], k: int, data, steps: int, mechanism: str | None = None) -> dict:
    """One pack of the first ``k`` of ``runs``: its steps/s and run-steps/s over ``steps`` timed
    steps, and which mechanism ran (``mechanism``: the pack's, None = the device's default: on
    CUDA the graphed pack)."""
    from fastfvae.fast import FastOptions, FastStep
    from fastfvae.study.pack import make_pack_step
    from fastfvae.train.state import TrainState, resolve_device
    from fastfvae.train.step import StepShapes, draw_step_inputs

    cfgs = runs[:k]
    device = resolve_device(cfgs[0].device)
    states = [TrainState.create(c, len(data), device) for c in cfgs]
    shapes = [StepShapes.of(c, data=data) for c in cfgs]
    t0 = time.perf_counter()
    if k == 1:
        single = FastStep(states[0], data, FastOptions(precision=cfgs[0].precision))
        ran = "single-graph" if single._graph is not None else "single"
        noise = not single.draws_own_noise

        def step():
            single(draw_step_inputs(shapes[0], states[0].sampler, states[0].generator, noise=noise))
    else:
        pack = make_pack_step(states, data, mechanism)
        ran = pack.mechanism
        noise = not pack.draws_own_noise  # the graphed pack draws each run's noise in the graph

        def step():
            pack([draw_step_inputs(sh, st.sampler, st.generator, noise=noise) for sh, st in zip(shapes, states)])
    for _ in range(WARMUP_STEPS):
        step()
    _sync(device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            step()
        _sync(device)
    finally:
        if k > 1:
            pack.close()
    seconds = time.perf_counter() - t0
    rate = steps / seconds
    return {"k": k, "mechanism": ran, "steps_per_s": rate, "run_steps_per_s": k * rate, "build_s": build_s,
            "seconds": seconds}


def measured(runs: list[TrainConfig], k: int, data, steps: int, mechanism: str | None) -> dict:
    """`measure`'s row, or the error instead (a failing K is reported, the others still measured)."""
    try:
        return measure(runs, k, data, steps, mechanism)
    except torch.OutOfMemoryError as exc:
        row = {"k": k, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:
        row = {"k": k, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if mechanism is not None:
        row["mechanism"] = mechanism
    return row


def default_mechanism(cfg: TrainConfig) -> str:
    """The mechanism a pack of ``cfg``'s runs gets on its device (`fastfvae.study.pack.pack_mechanism`)."""
    from fastfvae.study.pack import pack_mechanism
    from fastfvae.train.state import resolve_device

    return pack_mechanism(resolve_device(cfg.device), None, cfg)


def projection(methods: dict) -> dict:
    """The seed-fig3 training hours at each method's best measured run-steps/s."""
    best = {}
    for name, rows in methods.items():
        good = [r for r in rows if "run_steps_per_s" in r]
        if good:
            best[name] = max(good, key=lambda r: r["run_steps_per_s"])
    if len(best) < len(methods) or not best:
        return {"complete": False, "best": best}
    seconds = sum(FIG3_RUNS_PER_METHOD * FIG3_STEPS / r["run_steps_per_s"] for r in best.values())
    return {"complete": True, "best": best, "hours": seconds / 3600, "runs": FIG3_RUNS_PER_METHOD * len(best),
            "steps_per_run": FIG3_STEPS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check_pack", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="OUT", help="where to write the measurements")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a quick try)")
    p.add_argument("--ks", default="1,8,32,60", help="pack sizes, comma-separated (default 1,8,32,60)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per pack (default 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=16384, help="dataset rows (random bits; default 16384)")
    p.add_argument("--d-hidden", type=int, default=None, help="FactorVAE's D width (default: the preset's)")
    p.add_argument("--methods", default="betavae,factorvae", help="which of the preset's methods")
    p.add_argument("--mechanism", default=None, choices=["graph", "stacked", "threads"],
                   help="the packs' mechanism (default: the device's: graph on CUDA, threads on CPU)")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if not ks or any(k < 1 for k in ks) or args.steps < 1:
        p.error("--ks must be integers >= 1 and --steps >= 1")
    configs = fig3_configs(args.device, args.batch_size, args.d_hidden)
    wanted = args.methods.split(",")
    unknown = [m for m in wanted if m not in configs]
    if unknown:
        p.error(f"--methods: {unknown[0]!r} is not a method of the seed-fig3 preset ({', '.join(configs)})")
    data = random_bits(args.rows)
    out = Path(args.json)
    result = {"device": args.device, "steps": args.steps, "batch_size": args.batch_size, "ks": ks,
              "torch": torch.__version__, "methods": {m: [] for m in wanted}}
    if args.device == "cuda" and torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
    for name in wanted:
        for k in ks:
            if k > len(configs[name]):
                result["methods"][name].append({"k": k, "error": f"the preset has {len(configs[name])} {name} runs"})
                continue
            rows = [measured(configs[name], k, data, args.steps, args.mechanism)]
            if "error" in rows[0] and "out of memory" not in rows[0]["error"] and args.mechanism is None and k > 1:
                # the device's own mechanism failed (on CUDA the graphed pack: its error is kept);
                # the eager stacked pack is measured at this K too, so the phase still tells what a
                # pack trains at
                rows[0]["mechanism"] = default_mechanism(configs[name][0])
                rows.append(measured(configs[name], k, data, args.steps, "stacked"))
            for row in rows:
                result["methods"][name].append(row)
                result["projection"] = projection(result["methods"])
                out.write_text(json.dumps(result, indent=1) + "\n")
                print(json.dumps({name: row}), flush=True)
            if "error" in rows[-1] and "out of memory" in rows[-1]["error"]:
                break
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
