"""`python -m bench.report`: ratios against the reference row, markdown table, PNG chart."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import README_BEGIN, README_END, load_groups, main  # noqa: E402


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


MACHINE = {"node": "box", "system": "Linux", "release": "6.1", "machine": "x86_64", "python_version": "3.11.7",
           "cpu": {"brand_raw": "Test CPU 9000", "count": 2},
           "torch": {"version": "2.13.0+cpu", "threads": 2, "cpu_capability": "AVX512", "cuda": None}}


def _interleaved_results(tmp_path, **top):
    bench = _bench("train step paper-d1, interleaved (cpu)", "interleaved", 20.0, steps_per_s=24.0)
    bench["extra_info"].update(
        ms_per_step={"reference": 130.0, "reference-heap": 100.0, "fast": 72.0, "fast-bf16": 42.5},
        interleaved_ratios={"fast vs reference": 1.81, "fast-bf16 vs reference": 3.06, "fast-bf16 vs reference-heap": 2.35},
        interleaved_ratio_range={"fast-bf16 vs reference": [2.9, 3.2]}, rounds=10)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"machine_info": MACHINE, "datetime": "2026-12-01T10:00:42.5+00:00",
                                   "commit_info": {"id": "8e7557bc5a0be43df2f3", "dirty": False},
                                   "benchmarks": [bench], **top}))
    return results


def test_report_states_the_date_and_the_machine_of_the_run(tmp_path):
    results = _interleaved_results(tmp_path)
    assert main([str(results), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "- Run: 2026-12-01 10:00 UTC" in text
    assert "- Machine: box: Test CPU 9000, 2 CPUs, Linux 6.1 x86_64, Python 3.11.7, torch 2.13.0+cpu (AVX512, 2 threads)" in text
    assert "- Code: commit 8e7557bc5a" in text


def test_docs_regenerates_the_performance_page_and_only_the_readme_block(tmp_path):
    results = _interleaved_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{README_BEGIN}\nold table\n{README_END}\n\n## after\n")
    assert main([str(results), "--docs", "--root", str(tmp_path)]) == 0
    page = (tmp_path / "docs" / "performance.md").read_text()
    assert "- Run: 2026-12-01 10:00 UTC" in page and "- Machine: box: Test CPU 9000, 2 CPUs" in page
    assert "| fast path, `--precision bf16` | 42.5 | 3.06 (2.90–3.20) | 2.35 |" in page
    assert "median over 10 rounds" in page and "rough" not in page  # 3.2 / 2.9: a narrow spread
    assert "rough" not in readme.read_text()
    text = readme.read_text()
    assert text.startswith("# intro\n\n") and text.endswith("\n\n## after\n") and "old table" not in text
    assert "| fast path, `--precision bf16` | 3.06 |" in text
    assert "Measured 2026-12-01 on Test CPU 9000 (2 CPUs)" in text
    assert "2.35" not in text  # the README keeps the ratios to the plain reference only


def test_docs_without_the_readme_markers_fails_and_writes_nothing(tmp_path, capsys):
    results = _interleaved_results(tmp_path)
    (tmp_path / "README.md").write_text("# no markers\n")
    assert main([str(results), "--docs", "--root", str(tmp_path)]) == 2
    assert "bench-table" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists() and (tmp_path / "README.md").read_text() == "# no markers\n"


def test_docs_flags_rounds_that_disagree_widely(tmp_path):
    results = _interleaved_results(tmp_path)
    data = json.loads(results.read_text())
    data["benchmarks"][0]["extra_info"]["interleaved_ratio_range"]["fast-bf16 vs reference"] = [1.0, 6.0]
    results.write_text(json.dumps(data))
    (tmp_path / "README.md").write_text(f"{README_BEGIN}\n{README_END}\n")
    assert main([str(results), "--docs", "--root", str(tmp_path)]) == 0
    assert "The rounds disagree by up to 6.0x" in (tmp_path / "docs" / "performance.md").read_text()
    # The README's table carries the same warning: its few lines must not read as precise figures.
    assert "The rounds disagree by up to 6.0x" in (tmp_path / "README.md").read_text()


def test_docs_states_ratios_to_the_well_known_implementation_when_timed(tmp_path):
    results = _interleaved_results(tmp_path)
    data = json.loads(results.read_text())
    info = data["benchmarks"][0]["extra_info"]
    info["ms_per_step"] = {"well-known": 110.0, **info["ms_per_step"]}
    info["interleaved_ratios"].update({"reference vs well-known": 0.85, "fast vs well-known": 1.53,
                                       "fast-bf16 vs well-known": 2.59})
    results.write_text(json.dumps(data))
    (tmp_path / "README.md").write_text(f"{README_BEGIN}\n{README_END}\n")
    assert main([str(results), "--docs", "--root", str(tmp_path)]) == 0
    page = (tmp_path / "docs" / "performance.md").read_text()
    assert "| step | ms / step | × well-known | × reference | × reference-heap |" in page
    assert "| the well-known PyTorch FactorVAE's iteration (`bench/wellknown_step.py`), plain heap | 110.0 | 1.00 |" in page
    assert "| fast path, `--precision bf16` | 42.5 | 2.59 | 3.06 (2.90–3.20) | 2.35 |" in page
    readme = (tmp_path / "README.md").read_text()
    assert "| paper config, one training step | × well-known implementation | × reference loop |" in readme
    assert "| fast path, `--precision bf16` | 2.59 | 3.06 |" in readme
    assert "| reference loop (`--reference`), plain PyTorch heap | 0.85 | 1.00 |" in readme
