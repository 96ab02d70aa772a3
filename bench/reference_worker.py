"""A baseline step in a child process, timed on request: a drift-proof baseline.

The fast step keeps freed memory in its heap (`fastfvae.fast.allocator`), a process-wide
setting that cannot be undone, so the plain ``reference`` row (default glibc heap, as a
PyTorch loop runs) cannot take part in rounds timed inside the benchmark's process. Here it
runs in a child that waits on a pipe: the parent asks for ``steps`` steps between its own
rows, so drift on a shared machine hits the reference and the fast rows alike, and nothing
else runs while either is timed (the other one is blocked on the pipe). The well-known
implementation's iteration (``--variant well-known``, `bench.wellknown_step`) runs the same way:
a plain PyTorch loop, default heap.

Protocol (one line each way): the child prints ``ready`` after its warm-up; for each line
``<steps>`` it reads, it runs that many steps and prints the seconds per step; it exits at
end of input. ``python -m bench.reference_worker --batch-size 64 --d-steps 1 --threads 2
[--variant well-known]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ReferenceWorker:
    """The child process: ``with ReferenceWorker(64, 1, threads) as ref: ref.seconds_per_step(5)``."""

    def __init__(self, batch_size: int, d_steps: int, threads: int, rows: int = 8192, warmup: int = 2,
                 variant: str = "reference") -> None:
        args = [sys.executable, "-m", "bench.reference_worker", "--batch-size", str(batch_size),
                "--d-steps", str(d_steps), "--threads", str(threads), "--rows", str(rows), "--warmup", str(warmup),
                "--variant", variant]
        self._proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, bufsize=1)
        self._expect("ready")

    def _read(self) -> str:
        line = self._proc.stdout.readline()
        if not line:  # the child died: say why
            self._proc.wait()
            raise RuntimeError(f"reference worker exited with {self._proc.returncode}: {self._proc.stderr.read()[-2000:]}")
        return line.strip()

    def _expect(self, word: str) -> None:
        got = self._read()
        if got != word:
            raise RuntimeError(f"reference worker said {got!r}, expected {word!r}")

    def seconds_per_step(self, steps: int) -> float:
        self._proc.stdin.write(f"{steps}\n")
        self._proc.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for pipe in (self._proc.stdout, self._proc.stderr):
            pipe.close()

    def __enter__(self) -> "ReferenceWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--d-steps", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variant", choices=("reference", "well-known"), default="reference")
    args = parser.parse_args(argv)

    import torch

    from bench.bench_train_step import step_timer
    from bench.conftest import random_bits_dsprites
    from fastfvae.train.config import TrainConfig

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(device="cpu", batch_size=args.batch_size, d_steps=args.d_steps).validate()
    run = step_timer(args.variant, cfg, random_bits_dsprites(args.rows), torch.device("cpu"), args.warmup)
    print("ready", flush=True)
    for line in sys.stdin:
        print(repr(run(int(line))), flush=True)


if __name__ == "__main__":
    main()
