"""`python -m bench.report`: ratios against the reference row, markdown table, PNG chart."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import load_groups, main  # noqa: E402


def _bench(group, variant, mean, steps_per_s=None):
    info = {"variant": variant}
    if steps_per_s is not None:
        info["steps_per_s"] = steps_per_s
    return {"group": group, "name": f"test[{variant}]", "fullname": f"b.py::test[{variant}]",
            "param": variant, "stats": {"mean": mean}, "extra_info": info}


def test_report_ratios_table_and_chart(tmp_path, capsys):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"machine_info": {"node": "n"}, "benchmarks": [
        _bench("step b64", "fast", 0.5, steps_per_s=30.0),
        _bench("step b64", "reference", 1.0, steps_per_s=10.0),
        _bench("ops", "a", 2.0), _bench("ops", "b", 1.0),
    ]}))
    groups = load_groups(results)
    fast = next(r for r in groups["step b64"] if r["name"] == "fast")
    assert fast["ratio"] == 3.0 and fast["base"] == "reference"
    assert [r["ratio"] for r in groups["ops"]] == [1.0, 2.0]  # no reference row: vs the slowest
    assert main([str(results), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| fast | 30.00 steps/s | 3.00 |" in text
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert main([str(tmp_path / "missing.json")]) == 2


def test_report_prints_interleaved_ratios(tmp_path):
    bench = _bench("paper interleaved", "interleaved", 1.0, steps_per_s=24.0)
    bench["extra_info"]["interleaved_ratios"] = {"fast-bf16 vs reference-heap": 2.46, "fast vs reference-heap": 1.41}
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"machine_info": {}, "benchmarks": [bench]}))
    assert main([str(results), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "interleaved rounds: fast-bf16 vs reference-heap 2.46x, fast vs reference-heap 1.41x" in text
