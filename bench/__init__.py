"""Benchmark suite (pytest-benchmark files ``bench_*.py``) and its report: ``python -m bench.report``."""
