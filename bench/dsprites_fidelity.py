"""Fidelity of a dSprites set to real frames: best-match IoU of each frame.

    python bench/dsprites_fidelity.py REAL_FRAMES.npz [--data PATH] [--out worst.png]

Each real frame (uint8 {0,1} [F, 64, 64] under key ``frames``) is matched against the
generated images whose mass and centroid could match it (`fastfvae.data.fidelity`); the
script prints the mean and minimum best IoU and the 5 worst frames, and writes a PNG with
real | generated | difference (red: real only, blue: generated only) for those 5,
cropped around the sprite. ``--data`` measures a dSprites file instead of
the procedural set. Exit code 1 when the goals (mean >= 0.998, min >= 0.985) are missed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from fastfvae.data import FACTOR_NAMES, load_dsprites, procedural_dsprites
from fastfvae.data.fidelity import best_match_iou, dataset_render_fn

GOAL_MEAN, GOAL_MIN = 0.998, 0.985


def write_worst_png(frames: np.ndarray, generated: np.ndarray, report, path: str, k: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = report.worst(k)
    fig, axes = plt.subplots(len(worst), 3, figsize=(6, 2 * len(worst)), squeeze=False)
    for row, i in enumerate(worst):
        real, gen = frames[i].astype(bool), generated[row].astype(bool)
        diff = np.zeros((64, 64, 3))
        diff[real & gen] = 1.0
        diff[real & ~gen] = (1.0, 0.2, 0.2)  # real only: red
        diff[gen & ~real] = (0.2, 0.6, 1.0)  # generated only: blue
        rows, cols = np.flatnonzero((real | gen).any(1)), np.flatnonzero((real | gen).any(0))
        crop = (slice(max(rows.min() - 3, 0), rows.max() + 4), slice(max(cols.min() - 3, 0), cols.max() + 4)) \
            if rows.size else (slice(None), slice(None))
        for col, (img, title) in enumerate(((real, f"real #{i}"), (gen, "generated"),
                                            (diff, f"IoU {report.iou[i]:.4f}"))):
            ax = axes[row, col]
            ax.imshow(img[crop], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("frames", help="NPZ with `frames` uint8 [F, 64, 64]")
    parser.add_argument("--data", default=None, help="dSprites file to measure (default: procedural)")
    parser.add_argument("--out", default="dsprites_fidelity_worst.png", help="PNG of the worst frames")
    args = parser.parse_args(argv)

    frames = np.load(args.frames)["frames"]
    start = time.perf_counter()
    data = load_dsprites(args.data) if args.data else procedural_dsprites()
    built = time.perf_counter() - start
    render_fn = dataset_render_fn(data)
    report = best_match_iou(frames, render_fn)
    print(f"dataset: {data.source} ({len(data)} images, ready in {built:.2f} s)")
    print(f"frames: {len(frames)}  mean best-match IoU {report.mean:.5f}  min {report.min:.5f}")
    worst = report.worst(5)
    for i in worst:
        latents = ", ".join(f"{n}={c}" for n, c in zip(FACTOR_NAMES[1:], report.best_classes[i, 1:]))
        print(f"  frame {i:3d}: IoU {report.iou[i]:.5f}  best match {latents}")
    write_worst_png(frames, render_fn(report.best_classes[worst]), report, args.out)
    print(f"worst frames side by side: {args.out}")
    ok = report.mean >= GOAL_MEAN and report.min >= GOAL_MIN
    print(f"goal (mean >= {GOAL_MEAN}, min >= {GOAL_MIN}): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
