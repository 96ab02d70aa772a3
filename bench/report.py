"""Summarise a pytest-benchmark JSON: ``python -m bench.report RESULTS.json [--out DIR]``.

Writes ``DIR/report.md`` (one markdown table per benchmark group: each row's rate, its ratio
to the group's reference/slowest row, time per call and peak memory) and ``DIR/report.png``
(one horizontal bar chart of the rates per group), and prints the markdown. Both start with
when the benchmarks ran and on what (the JSON's ``datetime``, ``machine_info`` and
``commit_info``).

``python -m bench.report --docs`` instead regenerates the project's performance page from the
committed run (``docs/bench/results.json``, or RESULTS when given): ``docs/performance.md`` and
the short table between the ``bench-table`` markers of ``README.md``. Both are generated, so the
documentation states exactly what one run measured, with its date and machine.

A row's rate is its ``extra_info`` ``steps_per_s`` or ``samples_per_s`` when the benchmark
recorded one, else calls/s (1 / mean); ``cpu_ms_per_step`` (process CPU time) is shown when
recorded; a row with ``interleaved_ratios`` (rows timed round by round, in turn) gets
them printed under its group's table. The ratio column is against the row named
``reference`` (variant) when the group has one, else against the slowest row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

RATE_KEYS = (("steps_per_s", "steps/s"), ("samples_per_s", "samples/s"))


def _row(bench: dict) -> dict:
    info = bench.get("extra_info", {})
    mean = bench["stats"]["mean"]
    for key, unit in RATE_KEYS:
        if key in info:
            rate = float(info[key])
            break
    else:
        rate, unit = 1.0 / mean if mean > 0 else math.inf, "calls/s"
    name = info.get("variant") or bench.get("param") or bench["name"]
    return {"name": str(name), "rate": rate, "unit": unit, "mean_ms": mean * 1e3,
            "peak_mb": info.get("peak_mb"), "cpu_ms": info.get("cpu_ms_per_step"), "full_name": bench["fullname"],
            "interleaved": info.get("interleaved_ratios"), "ranges": info.get("interleaved_ratio_range") or {},
            "ms_per_step": info.get("ms_per_step") or {}, "rounds": info.get("rounds")}


def read_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def load_groups(path_or_data) -> "OrderedDict[str, list[dict]]":
    """group -> rows, in the order the JSON lists them (a path, or the JSON already read)."""
    data = path_or_data if isinstance(path_or_data, dict) else read_results(path_or_data)
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for bench in data.get("benchmarks", []):
        groups.setdefault(bench.get("group") or bench["name"], []).append(_row(bench))
    for rows in groups.values():
        base = next((r for r in rows if r["name"] == "reference"), None) or min(rows, key=lambda r: r["rate"])
        for r in rows:
            r["ratio"] = r["rate"] / base["rate"] if base["rate"] > 0 else math.nan
            r["base"] = base["name"]
    return groups


def run_date(data: dict) -> str:
    """``YYYY-MM-DD HH:MM UTC`` of the run (pytest-benchmark's ``datetime``), or ``unknown date``."""
    stamp = data.get("datetime")
    if not stamp:
        return "unknown date"
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return str(stamp)
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def machine_line(data: dict) -> str:
    """The machine the run took place on, from ``machine_info`` (CPU, cores, OS, Python, torch)."""
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    parts = [f"{cpu.get('brand_raw') or info.get('processor') or 'unknown CPU'}, {cpu.get('count', '?')} CPUs"]
    if info.get("system"):
        parts.append(f"{info['system']} {info.get('release', '')} {info.get('machine', '')}".strip())
    parts.append(f"Python {info.get('python_version', '?')}")
    torch_info = info.get("torch") or {}
    if torch_info:
        parts.append(f"torch {torch_info.get('version', '?')} ({torch_info.get('cpu_capability', '?')}, "
                     f"{torch_info.get('threads', '?')} threads)")
        if torch_info.get("cuda"):
            parts.append(f"GPU {torch_info['cuda']}")
    return f"{info.get('node', '?')}: " + ", ".join(parts)


def run_lines(data: dict) -> list[str]:
    """Markdown lines: when the run was, on what machine, from which commit."""
    lines = [f"- Run: {run_date(data)}", f"- Machine: {machine_line(data)}"]
    commit = data.get("commit_info") or {}
    if commit.get("id"):
        dirty = " (with uncommitted changes)" if commit.get("dirty") else ""
        lines.append(f"- Code: commit {commit['id'][:10]}{dirty}")
    return lines


def markdown(groups, header: str = "", title: str = "# Benchmark report") -> str:
    lines = [f"{title}\n\n{header}\n" if header else f"{title}\n"]
    for group, rows in groups.items():
        lines += [f"## {group}\n", f"| row | rate | x vs {rows[0]['base']} | ms / call | CPU ms / step | peak MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            cpu = "" if r["cpu_ms"] is None else f"{r['cpu_ms']:,.1f}"
            lines.append(f"| {r['name']} | {r['rate']:,.2f} {r['unit']} | {r['ratio']:.2f} | {r['mean_ms']:,.2f} | {cpu} | {peak} |")
        for r in rows:
            if r["interleaved"]:  # rows timed in turn, round by round: drift hits every row alike
                ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r["interleaved"].items())
                lines.append(f"\n{r['name']}, interleaved rounds: {ratios}")
        lines.append("")
    return "\n".join(lines)


def bar_chart(groups, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    cols = min(2, n) or 1
    nrows = math.ceil(n / cols) if n else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 0.5 + 0.45 * max((len(r) for r in groups.values()), default=1) * nrows + nrows),
                             squeeze=False)
    for ax, (group, rows) in zip(axes.flat, groups.items()):
        names = [r["name"] for r in rows][::-1]
        rates = [r["rate"] for r in rows][::-1]
        colors = ["#999999" if r["name"] == "reference" else "#1f77b4" for r in rows][::-1]
        bars = ax.barh(names, rates, color=colors)
        for bar, r in zip(bars, rows[::-1]):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['rate']:,.3g} ({r['ratio']:.2f}x)",
                    va="center", fontsize=8)
        ax.set_title(group, fontsize=10)
        ax.set_xlabel(rows[0]["unit"])
        ax.set_xlim(0, max(rates) * 1.35 if rates else 1)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the generated documentation: docs/performance.md and README's table -------------------
ROOT = Path(__file__).resolve().parents[1]
DOCS_RESULTS = Path("docs/bench/results.json")
DOCS_PAGE = Path("docs/performance.md")
README = Path("README.md")
README_BEGIN = "<!-- bench-table:begin (generated by `python -m bench.report --docs`; do not edit) -->"
README_END = "<!-- bench-table:end -->"
HEADLINE_COMMAND = ("pytest bench/bench_train_step.py -k interleaved --benchmark-only "
                    "--benchmark-json docs/bench/results.json")
#: a ratio whose largest round exceeds its smallest by more than this is flagged as rough
WIDE_SPREAD = 1.5
#: what each interleaved row is, in the user's terms
ROW_LABELS = {
    "well-known": "the well-known PyTorch FactorVAE's iteration (`bench/wellknown_step.py`), plain heap",
    "reference": "reference loop (`--reference`), plain PyTorch heap",
    "reference-heap": "reference loop, heap kept (the fast path's allocator setting alone)",
    "fast": "fast path, fp32 (the default)",
    "fast-bf16": "fast path, `--precision bf16`",
}


#: the baselines the README's table states ratios against, and their column heads
README_BASES = ("well-known", "reference")
README_BASE_LABELS = {"well-known": "× well-known implementation", "reference": "× reference loop"}


def round_spread(row: dict) -> float:
    """How far an interleaved row's rounds disagree: the largest largest/smallest round ratio."""
    return max((high / low for low, high in row["ranges"].values() if low > 0), default=1.0)


def spread_warning(row: dict) -> list[str]:
    """One sentence when the rounds disagree by more than WIDE_SPREAD (else nothing)."""
    spread = round_spread(row)
    if spread <= WIDE_SPREAD:
        return []
    return [f"The rounds disagree by up to {spread:.1f}x: the machine's speed changed within rounds, "
            "so these medians are rough; a run on a quiet machine narrows the brackets."]


def interleaved_rows(groups) -> list[dict]:
    return [r for rows in groups.values() for r in rows if r["interleaved"]]


def _ratio_cell(row: dict, variant: str, base: str, ranges: bool) -> str:
    if variant == base:
        return "1.00"
    key = f"{variant} vs {base}"
    if key not in row["interleaved"]:
        return ""
    cell = f"{row['interleaved'][key]:.2f}"
    if ranges and key in row["ranges"]:
        low, high = row["ranges"][key]
        cell += f" ({low:.2f}–{high:.2f})"
    return cell


def interleaved_table(row: dict, ranges: bool = True, ms: bool = True) -> list[str]:
    """One line per timed row: ms a step (median round) and its ratio to each baseline (the
    median of the per-round ratios, with the smallest and largest round's in brackets)."""
    variants = list(row["ms_per_step"]) or sorted({k.split(" vs ")[0] for k in row["interleaved"]})
    bases = [v for v in variants if any(k.endswith(f" vs {v}") for k in row["interleaved"])]
    head = ["step"] + (["ms / step"] if ms else []) + [f"× {b}" for b in bases]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for v in variants:
        cells = [ROW_LABELS.get(v, v)]
        if ms:
            cells.append(f"{row['ms_per_step'][v]:,.1f}" if v in row["ms_per_step"] else "")
        cells += [_ratio_cell(row, v, b, ranges) for b in bases]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def performance_page(data: dict, groups) -> str:
    """docs/performance.md: the run's date and machine, the interleaved headline, other groups."""
    lines = ["# Performance", "",
             "<!-- generated by `python -m bench.report --docs` from docs/bench/results.json; do not edit by hand -->",
             "", "What one benchmark run measured; regenerate this page from a new run with", "",
             "```bash", HEADLINE_COMMAND, "python -m bench.report --docs", "```", "",
             *run_lines(data), ""]
    for row in interleaved_rows(groups):
        rounds = f"{row['rounds']} rounds" if row.get("rounds") else "every round"
        lines += ["## The paper config, interleaved", "",
                  "FactorVAE at the paper's settings (batch 64, z 10, discriminator 6 × 1000, one D update,",
                  "permuted codes from a second batch). Each round times a few steps of every row in turn, the",
                  "plain PyTorch loops in child processes (their default heap cannot be restored in the benchmark's",
                  "process), so a machine whose speed drifts slows all rows of a round alike: compare the",
                  f"ratios, not the milliseconds. Ratios: median over {rounds} of that round's ratio, the",
                  "smallest and largest round's in brackets; ms / step: each row's median round.", "",
                  *interleaved_table(row), ""]
        warning = spread_warning(row)
        lines += [*warning, ""] if warning else []
    others = OrderedDict((g, rows) for g, rows in groups.items() if not any(r["interleaved"] for r in rows))
    if others:
        lines += [markdown(others, title="## Other benchmarks in this run").rstrip(), ""]
    lines += ["What each lever of the fast path does, and its share of the step: [fast-path.md](fast-path.md);",
              "levers that were measured and not adopted: [dropped-levers.md](dropped-levers.md).", ""]
    return "\n".join(lines)


def readme_table(data: dict, groups) -> str:
    """The README's few lines: the interleaved ratios against the plain PyTorch loops (the
    well-known implementation's iteration, when the run timed it, and the reference loop)."""
    rows = interleaved_rows(groups)
    if not rows:
        raise ValueError("the results hold no interleaved comparison (run: " + HEADLINE_COMMAND + ")")
    row = rows[0]
    bases = [b for b in README_BASES if any(k.endswith(f" vs {b}") for k in row["interleaved"])]
    keep = {"ms_per_step": {v: t for v, t in row["ms_per_step"].items() if v != "reference-heap"},
            "interleaved": {k: r for k, r in row["interleaved"].items() if k.split(" vs ")[1] in bases}}
    table = interleaved_table({**row, **keep}, ranges=False, ms=False)
    table[0] = "| paper config, one training step | " + " | ".join(README_BASE_LABELS[b] for b in bases) + " |"
    cpu = (data.get("machine_info", {}).get("cpu", {}).get("brand_raw") or "unknown CPU")
    count = data.get("machine_info", {}).get("cpu", {}).get("count", "?")
    return "\n".join([README_BEGIN, *table, "",
                      f"Measured {run_date(data)[:10]} on {cpu} ({count} CPUs), interleaved rounds; details, machine "
                      "and ranges in [docs/performance.md](docs/performance.md).", *spread_warning(row), README_END])


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with the lines from the begin marker to the end marker replaced by ``block``."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README has no {README_BEGIN!r} ... {README_END!r} block")
    return text[:begin] + block + text[end + len(README_END):]


def write_docs(results: Path, root: Path) -> list[Path]:
    """Regenerate docs/performance.md and README's table under ``root``; the paths written."""
    data = read_results(results)
    groups = load_groups(data)
    readme = root / README
    text = replace_readme_block(readme.read_text(), readme_table(data, groups))  # checked before writing
    page = root / DOCS_PAGE
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(performance_page(data, groups))
    readme.write_text(text)
    return [page, readme]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=None,
                        help="a pytest-benchmark JSON (pytest ... --benchmark-json FILE); "
                             f"with --docs default {DOCS_RESULTS}")
    parser.add_argument("--out", default=None, help="folder for report.md and report.png (default: beside RESULTS)")
    parser.add_argument("--docs", action="store_true",
                        help=f"regenerate {DOCS_PAGE} and the README's benchmark table instead")
    parser.add_argument("--root", default=str(ROOT), help="the checkout --docs writes into (default: this one)")
    args = parser.parse_args(argv)
    if args.results is None and not args.docs:
        parser.error("give a results JSON, or --docs")
    root = Path(args.root)
    results = Path(args.results) if args.results else root / DOCS_RESULTS
    try:
        if args.docs:
            written = write_docs(results, root)
            print("wrote " + " and ".join(str(p) for p in written), file=sys.stderr)
            return 0
        data = read_results(results)
        groups = load_groups(data)
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench.report: error: {results}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else results.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(groups, "\n".join(run_lines(data)))
    (out / "report.md").write_text(text)
    bar_chart(groups, out / "report.png")
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'report.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
