"""Summarise a pytest-benchmark JSON: ``python -m bench.report RESULTS.json [--out DIR]``.

Writes ``DIR/report.md`` (one markdown table per benchmark group: each row's rate, its ratio
to the group's reference/slowest row, time per call and peak memory) and ``DIR/report.png``
(one horizontal bar chart of the rates per group), and prints the markdown.

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
            "interleaved": info.get("interleaved_ratios")}


def load_groups(path: str | Path) -> "OrderedDict[str, list[dict]]":
    """group -> rows, in the order the JSON lists them."""
    data = json.loads(Path(path).read_text())
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for bench in data.get("benchmarks", []):
        groups.setdefault(bench.get("group") or bench["name"], []).append(_row(bench))
    for rows in groups.values():
        base = next((r for r in rows if r["name"] == "reference"), None) or min(rows, key=lambda r: r["rate"])
        for r in rows:
            r["ratio"] = r["rate"] / base["rate"] if base["rate"] > 0 else math.nan
            r["base"] = base["name"]
    return groups


def machine_line(path: str | Path) -> str:
    info = json.loads(Path(path).read_text()).get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", "")
    return f"{info.get('node', '?')}: {cpu}, {info.get('cpu', {}).get('count', '?')} CPUs, Python {info.get('python_version', '?')}"


def markdown(groups, header: str = "") -> str:
    lines = [f"# Benchmark report\n\n{header}\n" if header else "# Benchmark report\n"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a pytest-benchmark JSON (pytest ... --benchmark-json FILE)")
    parser.add_argument("--out", default=None, help="folder for report.md and report.png (default: beside RESULTS)")
    args = parser.parse_args(argv)
    try:
        groups = load_groups(args.results)
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench.report: error: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.results).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(groups, machine_line(args.results))
    (out / "report.md").write_text(text)
    bar_chart(groups, out / "report.png")
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'report.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
