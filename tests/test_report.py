"""`fastfvae report`: the tables hold the eval logs' numbers, the figures plot their means.

The fake sweep: three methods x two settings x three seeds, evaluated at three steps with
numbers from `score` (known, not round); one run lacks a metric (mig everywhere, beta_vae at
one step) and one writes the FactorVAE metric in the older dict form.
"""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fastfvae.errors import FastFVAEError
from fastfvae.viz import report

#: method -> (swept hyperparameter, its two values, the method's other hyperparameters)
METHODS = {
    "betavae": ("beta", (1.0, 4.0), {}),
    "factorvae": ("gamma", (10.0, 40.0), {"d_lr": 0.0001, "d_betas": [0.5, 0.9]}),
    "betatcvae": ("beta", (2.0, 6.0), {}),
}
SEEDS = (0, 1, 2)
STEPS = (100, 200, 300)
#: t_{0.975, 2}: the two-sided 95% Student-t quantile for three seeds (statistical tables).
T_975_DF2 = 4.302652729749464
#: The run with a missing metric (no mig at all, no beta_vae at step 200) and the run whose
#: factor_vae is the older dict form.
MISSING_RUN = "betavae_beta4_seed2"
OLD_FORM_RUN = "factorvae_gamma10_seed1"


def score(metric, method_index, setting_index, seed, step):
    """A known, unrounded number for each (metric, run, step)."""
    base = {"factor_vae": 0.3, "beta_vae": 0.5, "mig": 0.05, "sap": 0.02, "recon": 40.0}[metric]
    scale = 20.0 if metric == "recon" else 0.1
    return base + scale * (method_index / 3 + setting_index / 7 + seed ** 2 / 11 + step / 1300)


def run_name(method, value, seed):
    return f"{method}_{METHODS[method][0]}{value:g}_seed{seed}"


def write_run(folder, method, hparams, seed, lines):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"model": method, "hparams": hparams, "dataset": "dsprites", "seed": seed, "steps": STEPS[-1]}))
    (folder / "eval_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep folder: sweep.json and runs/<name>/ (config.json, eval_log.jsonl); returns
    (folder, {run name: the eval log lines as written})."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "sweep.json").write_text(json.dumps({"methods": list(METHODS)}))
    logs = {}
    for m, (method, (name, values, fixed)) in enumerate(METHODS.items()):
        for s, value in enumerate(values):
            for seed in SEEDS:
                run = run_name(method, value, seed)
                lines = []
                for step in STEPS:
                    line = {"step": step, "details": {"factor_vae": {"num_active_dims": 5}}, "seconds": {"all": 1.5}}
                    for metric in ("factor_vae", "beta_vae", "mig", "sap", "recon"):
                        line[metric] = score(metric, m, s, seed, step)
                    if run == MISSING_RUN:
                        del line["mig"]
                        if step == 200:
                            del line["beta_vae"]
                    if run == OLD_FORM_RUN:
                        line["factor_vae"] = {"eval_accuracy": line["factor_vae"], "train_accuracy": 0.99,
                                              "num_active_dims": 5}
                    lines.append(line)
                write_run(root / "runs" / run, method, {name: value, **fixed}, seed, lines)
                logs[run] = lines
    return root, logs


@pytest.fixture(scope="module")
def written(sweep):
    folder, logs = sweep
    return report.write_report(folder), logs


def logged(line, metric):
    """What the eval log says for ``metric`` (the dict form: its eval_accuracy)."""
    value = line.get(metric)
    return value["eval_accuracy"] if isinstance(value, dict) else value


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_holds_every_evaluation_with_the_logged_numbers(written):
    result, logs = written
    rows = read_csv(result.out / "results.csv")
    assert len(rows) == sum(len(lines) for lines in logs.values())
    assert list(rows[0])[:9] == ["run", "method", "beta", "d_betas", "d_lr", "gamma", "seed", "dataset", "step"]
    assert list(rows[0])[9:] == ["factor_vae", "beta_vae", "mig", "sap", "dci", "recon"]
    by_key = {(r["run"], int(r["step"])): r for r in rows}
    for run, lines in logs.items():
        method, swept = run.split("_")[0], METHODS[run.split("_")[0]][0]
        for line in lines:
            row = by_key[(run, line["step"])]
            assert row["method"] == method and row["dataset"] == "dsprites"
            assert row["seed"] == run[-1]
            assert float(row[swept]) == float(run.split("_")[1][len(swept):])
            for metric in report.METRICS:
                value = logged(line, metric)
                assert row[metric] == ("" if value is None else repr(value)), (run, line["step"], metric)
    assert by_key[(MISSING_RUN, 200)]["beta_vae"] == "" and by_key[(MISSING_RUN, 100)]["beta_vae"] != ""
    assert by_key[(OLD_FORM_RUN, 300)]["factor_vae"] == repr(logs[OLD_FORM_RUN][-1]["factor_vae"]["eval_accuracy"])
    factor_row = by_key[(run_name("factorvae", 10.0, 0), 100)]
    assert json.loads(factor_row["d_betas"]) == [0.5, 0.9] and factor_row["beta"] == ""


def test_final_csv_holds_each_runs_last_evaluation(written):
    result, logs = written
    rows = read_csv(result.out / "final.csv")
    assert sorted(r["run"] for r in rows) == sorted(logs)
    for row in rows:
        last = logs[row["run"]][-1]
        assert int(row["step"]) == last["step"]
        assert float(row["factor_vae"]) == logged(last, "factor_vae")
        assert float(row["recon"]) == last["recon"]


def test_every_figure_is_written_as_png_and_svg(written):
    result, _ = written
    for name in report.FIGURES:
        assert (result.out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (result.out / f"{name}.svg").read_text()
    assert not list(result.out.glob(".*.tmp"))


def csv_values(rows, method, swept_value, metric, step):
    swept = METHODS[method][0]
    return [float(r[metric]) for r in rows if r["method"] == method and float(r[swept] or "nan") == swept_value
            and int(r["step"]) == step and r[metric] != ""]


def test_figure3_is_a_column_per_method_and_a_line_per_setting(written):
    result, _ = written
    fig = result.figures["figure3"]
    axes = np.array(fig.axes).reshape(3, 3)
    titles = [[ax.get_title() for ax in row] for row in axes]
    assert titles[0] == ["beta-VAE: reconstruction error", "FactorVAE: reconstruction error",
                         "beta-TC-VAE: reconstruction error"]
    assert [row[0] for row in titles] == ["beta-VAE: reconstruction error", "beta-VAE: beta-VAE metric",
                                         "beta-VAE: FactorVAE metric"]
    for row, metric in zip(axes, report.FIGURE3_ROWS):
        for ax, method in zip(row, METHODS):
            assert ax.get_xlabel() == "training steps"
            assert ax.get_ylabel() == report.METRIC_LABELS[metric]
            name, values, _ = METHODS[method]
            assert [line.get_label() for line in ax.lines] == [f"{name}={v:g}" for v in values]
            assert ax.get_legend().get_title().get_text() == name
            assert len(ax.collections) == 2  # one shaded interval per setting
    assert "Figure 3" in fig._suptitle.get_text()


def test_figure3_plots_the_mean_over_seeds_of_the_csv_numbers(written):
    result, _ = written
    rows = read_csv(result.out / "results.csv")
    plotted = result.plotted["figure3"]
    fig_axes = np.array(result.figures["figure3"].axes).reshape(3, 3)
    for r, metric in enumerate(report.FIGURE3_ROWS):
        for c, (method, (name, values, _)) in enumerate(METHODS.items()):
            for i, value in enumerate(values):
                curve = plotted[(method, metric)][f"{name}={value:g}"]
                assert list(curve["steps"]) == list(STEPS)
                means = [np.mean(csv_values(rows, method, value, metric, step)) for step in STEPS]
                np.testing.assert_allclose(curve["mean"], means, rtol=1e-12)
                line = fig_axes[r, c].lines[i]
                np.testing.assert_allclose(line.get_ydata(), means, rtol=1e-12)
                np.testing.assert_array_equal(line.get_xdata(), STEPS)
    # the run without beta_vae at step 200: two seeds there, three elsewhere
    assert list(plotted[("betavae", "beta_vae")]["beta=4"]["n"]) == [3, 2, 3]


def test_figure3_shades_the_95_percent_t_interval(written):
    result, _ = written
    rows = read_csv(result.out / "results.csv")
    curve = result.plotted["figure3"][("factorvae", "factor_vae")]["gamma=40"]
    for k, step in enumerate(STEPS):
        seeds = csv_values(rows, "factorvae", 40.0, "factor_vae", step)
        assert len(seeds) == 3
        half = T_975_DF2 * np.std(seeds, ddof=1) / math.sqrt(3)
        assert curve["high"][k] - curve["mean"][k] == pytest.approx(half, rel=1e-9)
        assert curve["mean"][k] - curve["low"][k] == pytest.approx(half, rel=1e-9)
    # the shaded polygon spans the same interval
    ax = np.array(result.figures["figure3"].axes).reshape(3, 3)[2, 1]
    vertices = ax.collections[1].get_paths()[0].vertices
    assert vertices[:, 1].max() == pytest.approx(curve["high"].max())
    assert vertices[:, 1].min() == pytest.approx(curve["low"].min())


def test_t_interval_of_one_value_is_undefined():
    mean, low, high = report.t_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)


def test_scatter_is_one_point_per_run_at_its_final_numbers(written):
    result, logs = written
    finals = {r["run"]: r for r in read_csv(result.out / "final.csv")}
    fig = result.figures["scatter"]
    assert [ax.get_title() for ax in fig.axes] == ["FactorVAE metric vs reconstruction error",
                                                   "beta-VAE metric vs reconstruction error"]
    for ax, metric in zip(fig.axes, report.SCATTER_METRICS):
        assert ax.get_xlabel() == "final reconstruction error (BCE, nats/image)"
        assert ax.get_ylabel() == f"final {report.METRIC_LABELS[metric]}"
        points = result.plotted["scatter"][metric]
        assert sorted(p["run"] for p in points) == sorted(logs)
        for p in points:
            assert (p["recon"], p["score"]) == (float(finals[p["run"]]["recon"]), float(finals[p["run"]][metric]))
        # a point collection per (method, setting), each with that setting's three seeds
        assert len(ax.collections) == 6 and all(len(c.get_offsets()) == 3 for c in ax.collections)
        colours = {tuple(np.round(c.get_facecolor()[0], 6)) for c in ax.collections}
        assert len(colours) == 6
        markers = [c.get_paths()[0].vertices.shape for c in ax.collections]
        assert markers[0] == markers[1] and markers[0] != markers[2]  # a marker per method
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[:2] == ["beta-VAE beta=1", "beta-VAE beta=4"]


def test_violins_are_a_panel_per_metric_of_each_methods_final_scores(written):
    result, _ = written
    finals = read_csv(result.out / "final.csv")
    fig = result.figures["violins"]
    metrics = ["factor_vae", "beta_vae", "mig", "sap", "recon"]  # dci is in no log
    assert [ax.get_title() for ax in fig.axes] == [
        "final FactorVAE metric per method", "final beta-VAE metric per method", "final MIG per method",
        "final SAP score per method", "final reconstruction error per method"]
    for ax, metric in zip(fig.axes, metrics):
        assert ax.get_xlabel() == "method"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["beta-VAE", "FactorVAE", "beta-TC-VAE"]
        plotted = result.plotted["violins"][metric]
        for method in METHODS:
            expected = sorted(float(r[metric]) for r in finals if r["method"] == method and r[metric] != "")
            assert sorted(plotted[method]) == expected
        bodies = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
        assert len(bodies) == 3
    assert len(result.plotted["violins"]["mig"]["betavae"]) == 5  # the run without mig has no final mig


def test_cli_writes_the_report(sweep, tmp_path):
    folder, logs = sweep
    out = tmp_path / "elsewhere"
    result = subprocess.run([sys.executable, "-m", "fastfvae", "report", str(folder), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{len(logs)} run(s)" in result.stdout
    assert len(read_csv(out / "results.csv")) == sum(len(v) for v in logs.values())
    assert all((out / f"{n}{s}").is_file() for n in report.FIGURES for s in (".png", ".svg"))


def test_cli_folder_without_runs_is_one_line_exit_2(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no runs here")
    result = subprocess.run([sys.executable, "-m", "fastfvae", "report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfvae: error: no runs under"), result.stderr
    assert not (tmp_path / "report").exists()


def test_runs_found_at_any_depth_of_a_plain_folder(tmp_path):
    line = {"step": 10, "factor_vae": 0.7, "recon": 30.5}
    write_run(tmp_path / "a" / "run1", "betavae", {"beta": 1.0}, 0, [line])
    write_run(tmp_path / "b" / "deeper" / "run1", "betavae", {"beta": 2.0}, 0, [{**line, "factor_vae": 0.8}])
    (tmp_path / "report").mkdir()  # an earlier report's folder is not searched
    write_run(tmp_path / "report" / "stray", "betavae", {"beta": 3.0}, 0, [line])
    result = report.write_report(tmp_path)
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert [(r["run"], r["beta"], r["factor_vae"]) for r in rows] == [("a/run1", "1.0", "0.7"),
                                                                      ("b/deeper/run1", "2.0", "0.8")]
    assert [r.name for r in result.runs] == ["a/run1", "b/deeper/run1"]


def test_a_run_without_evaluations_is_left_out(tmp_path):
    write_run(tmp_path / "evaluated", "factorvae", {"gamma": 10.0}, 0, [{"step": 5, "factor_vae": 0.5}])
    write_run(tmp_path / "untrained", "factorvae", {"gamma": 20.0}, 0, [])
    result = report.write_report(tmp_path)
    assert result.without_evaluations == ["untrained"]
    assert [r["run"] for r in read_csv(tmp_path / "report" / "results.csv")] == ["evaluated"]


def test_no_evaluations_anywhere_is_one_line_and_writes_nothing(tmp_path):
    write_run(tmp_path / "untrained", "factorvae", {"gamma": 20.0}, 0, [])
    with pytest.raises(FastFVAEError, match="none of the 1 run.*--eval-every"):
        report.write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_a_bad_eval_line_names_its_file_and_line(tmp_path):
    write_run(tmp_path / "run", "betavae", {"beta": 1.0}, 0, [{"step": 5, "factor_vae": 0.5}])
    with open(tmp_path / "run" / "eval_log.jsonl", "a") as f:
        f.write('{"step": 10, "factor_vae": "high"}\n')
    with pytest.raises(FastFVAEError, match=r"eval_log.jsonl:2: factor_vae is 'high'; expected a number"):
        report.write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_a_torn_last_eval_line_is_skipped(tmp_path):
    write_run(tmp_path / "run", "betavae", {"beta": 1.0}, 0, [{"step": 5, "factor_vae": 0.5}])
    with open(tmp_path / "run" / "eval_log.jsonl", "a") as f:
        f.write('{"step": 10, "factor_')
    report.write_report(tmp_path)
    assert [r["step"] for r in read_csv(tmp_path / "report" / "results.csv")] == ["5"]


def test_recon_comes_from_the_training_log_where_no_evaluation_has_it(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"s{seed}", "betavae", {"beta": 4.0}, seed, [{"step": 200, "factor_vae": 0.5}])
        (tmp_path / f"s{seed}" / "train_log.jsonl").write_text("".join(
            json.dumps({"step": step, "loss": 1.0, "recon": 30.0 + seed + step / 100, "tc": None}) + "\n"
            for step in (100, 200)))
    result = report.write_report(tmp_path)
    assert result.plotted["figure3"][("betavae", "recon_source")] == "train_log"
    curve = result.plotted["figure3"][("betavae", "recon")]["beta-VAE"]
    assert list(curve["steps"]) == [100, 200]
    np.testing.assert_allclose(curve["mean"], [31.5, 32.5])
    assert result.figures["figure3"].axes[0].get_title() == "beta-VAE: reconstruction error (training log)"
    assert [p["recon"] for p in result.plotted["scatter"]["factor_vae"]] == [32.0, 33.0]


def test_tensorboard_without_the_package_names_the_extra(tmp_path, monkeypatch):
    write_run(tmp_path / "run", "betavae", {"beta": 1.0}, 0, [{"step": 5, "factor_vae": 0.5}])
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # importing it raises ImportError
    with pytest.raises(FastFVAEError, match=r"pip install 'fastfvae\[tb\]'"):
        report.write_report(tmp_path, tensorboard=True)
    assert not (tmp_path / "report").exists()


@pytest.mark.requires_extra("tb")
def test_tensorboard_event_files_hold_the_csv_numbers(sweep, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, logs = sweep
    result = report.write_report(folder, out=tmp_path / "tb_report", tensorboard=True)
    rows = read_csv(result.out / "results.csv")
    run = OLD_FORM_RUN
    events = EventAccumulator(str(result.out / "tensorboard" / run))
    events.Reload()
    for metric in ("factor_vae", "recon"):
        scalars = events.Scalars(f"eval/{metric}")
        expected = [(int(r["step"]), float(r[metric])) for r in rows if r["run"] == run]
        assert [(s.step, s.value) for s in scalars] == [(st, pytest.approx(v, rel=1e-6)) for st, v in expected]
    assert sorted(p.name for p in (result.out / "tensorboard").iterdir()) == sorted(logs)


def test_a_config_without_a_model_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(FastFVAEError, match=r"config.json has no \"model\"; expected a run's config"):
        report.write_report(tmp_path)


def test_an_out_that_is_a_file_is_one_line_and_keeps_the_file(tmp_path):
    write_run(tmp_path / "run", "betavae", {"beta": 1.0}, 0, [{"step": 5, "factor_vae": 0.5}])
    (tmp_path / "report").write_text("mine")
    with pytest.raises(FastFVAEError, match="report exists and is not a folder"):
        report.write_report(tmp_path)
    assert (tmp_path / "report").read_text() == "mine"


def test_figure3_draws_a_wide_interval_within_the_metrics_range(tmp_path):
    """Two seeds far apart: the t-interval (t = 12.7) leaves [0, 1]; the curve keeps it whole and
    the drawn band stops at 0 and 1 (the reconstruction error's at 0)."""
    for seed, (fv, recon) in enumerate(((0.2, 10.0), (0.9, 90.0))):
        write_run(tmp_path / "runs" / f"betavae_beta4_seed{seed}", "betavae", {"beta": 4.0}, seed,
                  [{"step": step, "factor_vae": fv, "beta_vae": fv, "recon": recon} for step in STEPS])
    result = report.write_report(tmp_path)
    curve = result.plotted["figure3"][("betavae", "factor_vae")]["beta-VAE"]
    assert curve["low"][0] < 0 and curve["high"][0] > 1
    axes = result.figures["figure3"].axes
    for ax, (low, high) in zip(axes, [(0.0, None), (0.0, 1.0), (0.0, 1.0)]):
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        assert band.min() == low and (high is None or band.max() == high)
