"""GPU check: a budgeted, incremental run of what a lent GPU can tell us, most valuable first.

    python -m bench.gpu_check REPORT_DIR [--budget SECONDS] [--wheels DIR]
    bench/gpu_check.sh REPORT_DIR [--budget SECONDS] [--wheels DIR]     (the same, as a script)

1. ``--wheels DIR``: the Python packages the phases need that are missing are installed from
   DIR first, offline (``pip install --no-index --find-links DIR NAME``), one line each.
2. Preflight (<= ~20 s): GPU, driver and CUDA versions, torch / triton / DALI versions, the C
   compiler and ``Python.h`` Triton builds its CUDA launcher with at the first kernel launch,
   every package a later phase needs; each missing piece is one line of the report. Without a
   CUDA device the report holds the preflight only, and the exit status is 3.
3. The phases, in order of value, each under its own timeout (never past the budget), each in
   its own process group (a phase cut at its timeout takes its children with it), each
   appending its section to ``REPORT_DIR/report.md`` and writing ``REPORT_DIR/<phase>.json``
   the moment it ends -- so a run killed at any point keeps every finished phase:
   smoke (``fastfvae train --fast``, fp32 and bf16), parity on the GPU (fast vs reference,
   fp32 / TF32 / bf16), the op tests on CUDA only, the graphed pack's CUDA parity tests
   (model k vs its single graphed run, resume bit for bit), packs (run-steps/s for K = 1..60 and
   the hours the ``seed-fig3`` preset would train for), the train-step and op benchmarks, the
   loaders, and the compiled op-benchmark rows if time is left. Nothing CPU-bound (metrics,
   DCI) runs. The report ends with where the seconds went.

Exit status: 0 every phase passed; 1 a phase failed, timed out or was skipped for the budget;
2 bad usage; 3 no CUDA device (nothing to measure). The runner itself needs only the standard
library (the phases run in ``PYTHON``, default this interpreter); see docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
NO_CUDA_EXIT = 3
#: seconds kept back from the last phase for the closing table
RESERVE_S = 3.0
#: seconds a phase group gets between SIGTERM and SIGKILL
KILL_GRACE_S = 3.0
PREFLIGHT_TIMEOUT_S = 20.0

#: (import name, pip name, what needs it). The runner checks each without importing it.
PACKAGES = [
    ("torch", "torch", "everything"),
    ("triton", "triton", "the fused ops and torch.compile on CUDA"),
    ("numpy", "numpy", "fastfvae"),
    ("h5py", "h5py", "fastfvae (dSprites files)"),
    ("sklearn", "scikit-learn", "fastfvae (imports of the metrics)"),
    ("matplotlib", "matplotlib", "fastfvae (figures)"),
    ("rich", "rich", "the smoke phase (fastfvae train's progress)"),
    ("pytest", "pytest", "the op tests and every benchmark phase"),
    ("pytest_benchmark", "pytest-benchmark", "every benchmark phase"),
    ("pytest_timeout", "pytest-timeout", "pytest's per-test timeout (pyproject sets one)"),
    ("nvidia.dali", "nvidia-dali-cuda130", "the DALI loader rows only (optional)"),
]
OPTIONAL = {"nvidia.dali"}

#: the graphed pack's test file, whose CUDA cases (parity with the single graphed run) its phase runs
PACK_GRAPH_TEST_FILES = ["tests/test_pack_graph.py"]
#: the op-test files whose CUDA cases the op-test phase runs
OP_TEST_FILES = ["tests/test_ops_permute.py", "tests/test_ops_gaussian.py", "tests/test_ops_mlp.py",
                 "tests/test_fast_graph.py"]
#: train-step benchmark groups (bench/bench_train_step.py CONFIGS): the paper config, 256, 1024
TRAIN_STEP_CONFIGS = ["paper-d1", "b256", "b1024"]
#: the op benchmarks at the step's batch sizes, without / with the torch.compile rows
OPS_SELECTION = "(64 or 128) and not compiled"
OPS_COMPILED_SELECTION = "(64 or 128) and (compiled or fastfvae) and not randperm"
PARITY_MODES_JSON = "parity.modes.json"
PACK_JSON = "pack.measured.json"


def train_step_selection(config: str) -> str:
    """pytest -k for one config's reference, fast and fast-bf16 rows (fast-fused is fast on CUDA),
    and the paper config's well-known row (`bench.wellknown_step`)."""
    return f"test_train_step and {config}- and not fused and not autograd and not heap"


# --- phases -------------------------------------------------------------------------------

@dataclass
class PhaseResult:
    name: str
    title: str
    status: str            # ok | failed | timed out | skipped
    seconds: float = 0.0
    timeout_s: float = 0.0
    returncode: int | None = None
    note: str = ""


@dataclass
class Phase:
    """One phase: a command run from the repository root in its own process group.

    ``summarise(result, report_dir) -> (markdown, dict)`` turns what the command left (its log
    ``<name>.log``, its files) into the report section's body and the phase JSON's ``summary``.
    """

    name: str
    title: str
    argv: list[str]
    timeout_s: float
    summarise: Callable[[PhaseResult, Path], tuple[str, dict]] | None = None
    env: dict = field(default_factory=dict)
    #: below this many seconds of budget the phase is skipped rather than started
    min_s: float = 10.0
    #: run before the command (make a temporary folder); after it (clean up)
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None


class Report:
    """report.md, appended section by section and flushed to disk at once."""

    def __init__(self, report_dir: Path) -> None:
        self.dir = report_dir
        self.path = report_dir / "report.md"
        self.path.write_text("")

    def append(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text.rstrip("\n") + "\n\n")
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, payload: dict) -> None:
        path = self.dir / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        tmp.replace(path)


class _Interrupted(Exception):
    pass


def _kill_group(pgid: int) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after the grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def phase_env(extra: dict) -> dict:
    """The environment of a phase: this one without the CPU-test switches, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTFVAE_TRITON_ON_CPU", "FASTFVAE_NO_TRITON")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_phase(phase: Phase, report_dir: Path, timeout_s: float, current: dict) -> PhaseResult:
    """Run one phase's command, stdout and stderr to ``<name>.log``, cut at ``timeout_s``."""
    result = PhaseResult(phase.name, phase.title, "ok", timeout_s=timeout_s)
    t0 = time.monotonic()
    if phase.before is not None:
        phase.before()
    try:
        with open(report_dir / f"{phase.name}.log", "w") as log:
            proc = subprocess.Popen(phase.argv, cwd=REPO, env=phase_env(phase.env), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            current["pgid"] = proc.pid
            try:
                result.returncode = proc.wait(timeout=timeout_s)
                if result.returncode != 0:
                    result.status = "failed"
            except subprocess.TimeoutExpired:
                result.status = "timed out"
            finally:
                _kill_group(proc.pid)  # the timed-out phase, or children its leader left behind
                proc.wait()
                current.pop("pgid", None)
    except OSError as exc:  # the command could not start
        result.status, result.note = "failed", f"could not start: {exc}"
    finally:
        if phase.after is not None:
            phase.after()
    result.seconds = time.monotonic() - t0
    return result


def _status_line(r: PhaseResult) -> str:
    if r.status == "ok":
        return f"ok in {r.seconds:.1f} s (limit {r.timeout_s:.0f} s)"
    if r.status == "failed":
        why = r.note or f"exit {r.returncode}"
        return f"**FAILED** ({why}) after {r.seconds:.1f} s; log: {r.name}.log"
    if r.status == "timed out":
        return f"**TIMED OUT** at its {r.timeout_s:.0f} s limit; what it printed: {r.name}.log"
    return f"**skipped**: {r.note}"


def run_phases(phases: list[Phase], report: Report, deadline: float, spent: list[PhaseResult]) -> None:
    """Each phase in turn within ``deadline`` (a time.monotonic() value); its section and JSON
    are written as soon as it ends. A SIGTERM cuts the running phase's group and stops."""
    current: dict = {}

    def on_term(signum, frame):
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for phase in phases:
            left = deadline - time.monotonic() - RESERVE_S
            if left < phase.min_s:
                result = PhaseResult(phase.name, phase.title, "skipped", note=(
                    f"{max(left, 0):.0f} s of the budget left, it needs >= {phase.min_s:.0f} s"))
            else:
                result = run_phase(phase, report.dir, min(phase.timeout_s, left), current)
            body, summary = "", {}
            if phase.summarise is not None and result.status != "skipped":
                try:
                    body, summary = phase.summarise(result, report.dir)
                except Exception as exc:  # a summary must never lose the phase's section
                    body, summary = f"(could not summarise: {type(exc).__name__}: {exc})", {}
            spent.append(result)
            report.write_json(phase.name, {"phase": phase.name, "title": phase.title, "status": result.status,
                                           "returncode": result.returncode, "seconds": round(result.seconds, 2),
                                           "timeout_s": round(result.timeout_s, 1), "argv": phase.argv,
                                           "note": result.note, "summary": summary})
            report.append(f"## {phase.title}\n\n{_status_line(result)}\n\n{body}".rstrip())
    except _Interrupted:
        if "pgid" in current:
            _kill_group(current["pgid"])
        spent.append(PhaseResult("interrupted", "interrupted (SIGTERM)", "failed", note="the runner was stopped"))
        report.append("## Interrupted\n\nThe runner got SIGTERM; the running phase was stopped. "
                      "Every section above is complete.")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def seconds_table(spent: list[PhaseResult], total_s: float, budget_s: float) -> str:
    lines = ["## Where the seconds went", "",
             f"Wall time {total_s:.1f} s of a {budget_s:.0f} s budget.", "",
             "| phase | status | seconds | limit | share |", "|---|---|---:|---:|---:|"]
    for r in spent:
        share = f"{100 * r.seconds / total_s:.0f}%" if total_s > 0 else ""
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.timeout_s:.0f} | {share} |")
    other = total_s - sum(r.seconds for r in spent)
    lines.append(f"| (runner, installs) | | {max(other, 0):.1f} | | |")
    return "\n".join(lines)


# --- preflight ------------------------------------------------------------------------------

_PROBE_PACKAGES = r"""
import importlib.metadata, importlib.util, json, sys, sysconfig, os
names = json.loads(sys.argv[1])
out = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
for mod, dist in names:
    try:
        found = importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        found = False
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    out["packages"][mod] = {"found": found, "version": version}
inc = sysconfig.get_paths().get("include") or ""
out["python_h"] = os.path.join(inc, "Python.h") if os.path.exists(os.path.join(inc, "Python.h")) else None
out["python_include"] = inc
print(json.dumps(out))
"""

_PROBE_TORCH = r"""
import json, os
out = {}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out["device"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "sms": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                         "count": torch.cuda.device_count()}
        out["cudnn"] = torch.backends.cudnn.version()
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    out["triton"] = triton.__version__
    import triton.backends.nvidia as nv
    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    out["ptxas"] = ptxas if os.path.exists(ptxas) else None
except Exception as exc:
    out["triton_error"] = f"{type(exc).__name__}: {exc}"
try:
    import nvidia.dali
    out["dali"] = nvidia.dali.__version__
except Exception as exc:
    out["dali_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def _run_probe(argv: list[str], timeout_s: float) -> tuple[dict | None, str]:
    """(the JSON a probe printed, or None; an error line)."""
    try:
        proc = subprocess.run(argv, cwd=REPO, env=phase_env({}), capture_output=True, text=True,
                              timeout=max(timeout_s, 1.0), start_new_session=True)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    except OSError as exc:
        return None, f"could not start: {exc}"
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]), ""
    except (IndexError, ValueError):
        return None, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]


def _command_output(argv: list[str], timeout_s: float = 10.0) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def c_compiler() -> tuple[str | None, str]:
    """(path, version line) of the C compiler Triton's launcher build would use (``CC``, else
    the first of cc / gcc / clang on PATH), or (None, "")."""
    for name in [os.environ.get("CC")] + ["cc", "gcc", "clang"]:
        path = shutil.which(name) if name else None
        if path:
            out = _command_output([path, "--version"]) or ""
            return path, (out.splitlines() or [""])[0]
    return None, ""


def nvidia_smi() -> dict:
    out = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if out is None:
        return {}
    info = {"gpus": [line.strip() for line in out.strip().splitlines() if line.strip()]}
    header = _command_output(["nvidia-smi"]) or ""
    match = re.search(r"CUDA Version:\s*([\d.]+)", header)
    if match:
        info["driver_cuda"] = match.group(1)
    return info


def install_wheels(python: str, wheels: Path, missing: list[tuple[str, str, str]]) -> list[str]:
    """pip-install each missing package offline from ``wheels``; one report line each."""
    lines = []
    for mod, dist, _ in missing:
        t0 = time.monotonic()
        try:
            proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), dist],
                                  capture_output=True, text=True, timeout=180)
            ok, why = proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            ok, why = False, "timed out after 180 s"
        took = time.monotonic() - t0
        lines.append(f"- installed {dist} from {wheels} ({took:.0f} s)" if ok
                     else f"- MISSING {dist}: not installed from {wheels}: {why}")
    return lines


def preflight(python: str, wheels: Path | None, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> tuple[str, dict]:
    """(markdown section, JSON) of the preflight; ``json["cuda"]`` says whether to go on."""
    t0 = time.monotonic()
    names = json.dumps([(m, d) for m, d, _ in PACKAGES])
    install_lines: list[str] = []
    pkgs, err = _run_probe([python, "-c", _PROBE_PACKAGES, names], timeout_s)
    if pkgs is not None and wheels is not None:
        missing = [p for p in PACKAGES if not pkgs["packages"][p[0]]["found"]]
        if missing:
            install_lines = install_wheels(python, wheels, missing)
            pkgs, err = _run_probe([python, "-c", _PROBE_PACKAGES, names], timeout_s)
        else:
            install_lines = [f"- --wheels {wheels}: nothing to install"]
    t_probe = time.monotonic()
    info, torch_err = _run_probe([python, "-c", _PROBE_TORCH], max(timeout_s - (t_probe - t0), 5.0))
    info = info or {}
    smi = nvidia_smi()
    cc, cc_version = c_compiler()
    lines, missing_lines = [], []

    if smi.get("gpus"):
        cuda = f", driver CUDA {smi['driver_cuda']}" if smi.get("driver_cuda") else ""
        lines.append(f"- GPU (nvidia-smi: name, driver, memory): {'; '.join(smi['gpus'])}{cuda}")
    else:
        missing_lines.append("- MISSING nvidia-smi: not found or failed (no NVIDIA driver visible)")
    if pkgs is None:
        missing_lines.append(f"- MISSING {python}: cannot run it ({err})")
    else:
        lines.append(f"- Python {pkgs['python']} ({pkgs['executable']})")
    if "torch" in info:
        dev = info.get("device")
        where = (f"{dev['name']} x{dev['count']}, {dev['memory_gib']} GiB, {dev['sms']} SMs, "
                 f"compute capability {dev['capability']}") if dev else "no CUDA device"
        lines.append(f"- torch {info['torch']} (built for CUDA {info.get('torch_cuda')}, cuDNN "
                     f"{info.get('cudnn')}): {where}")
    else:
        missing_lines.append(f"- MISSING torch: cannot import it ({info.get('torch_error') or torch_err})")
    if "triton" in info:
        ptxas = info.get("ptxas") or "MISSING (Triton cannot compile for the GPU)"
        lines.append(f"- triton {info['triton']}; bundled ptxas: {ptxas}")
    else:
        missing_lines.append(f"- MISSING triton: cannot import it ({info.get('triton_error') or torch_err})")
    lines.append(f"- DALI {info['dali']}" if "dali" in info else
                 "- DALI: not importable (the dali loader rows are skipped; optional)")
    if cc:
        lines.append(f"- C compiler (Triton's launcher build): {cc} ({cc_version})")
    else:
        missing_lines.append("- MISSING C compiler (cc/gcc/clang, or CC): Triton builds its CUDA launcher "
                             "with one at the first kernel launch, so every Triton kernel and torch.compile "
                             "on CUDA fails; install gcc")
    if pkgs is not None:
        if pkgs["python_h"]:
            lines.append(f"- Python.h: {pkgs['python_h']}")
        else:
            missing_lines.append(f"- MISSING Python.h (not in {pkgs['python_include']}): Triton's launcher build "
                                 "needs it; install the python3-dev / python3.X-dev package")
        present = []
        for mod, dist, needed_by in PACKAGES:
            p = pkgs["packages"][mod]
            if p["found"]:
                present.append(f"{dist} {p['version'] or '?'}")
            elif mod not in OPTIONAL:
                hint = f" (--wheels DIR installs it offline)" if wheels is None else ""
                missing_lines.append(f"- MISSING {dist}: needed by {needed_by}{hint}")
        lines.append(f"- packages: {', '.join(present)}")
    has_cuda = bool(info.get("cuda_available"))
    seconds = time.monotonic() - t0
    body = "\n".join(install_lines + lines)
    if missing_lines:
        body += "\n\nMissing (each blocks what it names):\n\n" + "\n".join(missing_lines)
    else:
        body += "\n\nNothing missing."
    payload = {"seconds": round(seconds, 2), "cuda": has_cuda, "torch": info, "packages": pkgs,
               "nvidia_smi": smi, "c_compiler": cc, "c_compiler_version": cc_version,
               "missing": missing_lines, "installs": install_lines}
    return f"## Preflight ({seconds:.1f} s)\n\n{body}", payload


# --- summaries ----------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def summarise_smoke(result: PhaseResult, report_dir: Path, log_name: str) -> tuple[str, dict]:
    """steps/s (median of the logged intervals after the first), the first interval's, and the
    start-up (process wall time minus the training loop's: imports, data, compile, capture)."""
    records = _read_jsonl(report_dir / log_name)
    if not records:
        return "No training log line was written.", {}
    rates = [float(r["steps_per_s"]) for r in records if r.get("steps_per_s")]
    steady = sorted(rates[1:])[len(rates[1:]) // 2] if len(rates) > 1 else (rates[0] if rates else float("nan"))
    loop_s = float(records[-1].get("elapsed_s", 0.0))
    summary = {"steps": records[-1].get("step"), "steps_per_s": steady, "first_interval_steps_per_s": rates[0] if rates else None,
               "startup_s": result.seconds - loop_s, "loop_s": loop_s, "final_loss": records[-1].get("loss"),
               "intervals": len(records)}
    body = (f"- steps/s: **{steady:,.0f}** (median of {len(rates) - 1} logged intervals after the first; "
            f"first interval {summary['first_interval_steps_per_s'] or float('nan'):,.0f})\n"
            f"- start-up + compile + graph capture: {summary['startup_s']:.1f} s (process wall time minus "
            f"the loop's {loop_s:.1f} s)\n"
            f"- step {summary['steps']}: loss {summary['final_loss']}")
    return body, summary


def _pytest_cases_from_log(log: str) -> dict[str, str]:
    """test id -> outcome from ``pytest -v`` lines (what a cut run leaves)."""
    cases = {}
    for match in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log, re.M):
        cases[match.group(1)] = match.group(2).lower()
    return cases


def summarise_pytest(result: PhaseResult, report_dir: Path, junit: str) -> tuple[str, dict]:
    """Counts and failing tests from the JUnit XML, or (cut runs) from the -v log lines."""
    cases: dict[str, str] = {}
    messages: dict[str, str] = {}
    xml_path = report_dir / junit
    if xml_path.exists():
        for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
            cid = f"{case.get('classname')}::{case.get('name')}"
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                child = case.find(tag)
                if child is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    messages[cid] = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
                    break
            cases[cid] = outcome
        source = "JUnit XML"
    else:
        log_path = report_dir / f"{result.name}.log"
        cases = _pytest_cases_from_log(log_path.read_text(errors="replace") if log_path.exists() else "")
        source = "the -v log (the run was cut: tests after the last line did not run)"
    counts: dict[str, int] = {}
    for outcome in cases.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    bad = [c for c, o in cases.items() if o in ("failed", "error")]
    lines = [f"- {', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'no test ran'} (from {source})"]
    lines += [f"- {o.upper()} {c}" + (f": {messages[c]}" if messages.get(c) else "") for c in bad for o in [cases[c]]]
    return "\n".join(lines), {"counts": counts, "failed": bad, "messages": {c: messages.get(c, "") for c in bad}}


def summarise_benchmarks(result: PhaseResult, report_dir: Path, bench_json: str, junit: str) -> tuple[str, dict]:
    """One table per benchmark group: rate, ratio to the group's reference/slowest row, ms/call."""
    path = report_dir / bench_json
    body, summary = "", {}
    if path.exists():
        sys.path.insert(0, str(REPO))
        from bench.report import load_groups

        data = json.loads(path.read_text())
        groups = load_groups(data)
        out = []
        for group, rows in groups.items():
            out += [f"### {group}", "", f"| row | rate | x vs {rows[0]['base']} | ms / call | peak MiB | other |",
                    "|---|---:|---:|---:|---:|---|"]
            for bench, r in zip([b for b in data["benchmarks"] if (b.get("group") or b["name"]) == group], rows):
                info = bench.get("extra_info", {})
                name = info.get("impl") or r["name"]
                extra = ", ".join(f"{k} {info[k]:.2f}x" for k in ("speedup_vs_eager", "speedup_vs_compiled") if k in info)
                peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
                out.append(f"| {name} | {r['rate']:,.1f} {r['unit']} | {r['ratio']:.2f} | {r['mean_ms']:,.3f} | {peak} | {extra} |")
            out.append("")
        body = "\n".join(out)
        summary = {"groups": {g: [{k: r[k] for k in ("name", "rate", "unit", "ratio", "mean_ms", "peak_mb")} for r in rows]
                              for g, rows in groups.items()}}
    else:
        body = "No benchmark JSON was written (pytest-benchmark writes it at the end of the run)."
    tests_body, tests = summarise_pytest(result, report_dir, junit)
    summary["tests"] = tests
    return f"{body}\n\nBenchmark runs as tests:\n{tests_body}", summary


def summarise_parity(result: PhaseResult, report_dir: Path, parity_json: str) -> tuple[str, dict]:
    path = report_dir / parity_json
    if not path.exists():
        return "No parity JSON was written.", {}
    data = json.loads(path.read_text())
    lines = [f"{data.get('steps')} steps, {data.get('config')}; deviation = max over steps of "
             "|fast - reference| / (1 + |reference|) per loss, and the largest parameter difference.", "",
             "| mode | worst loss deviation (which) | loss tolerance | max param diff | param tolerance | build s | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for mode, m in data.get("modes", {}).items():
        if "error" in m:
            lines.append(f"| {mode} | | | | | | **ERROR** {m['error']} |")
            continue
        verdict = "within" if m["within_tolerance"] else "**OUTSIDE**"
        lines.append(f"| {mode} | {m['worst_loss_deviation']:.2e} ({m['worst_loss']}) | {m['loss_rtol']:.1e} | "
                     f"{m['max_param_diff']:.2e} | {m['param_atol']:.1e} | {m['build_s']:.1f} | {verdict} |")
    return "\n".join(lines), data


def summarise_pack(result: PhaseResult, report_dir: Path, pack_json: str) -> tuple[str, dict]:
    """The pack phase's table (run-steps/s per method and K) and the seed-fig3 projection."""
    path = report_dir / pack_json
    if not path.exists():
        return "No pack JSON was written.", {}
    data = json.loads(path.read_text())
    lines = [f"{data.get('steps')} timed steps per pack, batch {data.get('batch_size')}, the seed-fig3 preset's "
             "runs (beta-VAE defaults; FactorVAE paper settings: 5 D updates, second batch); run-steps/s = K x "
             "the pack's steps/s.", "", "| method | K | mechanism | pack steps/s | run-steps/s | build s |",
             "|---|---:|---|---:|---:|---:|"]
    for method, rows in data.get("methods", {}).items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {method} | {r['k']} | {r.get('mechanism', '')} | **ERROR** {r['error']} | | |")
            else:
                lines.append(f"| {method} | {r['k']} | {r.get('mechanism', '')} | {r['steps_per_s']:.1f} | "
                             f"{r['run_steps_per_s']:.0f} | {r['build_s']:.1f} |")
    proj = data.get("projection", {})
    if proj.get("complete"):
        best = ", ".join(f"{m} at K = {r['k']}" for m, r in proj["best"].items())
        lines += ["", f"seed-fig3 ({proj['runs']} runs x {proj['steps_per_run']:,} steps) at the best measured rates "
                      f"({best}): **{proj['hours']:.2f} h** of training (goal <= 1 h; evaluation not counted)."]
    return "\n".join(lines), data


# --- the CUDA phases ----------------------------------------------------------------------

def _smoke_phase(python: str, report_dir: Path, precision: str, steps: int, timeout_s: float) -> Phase:
    name = f"smoke-{precision}"
    run_dir = report_dir / f"{name}.run"
    log_copy = f"{name}.train_log.jsonl"

    def after():
        log = run_dir / "train_log.jsonl"
        if log.exists():
            shutil.copyfile(log, report_dir / log_copy)
        shutil.rmtree(run_dir, ignore_errors=True)  # the checkpoint stays out of the report

    argv = [python, "-m", "fastfvae", "train", "--fast", "--steps", str(steps), "--log-every", str(max(steps // 6, 1)),
            "--ckpt-every", "0", "--precision", precision, "--no-progress", "--no-figures", "--out", str(run_dir)]
    return Phase(name, f"(a) smoke: fastfvae train --fast, paper networks, batch 64, {precision}", argv, timeout_s,
                 summarise=lambda r, d: summarise_smoke(r, d, log_copy), before=after, after=after, min_s=30)


def pytest_phase(python: str, report_dir: Path, name: str, title: str, targets: list[str], timeout_s: float, *,
                 k: str | None = None, bench: bool = False, env: dict | None = None, min_s: float = 20) -> Phase:
    """pytest on ``targets`` (``-k k``), JUnit XML (and with ``bench`` the benchmark JSON) in the report folder."""
    junit, bench_json = f"{name}.xml", f"{name}.bench.json"
    argv = [python, "-m", "pytest", *targets, "-v", "--tb=short", "-rfE", f"--junitxml={report_dir / junit}"]
    if k:
        argv += ["-k", k]
    if bench:
        argv += ["--benchmark-only", f"--benchmark-json={report_dir / bench_json}"]

        def summarise(r, d):
            return summarise_benchmarks(r, d, bench_json, junit)
    else:
        def summarise(r, d):
            return summarise_pytest(r, d, junit)
    return Phase(name, title, argv, timeout_s, summarise=summarise, env=env or {}, min_s=min_s)


def cuda_phases(python: str, report_dir: Path, smoke_steps: int = 300) -> list[Phase]:
    """The phases of a CUDA machine, in order of value (see the module doc)."""
    phases = [
        _smoke_phase(python, report_dir, "fp32", smoke_steps, 110),
        _smoke_phase(python, report_dir, "bf16", smoke_steps, 90),
        Phase("parity", "(b) parity on the GPU: 50 steps fast vs reference, fp32 / TF32 / bf16",
              [python, "-m", "bench.gpu_check_parity", "--json", str(report_dir / PARITY_MODES_JSON), "--steps", "50"],
              120, summarise=lambda r, d: summarise_parity(r, d, PARITY_MODES_JSON), min_s=30),
        pytest_phase(python, report_dir, "op-tests", "(c) op tests, CUDA cases only (one GEMM config: "
                     "FASTFVAE_AUTOTUNE=0)", OP_TEST_FILES, 150, k="cuda", env={"FASTFVAE_AUTOTUNE": "0"}),
        # the graphed pack's correctness before its speed: the pack phase measures that mechanism
        pytest_phase(python, report_dir, "pack-graph", "(c2) graphed pack parity, CUDA cases: model k vs its "
                     "single graphed run (K = 1, 3; FactorVAE, beta-VAE), resume bit for bit",
                     PACK_GRAPH_TEST_FILES, 120, k="cuda", min_s=30),
        Phase("pack", "(c3) packs: run-steps/s of K runs as one step, K = 1, 8, 32, 60, and the seed-fig3 "
              "projection", [python, "-m", "bench.gpu_check_pack", "--json", str(report_dir / PACK_JSON)], 120,
              summarise=lambda r, d: summarise_pack(r, d, PACK_JSON), min_s=30),
    ]
    for config in TRAIN_STEP_CONFIGS:
        phases.append(pytest_phase(
            python, report_dir, f"bench-step-{config}", f"(d) train-step benchmark {config}: reference, fast, "
            "fast-bf16 (on CUDA fast includes the fused ops)", ["bench/bench_train_step.py"], 90,
            k=train_step_selection(config), bench=True))
    phases += [
        pytest_phase(python, report_dir, "bench-ops", "(d) op benchmarks at B = 64 / 128: eager vs fastfvae",
                     ["bench/bench_ops.py"], 60, k=OPS_SELECTION, bench=True),
        pytest_phase(python, report_dir, "bench-loaders", "(e) loaders (samples/s)", ["bench/bench_loaders.py"], 60,
                     bench=True),
        pytest_phase(python, report_dir, "bench-ops-compiled", "(f) op benchmarks at B = 64 / 128 with the "
                     "torch.compile rows (if time is left)", ["bench/bench_ops.py"], 90,
                     k=OPS_COMPILED_SELECTION, bench=True),
    ]
    return phases


# --- main ---------------------------------------------------------------------------------

def _header(report_dir: Path, budget_s: float) -> str:
    commit = _command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown\n"
    dirty = _command_output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# fastfvae GPU check\n\n- {when}, commit {commit.strip()}{' (dirty tree)' if dirty else ''}\n"
            f"- budget {budget_s:.0f} s of wall time; raw output: <phase>.log and <phase>.json beside this file")


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="gpu_check", description="Budgeted GPU check; see docs/gpu.md.")
    p.add_argument("report_dir", metavar="REPORT_DIR", help="folder for report.md and the raw output (created)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"wall-time budget of the whole run (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--wheels", default=None, metavar="DIR", help="install missing packages offline from DIR first")
    p.add_argument("--smoke-steps", type=int, default=300, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget:g}")
    if args.wheels is not None and not Path(args.wheels).is_dir():
        p.error(f"--wheels {args.wheels}: not a directory")
    if Path(args.report_dir).exists() and not Path(args.report_dir).is_dir():
        p.error(f"REPORT_DIR {args.report_dir} exists and is not a directory")
    return args


def main(argv: list[str] | None = None, phases_for: Callable[[str, Path], list[Phase]] | None = None) -> int:
    """The whole check. ``phases_for(python, report_dir)``: the phases to run after the
    preflight (default: `cuda_phases`; tests pass their own)."""
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget
    report_dir = Path(args.report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    python = os.environ.get("PYTHON") or sys.executable
    report = Report(report_dir)
    report.append(_header(report_dir, args.budget))
    section, pre = preflight(python, Path(args.wheels).resolve() if args.wheels else None,
                             min(PREFLIGHT_TIMEOUT_S, args.budget))
    report.append(section)
    report.write_json("preflight", pre)
    spent = [PhaseResult("preflight", "preflight", "ok", seconds=pre["seconds"], timeout_s=PREFLIGHT_TIMEOUT_S)]
    if not pre["cuda"] and phases_for is None:
        report.append("## Nothing to measure\n\nNo CUDA device is visible to torch (torch.cuda.is_available() is "
                      "False): every phase after the preflight needs one. Exit status 3.")
        report.append(seconds_table(spent, time.monotonic() - t0, args.budget))
        print(f"gpu_check: no CUDA device; preflight written to {report.path} (exit {NO_CUDA_EXIT})", file=sys.stderr)
        return NO_CUDA_EXIT
    phases = (phases_for or (lambda py, d: cuda_phases(py, d, args.smoke_steps)))(python, report_dir)
    try:
        run_phases(phases, report, deadline, spent)
    except _Interrupted:
        report.append(seconds_table(spent, time.monotonic() - t0, args.budget))
        return 143
    report.append(seconds_table(spent, time.monotonic() - t0, args.budget))
    bad = [r.name for r in spent if r.status != "ok"]
    print(f"gpu_check: report written to {report.path}" + (f"; not ok: {', '.join(bad)}" if bad else ""),
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
