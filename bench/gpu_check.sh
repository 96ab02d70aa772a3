#!/usr/bin/env bash
# GPU check of the fused ops: run the op tests on CUDA (bf16 included) and the benchmarks,
# and write a markdown report.
#
#   bench/gpu_check.sh REPORT_DIR [--cpu] [--ops-only] [--bench-k EXPR]
#
#   REPORT_DIR   created if missing; gets report.md, tests.txt, bench.txt, bench.json
#   --cpu        run without CUDA (tests on the CPU paths and the Triton interpreter, benchmarks
#                of the CPU paths); without it, a machine with no CUDA device is an error (exit 2)
#   --ops-only   benchmark bench/bench_ops.py only (default: everything, `pytest bench/`)
#   --bench-k EXPR  only the benchmarks pytest's `-k EXPR` selects (e.g. "not compiled": no
#                Inductor compile time, for a short device slot)
#
# The tests run with FASTFVAE_AUTOTUNE=0 (one GEMM config, no autotuning per test shape); the
# benchmarks autotune.
#
# Exit status: 0 when the tests and benchmarks pass, 1 when any failed (the report is written
# either way), 2 on bad usage or no CUDA device. PYTHON picks the interpreter (default: python).
set -euo pipefail

usage() { echo "usage: $0 REPORT_DIR [--cpu] [--ops-only] [--bench-k EXPR]" >&2; exit 2; }

REPORT_DIR=""
CPU_MODE=0
BENCH_TARGET="bench/"
BENCH_K=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) CPU_MODE=1 ;;
        --ops-only) BENCH_TARGET="bench/bench_ops.py" ;;
        --bench-k) [[ $# -ge 2 ]] || usage; BENCH_K=(-k "$2"); shift ;;
        -h|--help) sed -n 2,18p "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage ;;
        *) [[ -z "$REPORT_DIR" ]] || usage; REPORT_DIR="$1" ;;
    esac
    shift
done
[[ -n "$REPORT_DIR" ]] || usage

PYTHON="${PYTHON:-python}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$REPORT_DIR"
REPORT_DIR="$(cd "$REPORT_DIR" && pwd)"
cd "$REPO"

if ! "$PYTHON" -c "import torch, triton" 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import torch and triton; activate the project's environment" >&2
    exit 2
fi
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    MODE="cuda"
elif [[ "$CPU_MODE" == 1 ]]; then
    MODE="cpu"
    echo "gpu_check: no CUDA device; --cpu given, checking the CPU paths only"
else
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False);" \
         "run on a GPU machine, or pass --cpu to check the CPU paths" >&2
    exit 2
fi
if [[ "$MODE" == "cuda" ]]; then
    unset TRITON_INTERPRET FASTFVAE_TRITON_ON_CPU FASTFVAE_NO_TRITON || true
fi

status=0
echo "gpu_check: op tests ($MODE) ..."
set +e
FASTFVAE_AUTOTUNE=0 "$PYTHON" -m pytest tests/test_ops_permute.py tests/test_ops_gaussian.py tests/test_ops_mlp.py \
    tests/test_fast_graph.py -q -rfE -p no:randomly > "$REPORT_DIR/tests.txt" 2>&1
tests_rc=$?
echo "gpu_check: benchmarks ($BENCH_TARGET) ..."
"$PYTHON" -m pytest "$BENCH_TARGET" ${BENCH_K[@]+"${BENCH_K[@]}"} --benchmark-only -q -p no:randomly \
    --benchmark-json="$REPORT_DIR/bench.json" > "$REPORT_DIR/bench.txt" 2>&1
bench_rc=$?
set -e
[[ $tests_rc == 0 ]] || status=1
[[ $bench_rc == 0 ]] || status=1

{
    echo "# fastfvae GPU check ($MODE)"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
    "$PYTHON" - <<'PY'
import platform, torch, triton
print(f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"compute capability {p.major}.{p.minor}")
PY
    echo
    echo "## nvidia-smi"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1 || true; else echo "(nvidia-smi not found)"; fi
    echo '```'
    echo
    echo "## Op tests (exit $tests_rc)"
    echo
    echo '```'
    grep -E "passed|failed|error|FAILED|ERROR" "$REPORT_DIR/tests.txt" | tail -n 30 || true
    echo '```'
    echo
    echo "## Benchmarks (exit $bench_rc, \`pytest $BENCH_TARGET ${BENCH_K[*]:-} --benchmark-only\`)"
    echo
    if [[ -s "$REPORT_DIR/bench.json" ]]; then
        "$PYTHON" - "$REPORT_DIR/bench.json" <<'PY'
import json, sys
from collections import defaultdict

data = json.load(open(sys.argv[1]))
groups = defaultdict(list)
for b in data["benchmarks"]:
    groups[b.get("group") or b["fullname"].split("::")[0]].append(b)

def ms(seconds):
    return f"{seconds * 1e3:.3f}"

print("Times per call in ms (min over rounds). Speedups: the row's min vs the eager / compiled row's.")
print()
print("| group | implementation | min ms | mean ms | x vs eager | x vs compiled | other |")
print("|---|---|---:|---:|---:|---:|---|")
for group in sorted(groups):
    for b in groups[group]:
        info = dict(b.get("extra_info", {}))
        impl = info.pop("impl", b["name"])
        info.pop("device", None)
        per_call = info.pop("min_per_call_s", b["stats"]["min"])
        ratio = b["stats"]["mean"] / max(b["stats"]["min"], 1e-12)
        vs_eager = info.pop("speedup_vs_eager", None)
        vs_comp = info.pop("speedup_vs_compiled", None)
        fmt = lambda v: "" if v is None else f"{v:.2f}"
        other = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        print(f"| {group} | {impl} | {ms(per_call)} | {ms(per_call * ratio)} | {fmt(vs_eager)} | {fmt(vs_comp)} | {other} |")
PY
    else
        echo "(no benchmark results: see bench.txt)"
    fi
    echo
    echo "Raw logs: tests.txt, bench.txt, bench.json in this folder."
} > "$REPORT_DIR/report.md"

# The benchmark suite's own summary (train-step table + bar chart) from the same JSON.
if [[ -s "$REPORT_DIR/bench.json" ]]; then
    "$PYTHON" -m bench.report "$REPORT_DIR/bench.json" --out "$REPORT_DIR/summary" > /dev/null || status=1
fi
echo "gpu_check: report written to $REPORT_DIR/report.md (tests exit $tests_rc, benchmarks exit $bench_rc)"
exit $status
