"""bench/gpu_check.py, the GPU check's phase runner, on CPU: the no-CUDA exit, phases cut at their
timeout with their children, failures reported and the next phase run, the budget, the report
kept section by section when the runner is stopped, and the summaries of each phase kind."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import gpu_check  # noqa: E402
from bench.gpu_check import Phase, PhaseResult, Report  # noqa: E402

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(") ")[-1][0] != "Z"


def _hang_with_child(pid_file: Path) -> list[str]:
    """A command whose child (a grandchild of the runner) sleeps; it writes the child's pid."""
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(600)")
    return [PY, "-c", code]


def _run_main(tmp_path, phases, budget=60.0):
    return gpu_check.main([str(tmp_path / "r"), "--budget", str(budget)], phases_for=lambda py, d: phases)


#: A bound that only a real hang exceeds: five times a limit plus the kill grace (never a speed check).
def _hang_bound(limit_s: float) -> float:
    return 5 * (limit_s + gpu_check.KILL_GRACE_S)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_no_cuda_exits_3_with_the_preflight_only(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=_hang_bound(gpu_check.PREFLIGHT_TIMEOUT_S),
                          cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    report = (tmp_path / "r" / "report.md").read_text()
    for part in ("## Preflight", "torch ", "triton ", "C compiler", "Python.h", "pytest-benchmark",
                 "## Nothing to measure", "## Where the seconds went"):
        assert part in report, part
    # the preflight ran under its own limit, and no phase was started after it
    row = next(line for line in report.splitlines() if line.startswith("| preflight | "))
    assert row.startswith("| preflight | ok | ") and row.split(" | ")[3] == f"{gpu_check.PREFLIGHT_TIMEOUT_S:.0f}"
    assert sorted(p.name for p in (tmp_path / "r").glob("*.json")) == ["preflight.json"]
    assert json.loads((tmp_path / "r" / "preflight.json").read_text())["cuda"] is False


def test_a_hung_phase_is_cut_with_its_children_and_the_report_goes_on(tmp_path):
    pid_file = tmp_path / "child.pid"
    phases = [
        Phase("hangs", "a phase that hangs", _hang_with_child(pid_file), timeout_s=3, min_s=1),
        Phase("fails", "a phase that fails", [PY, "-c", "import sys; print('boom'); sys.exit(4)"], timeout_s=20, min_s=1),
        Phase("works", "a phase that works", [PY, "-c", "print('fine')"], timeout_s=20, min_s=1,
              summarise=lambda r, d: (f"printed {(d / 'works.log').read_text().strip()}", {"ok": True})),
    ]
    rc = _run_main(tmp_path, phases)
    assert rc == 1  # not every phase ok
    child = int(pid_file.read_text())
    assert not _alive(child), "the hung phase's child outlived its timeout"
    report = (tmp_path / "r" / "report.md").read_text()
    order = [report.index(s) for s in ("## Preflight", "## a phase that hangs", "**TIMED OUT**", "## a phase that fails",
                                       "**FAILED** (exit 4)", "## a phase that works", "printed fine",
                                       "## Where the seconds went")]
    assert order == sorted(order)
    for name, status in (("hangs", "timed out"), ("fails", "failed"), ("works", "ok")):
        payload = json.loads((tmp_path / "r" / f"{name}.json").read_text())
        assert payload["status"] == status
        assert f"| {name} | {status} |" in report
    assert json.loads((tmp_path / "r" / "works.json").read_text())["summary"] == {"ok": True}
    assert "started" in (tmp_path / "r" / "hangs.log").read_text()
    hung = json.loads((tmp_path / "r" / "hangs.json").read_text())
    assert hung["timeout_s"] == 3 and hung["seconds"] < _hang_bound(3)  # cut, not left to its 600 s sleep


def test_phases_that_do_not_fit_the_budget_are_skipped(tmp_path):
    phases = [Phase("first", "first", [PY, "-c", "import time; time.sleep(1)"], timeout_s=30, min_s=1),
              Phase("second", "second", [PY, "-c", "print(1)"], timeout_s=30, min_s=120)]
    assert _run_main(tmp_path, phases, budget=30) == 1
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## first\n\nok in" in report
    assert "## second\n\n**skipped**" in report and "it needs >= 120 s" in report


def test_a_phase_never_runs_past_the_budget(tmp_path, monkeypatch):
    """The phase's limit is what the budget leaves (not its own 600 s), and it is cut there.
    The preflight (torch imported in a child: seconds on a busy machine) is stubbed so the
    budget left does not depend on how long that took."""
    monkeypatch.setattr(gpu_check, "preflight", lambda python, wheels, timeout_s: ("## Preflight\n\nstub",
                                                                                   {"seconds": 0.0, "cuda": False}))
    phases = [Phase("long", "long", [PY, "-c", "import time; time.sleep(600)"], timeout_s=600, min_s=1)]
    _run_main(tmp_path, phases, budget=8)
    long = json.loads((tmp_path / "r" / "long.json").read_text())
    assert long["status"] == "timed out"
    assert 1 <= long["timeout_s"] <= 8 - gpu_check.RESERVE_S  # the budget's limit, not the phase's
    assert long["seconds"] < _hang_bound(8)  # cut at that limit, not left to sleep 600 s


_RUNNER = """
import sys
sys.path.insert(0, {repo!r})
from bench.gpu_check import Phase, main
first = Phase("quick", "quick phase", [sys.executable, "-c", "print('quick done')"], timeout_s=30, min_s=1)
second = Phase("hangs", "hanging phase", {hang!r}, timeout_s=300, min_s=1)
sys.exit(main([{out!r}, "--budget", "300"], phases_for=lambda py, d: [first, second]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_runner_keeps_every_finished_section(tmp_path, sig):
    """Stopped while the second phase runs: the first phase's section is on disk. With SIGTERM
    the runner also stops the running phase's process group and closes the report."""
    pid_file = tmp_path / "child.pid"
    out = tmp_path / "r"
    script = _RUNNER.format(repo=str(REPO), hang=_hang_with_child(pid_file), out=str(out))
    runner = subprocess.Popen([PY, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), "the second phase never started"
        time.sleep(0.3)
        runner.send_signal(sig)
        rc = runner.wait(timeout=30)
        report = (out / "report.md").read_text()
        assert "## quick phase\n\nok in" in report
        assert json.loads((out / "quick.json").read_text())["status"] == "ok"
        child = int(pid_file.read_text())
        if sig == signal.SIGTERM:
            assert rc == 143
            assert "## Interrupted" in report and "## Where the seconds went" in report
            assert not _alive(child)
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)  # the SIGKILL case leaves the phase's group behind
        except ProcessLookupError:
            pass
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            # The phase and its child share the phase's process group: kill both, leave nothing.
            os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)


def test_pytest_phases_report_failures_from_junit_and_cut_runs_from_the_log(tmp_path):
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_sample.py").write_text(textwrap.dedent("""
        import time
        def test_good():
            assert True
        def test_bad():
            assert 1 == 2, "one is not two"
        def test_slow():
            time.sleep(600)
    """))
    report_dir = tmp_path / "r"
    report_dir.mkdir()
    report = Report(report_dir)
    spent: list[PhaseResult] = []
    full = gpu_check.pytest_phase(PY, report_dir, "sample", "sample tests", [str(tests / "test_sample.py")], 60,
                                  k="not slow")
    cut = gpu_check.pytest_phase(PY, report_dir, "sample-cut", "sample tests, cut", [str(tests / "test_sample.py")],
                                 8, min_s=1)
    for phase in (full, cut):
        phase.argv += ["-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(tests)]
    gpu_check.run_phases([full, cut], report, time.monotonic() + 120, spent)
    assert [r.status for r in spent] == ["failed", "timed out"]
    summary = json.loads((report_dir / "sample.json").read_text())["summary"]
    assert summary["counts"] == {"passed": 1, "failed": 1}
    assert summary["failed"] == ["test_sample::test_bad"] and "one is not two" in summary["messages"]["test_sample::test_bad"]
    cut_summary = json.loads((report_dir / "sample-cut.json").read_text())["summary"]
    assert cut_summary["counts"] == {"passed": 1, "failed": 1}  # test_slow never finished
    text = (report_dir / "report.md").read_text()
    assert "FAILED test_sample::test_bad" in text and "the run was cut" in text


def test_the_cuda_phases_come_in_order_of_value_and_run_nothing_cpu_bound(tmp_path):
    phases = gpu_check.cuda_phases(PY, tmp_path)
    names = [p.name for p in phases]
    assert names == ["smoke-fp32", "smoke-bf16", "parity", "op-tests", "pack-graph", "pack", "bench-step-paper-d1",
                     "bench-step-b256", "bench-step-b1024", "bench-ops", "bench-loaders", "bench-ops-compiled"]
    for phase in phases:
        command = " ".join(map(str, phase.argv))
        assert "bench_metrics" not in command and "dci" not in command.lower()
        assert "bench_dsprites" not in command
    op_tests = phases[names.index("op-tests")]
    assert op_tests.argv[op_tests.argv.index("-k") + 1] == "cuda" and op_tests.env == {"FASTFVAE_AUTOTUNE": "0"}
    pack_graph = phases[names.index("pack-graph")]  # the graphed pack's CUDA parity tests
    assert "tests/test_pack_graph.py" in pack_graph.argv and pack_graph.argv[pack_graph.argv.index("-k") + 1] == "cuda"
    assert sum(p.timeout_s for p in phases) > gpu_check.DEFAULT_BUDGET_S  # the budget, not the sum, bounds a run


def _collected(target: str, k: str) -> list[str]:
    proc = subprocess.run([PY, "-m", "pytest", target, "--collect-only", "-q", "-k", k, "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    return [line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line]


def test_the_benchmark_selections_pick_the_intended_rows():
    rows = _collected("bench/bench_train_step.py", gpu_check.train_step_selection("b256"))
    assert rows == ["test_train_step[b256-reference]", "test_train_step[b256-fast]", "test_train_step[b256-fast-bf16]"]
    paper = _collected("bench/bench_train_step.py", gpu_check.train_step_selection("paper-d1"))
    assert paper == ["test_train_step[paper-d1-reference]", "test_train_step[paper-d1-well-known]",
                     "test_train_step[paper-d1-fast]", "test_train_step[paper-d1-fast-bf16]"]
    ops = _collected("bench/bench_ops.py", gpu_check.OPS_SELECTION)
    assert ops and all(("64" in r or "128" in r) and "compiled" not in r for r in ops)
    assert any("discriminator" in r and "128" in r for r in ops) and any("gaussian" in r for r in ops)
    assert not any("512" in r or "4096" in r for r in ops)


@pytest.mark.slow
def test_smoke_phase_measures_a_real_fast_run(tmp_path):
    """The smoke phase's own command (fastfvae train --fast) on CPU for 4 steps, summarised."""
    report_dir = tmp_path / "r"
    report_dir.mkdir()
    phase = gpu_check._smoke_phase(PY, report_dir, "fp32", steps=4, timeout_s=240)
    phase.argv += ["--batch-size", "8"]
    spent: list[PhaseResult] = []
    gpu_check.run_phases([phase], Report(report_dir), time.monotonic() + 300, spent)
    assert spent[0].status == "ok", (report_dir / "smoke-fp32.log").read_text()[-2000:]
    summary = json.loads((report_dir / "smoke-fp32.json").read_text())["summary"]
    assert summary["steps"] == 4 and summary["steps_per_s"] > 0 and summary["startup_s"] > 0
    assert not (report_dir / "smoke-fp32.run").exists()  # the run folder (checkpoint) is removed
    assert "steps/s: **" in (report_dir / "report.md").read_text()


@pytest.mark.slow
def test_parity_phase_script_writes_its_modes(tmp_path):
    out = tmp_path / "parity.json"
    proc = subprocess.run([PY, "-m", "bench.gpu_check_parity", "--json", str(out), "--steps", "3", "--device", "cpu",
                           "--modes", "fp32", "--rows", "256", "--batch-size", "8", "--d-hidden", "32", "--d-layers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    fp32 = data["modes"]["fp32"]
    assert fp32["within_tolerance"] and 0 <= fp32["worst_loss_deviation"] <= fp32["loss_rtol"]
    body, _ = gpu_check.summarise_parity(PhaseResult("parity", "parity", "ok"), tmp_path, "parity.json")
    assert "| fp32 |" in body and "within" in body


_NO_RICH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "rich" or name.startswith("rich."):
            raise ImportError("rich is not installed")
sys.meta_path.insert(0, Block())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def test_the_op_tests_collect_without_rich():
    """A bare GPU machine without ``rich`` can still run the op-test phase."""
    proc = subprocess.run([PY, "-c", _NO_RICH, *gpu_check.OP_TEST_FILES], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "error" not in proc.stdout.lower().split("\n")[-2]


def test_pack_phase_script_measures_packs_and_projects_the_preset(tmp_path):
    """The pack phase's own script on CPU with tiny sizes: every method and K measured (or the
    error said), the JSON's projection equal to 60 runs x 300k steps at each method's best rate."""
    out = tmp_path / "pack.json"
    proc = subprocess.run([PY, "-m", "bench.gpu_check_pack", "--json", str(out), "--device", "cpu", "--ks", "1,2",
                           "--steps", "2", "--batch-size", "8", "--rows", "512", "--d-hidden", "32"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["methods"]) == {"betavae", "factorvae"}
    for rows in data["methods"].values():
        assert [r["k"] for r in rows] == [1, 2]
        assert all("error" not in r for r in rows), rows
        for r in rows:
            assert r["run_steps_per_s"] == pytest.approx(r["k"] * r["steps_per_s"])
        assert [r["mechanism"] for r in rows] == ["single", "threads"]  # CPU: no graph
    proj = data["projection"]
    best = {m: max(r["run_steps_per_s"] for r in rows) for m, rows in data["methods"].items()}
    assert proj["complete"] and proj["hours"] == pytest.approx(sum(60 * 300_000 / b for b in best.values()) / 3600)
    body, _ = gpu_check.summarise_pack(PhaseResult("pack", "pack", "ok"), tmp_path, "pack.json")
    assert "| factorvae | 2 | threads |" in body and "seed-fig3 (120 runs x 300,000 steps)" in body


def test_pack_phase_measures_the_stacked_pack_where_the_devices_mechanism_fails(tmp_path, monkeypatch):
    """A K where the device's own pack mechanism fails (on CUDA a graph that does not capture)
    keeps its error row, named by mechanism, and the eager stacked pack is measured there too:
    the phase still says what a pack trains at. A requested mechanism, K = 1 and out of memory
    get no second try."""
    from bench import gpu_check_pack

    calls = []

    def measure(runs, k, data, steps, mechanism=None):
        calls.append((runs[0].model, k, mechanism))
        if k > 1 and mechanism in (None, "graph"):  # the graph (the device's default here) fails
            raise RuntimeError("CUDA graph capture of the step failed: RuntimeError: operation not permitted")
        if k == 3 and mechanism == "stacked":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return {"k": k, "mechanism": mechanism or "single", "steps_per_s": 1.0, "run_steps_per_s": float(k),
                "build_s": 0.0, "seconds": 1.0}

    monkeypatch.setattr(gpu_check_pack, "measure", measure)
    monkeypatch.setattr(gpu_check_pack, "default_mechanism", lambda cfg: "graph")
    out = tmp_path / "pack.json"
    argv = ["--json", str(out), "--device", "cpu", "--ks", "1,2,3,4", "--rows", "64", "--methods", "betavae"]
    assert gpu_check_pack.main(argv) == 0
    rows = json.loads(out.read_text())["methods"]["betavae"]
    assert [(r["k"], r.get("mechanism"), "error" in r) for r in rows] == [
        (1, "single", False), (2, "graph", True), (2, "stacked", False), (3, "graph", True), (3, "stacked", True)]
    assert "operation not permitted" in rows[1]["error"] and "out of memory" in rows[4]["error"]  # K = 4: not tried
    assert calls == [("betavae", 1, None), ("betavae", 2, None), ("betavae", 2, "stacked"), ("betavae", 3, None),
                     ("betavae", 3, "stacked")]
    body, _ = gpu_check.summarise_pack(PhaseResult("pack", "pack", "ok"), tmp_path, "pack.json")
    assert "| betavae | 2 | graph | **ERROR** RuntimeError: CUDA graph capture" in body
    assert "| betavae | 2 | stacked | 1.0 |" in body
    calls.clear()
    assert gpu_check_pack.main(argv[:4] + ["--ks", "2", "--mechanism", "graph", "--methods", "betavae"]) == 0
    assert calls == [("betavae", 2, "graph")]


def test_pack_summary_keeps_its_table_whole_for_a_failed_k(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({
        "steps": 2, "batch_size": 8, "projection": {"complete": False},
        "methods": {"betavae": [{"k": 1, "steps_per_s": 10.0, "run_steps_per_s": 10.0, "build_s": 1.0},
                                {"k": 60, "error": "out of memory: CUDA"}]}}))
    body, _ = gpu_check.summarise_pack(PhaseResult("pack", "pack", "ok"), tmp_path, "p.json")
    rows = [line for line in body.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1, rows  # every row has the header's cells
    assert "**ERROR** out of memory" in rows[-1] and "seed-fig3 (" not in body
