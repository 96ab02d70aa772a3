"""CPU encoding speed of `fastfvae.metrics.encode`, before and after its memory and layout
settings, measured side by side: ``python bench/encode_speed.py [--rows N] [--rounds R]``.

Each variant runs in a process of its own (glibc's mmap/trim thresholds, set by
`keep_freed_memory`, are process-wide and one-way), and the variants alternate round by
round, so a shared machine's load falls on all of them alike. Each process encodes the
first ``--rows`` dSprites rows (the cached real file, else the procedural set) with a
random-init paper VAE (the cost does not depend on the weights) after a short warm-up, and
reports images/s, user and system CPU seconds and minor page faults of the encoding alone.

Variants: ``before`` = 1024-image batches, glibc's default thresholds (the encoder as it
was); ``b128`` = 128-image batches alone; ``keep`` = 1024-image batches with freed memory
kept; ``after`` = both (the default now: 128 images a batch on a CPU, freed memory kept);
``after+cl`` = and a channels_last copy of the model (opt-in); ``after+bf16`` = and bf16
autocast (opt-in). Prints one line per run and a median summary
with each variant's speed relative to ``before``. Reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "before": dict(batch_size=1024, keep=False),
    "b128": dict(batch_size=128, keep=False),
    "keep": dict(batch_size=1024, keep=True),
    "after": dict(keep=True),
    "after+cl": dict(keep=True, channels_last=True),
    "after+bf16": dict(keep=True, precision="bf16"),
}


def measure(variant: str, rows: int, threads: int | None = None) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    import fastfvae.metrics.encode as encode
    from fastfvae.data.registry import load_dataset
    from fastfvae.models.vae import VAE

    options = dict(VARIANTS[variant])
    if not options.pop("keep"):
        encode.keep_host_memory = lambda device: None  # glibc's default thresholds
    data = load_dataset("dsprites")
    torch.manual_seed(0)
    vae = VAE(z_dim=10)
    encode.encode_rows(vae, data, np.arange(2048), **options)  # warm-up: oneDNN primitives, first pages
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    encode.encode_rows(vae, data, np.arange(rows), **options)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"variant": variant, "rows": rows, "seconds": seconds, "images_per_s": rows / seconds,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.rows, args.threads)))
        return
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            command = [sys.executable, __file__, "--one", variant, "--rows", str(args.rows)]
            command += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results[variant].append(r)
            print(f"round {round_} {variant:11s} {r['images_per_s']:8.0f} img/s  user {r['user_s']:6.2f} s  "
                  f"sys {r['sys_s']:6.2f} s  minor faults {r['minor_faults']:>9,}", flush=True)
    base = statistics.median(r["images_per_s"] for r in results[variants[0]])
    print(f"\nmedian of {args.rounds} rounds, {args.rows:,} rows, {results[variants[0]][0]['threads']} threads:")
    for variant in variants:
        rs = results[variant]
        speed = statistics.median(r["images_per_s"] for r in rs)
        print(f"{variant:11s} {speed:8.0f} img/s ({speed / base:4.2f}x {variants[0]})  "
              f"user {statistics.median(r['user_s'] for r in rs):6.2f} s  sys {statistics.median(r['sys_s'] for r in rs):6.2f} s  "
              f"minor faults {int(statistics.median(r['minor_faults'] for r in rs)):>9,}")


if __name__ == "__main__":
    main()
