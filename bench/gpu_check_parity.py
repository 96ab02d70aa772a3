"""Parity phase of the GPU check: the fast step vs the reference step, N steps, per precision mode.

    python -m bench.gpu_check_parity --json OUT [--steps 50] [--device cuda] [--modes fp32,tf32,bf16]

The reference step runs once, in fp32 with TF32 off (the parity baseline); then the fast step
(its device defaults: on CUDA compiled, fused ops, one CUDA graph; noise copied from the
reference's host stream so both see the same randomness) runs the same steps from the same
initial state in each mode:

* ``fp32``: TF32 off; ``tf32``: fp32 with TF32 matmuls and convolutions; ``bf16``: autocast.

Per mode: the worst deviation over steps of each loss, ``|fast - ref| / (1 + |ref|)`` (the form
of ``assert_close(rtol=t, atol=t)``), the largest parameter difference after the last step, and
whether both are within the mode's tolerance (`TOLERANCES`, documented in docs/gpu.md). The JSON
is rewritten after every mode, so a run cut at its timeout keeps the modes it finished.
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
from fastfvae.fast import PARITY_RTOL, FastOptions, FastStep
from fastfvae.train.config import TrainConfig
from fastfvae.train.reference import draw_step_inputs, make_reference_step
from fastfvae.train.state import TrainState

LOSSES = ("loss", "recon", "kl", "tc", "d_loss")


def tolerances(steps: int, lr: float) -> dict[str, tuple[float, float]]:
    """mode -> (loss rtol, parameter atol). Losses: fp32 on the GPU 1e-3 (cuDNN/cuBLAS algorithm
    choice and atomics; docs/fast-path.md, "Parity"), bf16 `PARITY_RTOL` (8 mantissa bits), TF32 the
    bf16 tolerance scaled by the ratio of unit round-offs (2^-8 / 2^-10 = 4). Parameters: Adam
    moves one by at most ~lr a step, so ``steps * lr`` in every mode."""
    params = steps * lr
    return {"fp32": (1e-3, params), "tf32": (PARITY_RTOL["bf16"] / 4, params), "bf16": (PARITY_RTOL["bf16"], params)}


def dataset(rows: int | None) -> DSprites:
    """The procedural dSprites (``rows``: a random subset of that many rows, for quick runs)."""
    from fastfvae.data.procedural import procedural_dsprites

    full = procedural_dsprites()
    if rows is None:
        return full
    pick = np.sort(np.random.default_rng(0).choice(len(full.packed), rows, replace=False))
    return DSprites(full.packed[pick], full.latents_classes[pick], full.latents_values[pick], source="procedural subset")


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _params(state) -> dict[str, torch.Tensor]:
    vae, disc = state.models
    out = {f"vae.{k}": v.detach().float().cpu() for k, v in vae.state_dict().items()}
    if disc is not None:
        out.update({f"disc.{k}": v.detach().float().cpu() for k, v in disc.state_dict().items()})
    return out


def run_steps(cfg: TrainConfig, data, steps: int, make_step) -> tuple[list[dict], dict, float]:
    """(per-step float metrics, final parameters, seconds to build the step)."""
    state = TrainState.create(cfg, len(data), cfg.device)
    t0 = time.perf_counter()
    step = make_step(state, data)
    build_s = time.perf_counter() - t0
    metrics = []
    for _ in range(steps):
        out = step(draw_step_inputs(cfg, state.sampler, state.generator))
        metrics.append({k: float(v) for k, v in out.items()})
    return metrics, _params(state), build_s


def compare(ref: tuple, fast: tuple, loss_rtol: float, param_atol: float) -> dict:
    ref_m, ref_p, _ = ref
    fast_m, fast_p, build_s = fast
    worst, which = 0.0, ""
    for step, (a, b) in enumerate(zip(ref_m, fast_m), 1):
        for k in LOSSES:
            if k in a and k in b:
                dev = abs(b[k] - a[k]) / (1.0 + abs(a[k]))
                if not dev <= worst:  # NaN counts as worst
                    worst, which = dev, f"{k} at step {step}"
    param_diff = max(float((fast_p[k] - ref_p[k]).abs().max()) for k in ref_p)
    within = bool(worst <= loss_rtol and param_diff <= param_atol)
    return {"worst_loss_deviation": worst, "worst_loss": which, "loss_rtol": loss_rtol, "max_param_diff": param_diff,
            "param_atol": param_atol, "within_tolerance": within, "build_s": build_s,
            "final_loss": {"reference": ref_m[-1]["loss"], "fast": fast_m[-1]["loss"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="the JSON to write (rewritten after each mode)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="fp32,tf32,bf16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--d-hidden", type=int, default=1000)
    p.add_argument("--d-layers", type=int, default=6)
    p.add_argument("--rows", type=int, default=None, help="a random subset of the procedural set (quick runs)")
    args = p.parse_args(argv)
    cfg = TrainConfig(batch_size=args.batch_size, d_hidden=args.d_hidden, d_layers=args.d_layers, device=args.device)
    data = dataset(args.rows)
    cuda = args.device == "cuda"
    out = {"steps": args.steps, "device": args.device, "modes": {},
           "config": f"batch {cfg.batch_size}, D {cfg.d_layers}x{cfg.d_hidden}, {cfg.d_steps} D update(s), "
                     f"perm batch {cfg.perm_batch}"}
    path = Path(args.json)

    def save():
        path.write_text(json.dumps(out, indent=1) + "\n")

    if cuda:
        _set_tf32(False)
    t0 = time.perf_counter()
    ref = run_steps(cfg, data, args.steps, make_reference_step)
    out["reference_s"] = time.perf_counter() - t0
    save()
    tol = tolerances(args.steps, cfg.vae_lr)
    failed = False
    for mode in args.modes.split(","):
        if mode == "tf32" and not cuda:
            continue  # TF32 is a CUDA setting
        try:
            if cuda:
                _set_tf32(mode == "tf32")
            precision = "bf16" if mode == "bf16" else "fp32"
            options = FastOptions(precision=precision, noise="host")
            fast = run_steps(cfg, data, args.steps, lambda s, d: FastStep(s, d, options))
            out["modes"][mode] = compare(ref, fast, *tol[mode])
            failed |= not out["modes"][mode]["within_tolerance"]
        except Exception as exc:
            out["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
            traceback.print_exc()
            failed = True
        finally:
            if cuda:
                _set_tf32(False)
                torch.cuda.empty_cache()
        save()
        print(f"{mode}: {out['modes'][mode]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
