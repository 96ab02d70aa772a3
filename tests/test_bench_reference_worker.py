"""`bench.reference_worker`: the plain reference step timed in a child process on request."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reference_worker import ReferenceWorker  # noqa: E402


def test_worker_times_steps_on_request_and_exits_at_close():
    worker = ReferenceWorker(batch_size=2, d_steps=1, threads=1, rows=64, warmup=1)
    try:
        first, second = worker.seconds_per_step(2), worker.seconds_per_step(1)
        assert all(math.isfinite(s) and s > 0 for s in (first, second))
    finally:
        worker.close()
    assert worker._proc.returncode == 0  # ended at end of input, not killed


def test_worker_failure_is_raised_with_the_childs_error():
    with pytest.raises(RuntimeError, match="batch-size"):  # TrainConfig.validate rejects a batch of 1
        ReferenceWorker(batch_size=1, d_steps=1, threads=1, rows=64)


def test_worker_rejects_a_bad_request():
    with ReferenceWorker(batch_size=2, d_steps=1, threads=1, rows=64, warmup=0) as worker:
        with pytest.raises(RuntimeError, match="exited with"):
            worker.seconds_per_step("two")  # the child cannot parse it and exits
