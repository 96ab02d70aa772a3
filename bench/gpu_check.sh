#!/usr/bin/env bash
# GPU check: a budgeted, incremental run on a lent GPU -> REPORT_DIR/report.md (see docs/gpu.md).
#
#   bench/gpu_check.sh REPORT_DIR [--budget SECONDS] [--wheels DIR]
#
#   --budget SECONDS  wall-time budget of the whole run (default 480)
#   --wheels DIR      install the missing Python packages offline from DIR first
#
# Preflight first (versions, compiler, Python.h, packages; every missing piece one line), then
# the phases in order of value, each under its own timeout, each appending its section to
# report.md the moment it ends. Exit status: 0 all phases ok, 1 a phase failed / timed out /
# was skipped, 2 bad usage, 3 no CUDA device (the report holds the preflight only).
# PYTHON picks the interpreter (default: python). The runner is bench/gpu_check.py.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n 2,13p "$0"; exit 0; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export PYTHON
exec env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m bench.gpu_check "$@"
