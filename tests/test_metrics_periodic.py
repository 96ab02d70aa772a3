"""Metrics during training: `periodic_evaluation`'s eval log and `evaluate_models` (K models at once).

On a small dSprites-like grid (3 x 6 x 8 x 8 = 1,152 rows) and small VAEs: the log line's
schema, its truncation on resume, K models scored together equal to K single evaluations
(exactly), each batch of images produced once for all K, the planned rows covering what the
metrics draw, a metric subset, and bad names refused before any work.
"""

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastfvae.metrics.encode as encode_module
import fastfvae.metrics.evaluate as evaluate_module
from fastfvae.errors import FastFVAEError
from fastfvae.metrics import MAIN_SCORES, evaluate_model, evaluate_models, periodic_evaluation
from fastfvae.metrics.evaluate import BUDGETS, grid_of_data, log_settings, planned_rows
from metrics_helpers import tiny_dsprites

#: Small settings whose draws (about 900) are fewer than the 1,152 rows: the plan is the
#: union of the replayed draws, not every row.
SMALL = {
    "factor_vae": {"num_train": 6, "num_eval": 4, "num_variance_estimate": 200, "prune_threshold": 0.0,
                   "batch_size": 16},
    "beta_vae": {"num_train": 6, "num_eval": 4, "batch_size": 8},
    "mig": {"num_train": 200},
    "sap": {"num_train": 100, "num_test": 50},
    "gaussian_tc": {"num_train": 100},
    "recon": {"num_samples": 40, "batch_size": 16},
}
METRICS = ("factor_vae", "beta_vae", "mig", "sap", "gaussian_tc", "recon")


@pytest.fixture(scope="module")
def data():
    return tiny_dsprites((3, 6, 8, 8))


def make_vae(seed: int):
    from fastfvae.models.vae import VAE

    torch.manual_seed(seed)
    return VAE(z_dim=4, fc_dim=32)


@pytest.fixture(scope="module")
def vaes():
    return [make_vae(seed) for seed in (0, 1, 2)]


def scores_of(record):
    return {name: record[name] for name in record["details"]}


def test_an_eval_log_line_has_the_main_scores_the_details_and_the_seconds(vaes, data, tmp_path):
    stream = io.StringIO()
    callback = periodic_evaluation(2, lambda: data, METRICS, out_dir=tmp_path, config=SMALL, stream=stream)
    state = SimpleNamespace(models=SimpleNamespace(vae=vaes[0]), step=0)
    for step in (1, 2, 3, 4):
        state.step = step
        callback(state, {})
    lines = [json.loads(line) for line in (tmp_path / "eval_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    line = lines[0]
    assert set(line) == {"step", *METRICS, "details", "seconds", "budget"} and line["budget"] == "custom"
    assert list(line["details"]) == list(METRICS)
    main_keys = {"factor_vae": "eval_accuracy", "beta_vae": "eval_accuracy", "mig": "discrete_mig",
                 "sap": "SAP_score", "gaussian_tc": "gaussian_total_correlation", "recon": "reconstruction_bce"}
    for name in METRICS:
        assert MAIN_SCORES[name] == main_keys[name]
        assert isinstance(line[name], float) and line[name] == line["details"][name][main_keys[name]]
    assert set(line["seconds"]) == {"encode", "metrics", "by_metric"}
    assert line["seconds"]["encode"] > 0 and line["seconds"]["metrics"] > 0
    assert set(line["seconds"]["by_metric"]) == set(METRICS)
    # dlib's metric functions: the very scores of evaluate_model on the same settings
    internal = {("reconstruction" if k == "recon" else k): v for k, v in SMALL.items()}
    names = tuple("reconstruction" if m == "recon" else m for m in METRICS)
    full = evaluate_model(vaes[0], data, names, config=internal)
    assert line["details"] == {("recon" if k == "reconstruction" else k): v for k, v in full.items()}
    printed = stream.getvalue().splitlines()
    assert len(printed) == 2 and printed[0].startswith("step 2: factor_vae ") and "encode" in printed[0]


def test_a_resumed_run_drops_the_evaluations_past_its_checkpoint(data, tmp_path):
    from fastfvae.train.config import TrainConfig
    from fastfvae.train.loop import run_training

    out = tmp_path / "run"
    cfg = TrainConfig(model="betavae", z_dim=3, fc_dim=16, batch_size=8, steps=2, out=str(out), eval_every=1,
                      fast=False, device="cpu")
    callback = periodic_evaluation(1, data, ("mig",), out_dir=out, config={"mig": {"num_train": 50}})
    run_training(cfg, data=data, callbacks=[callback], progress=False)
    log = out / "eval_log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    with open(log, "a") as f:  # what a run killed after evaluating step 3, before its checkpoint, leaves
        f.write(json.dumps({"step": 3, "mig": -1.0, "details": {"mig": {}}, "seconds": {}}) + "\n")
    run_training(cfg.replace(steps=4), data=data, resume=str(out), callbacks=[callback], progress=False)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[2]["mig"] != -1.0 and lines[2]["details"]["mig"]  # step 3 evaluated again, appended


def test_k_models_together_score_exactly_as_k_single_evaluations(vaes, data):
    together = evaluate_models(vaes, data, METRICS, seed=3, config=SMALL)
    alone = [evaluate_models([vae], data, METRICS, seed=3, config=SMALL)[0] for vae in vaes]
    assert len(together) == 3
    for k in range(3):
        assert together[k]["details"] == alone[k]["details"]
        assert scores_of(together[k]) == scores_of(alone[k])
    assert scores_of(together[0]) != scores_of(together[1])  # different models, different scores
    assert len({r["seconds"]["encode"] for r in together}) == 1  # one shared encoding


def test_each_batch_of_images_is_produced_once_for_all_k_models(vaes, data, monkeypatch):
    calls = []
    real = encode_module.observed_batch

    def counting(data_, rows, device):
        calls.append(len(rows))
        return real(data_, rows, device)

    monkeypatch.setattr(encode_module, "observed_batch", counting)
    monkeypatch.setattr(evaluate_module, "observed_batch", counting)
    settings = log_settings(METRICS, 0, "dlib", SMALL)
    planned = planned_rows(grid_of_data(data), settings, 0)
    evaluate_models(vaes, data, METRICS, config=SMALL, batch_size=100)
    encode_batches = -(-len(planned) // 100)
    recon_batches = -(-SMALL["recon"]["num_samples"] // SMALL["recon"]["batch_size"])
    assert len(calls) == encode_batches + recon_batches  # not 3x: each batch once, for the 3 models
    assert sum(calls) == len(planned) + SMALL["recon"]["num_samples"]


def test_the_plan_covers_every_row_the_metrics_draw(vaes, data, monkeypatch):
    seen = []
    real = evaluate_module.PlannedCodes.__call__

    def spy(self, rows):
        out = real(self, rows)
        seen.append(self.unplanned)
        return out

    monkeypatch.setattr(evaluate_module.PlannedCodes, "__call__", spy)
    settings = log_settings(METRICS, 5, "dlib", SMALL)
    planned = planned_rows(grid_of_data(data), settings, 5)
    assert 0 < len(planned) < len(data)  # a replayed plan, not every row
    evaluate_models(vaes[:1], data, METRICS, seed=5, config=SMALL)
    assert seen and max(seen) == 0


def test_rows_outside_the_plan_are_still_encoded(vaes, data, monkeypatch):
    """The plan decides speed only: a row it misses is encoded when a metric asks for it.
    (Encoded in another batch, its code may differ in the last bits: compared within 1e-6.)"""
    from fastfvae.metrics import encode_dataset

    table = encode_dataset(vaes[1], data)
    served, unplanned = [], []
    real_call = evaluate_module.PlannedCodes.__call__

    def spy(self, rows):
        out = real_call(self, rows)
        served.append((np.asarray(rows), out))
        unplanned.append(self.unplanned)
        return out

    real_plan = evaluate_module.planned_rows
    monkeypatch.setattr(evaluate_module, "planned_rows", lambda *a: real_plan(*a)[::3])  # a third of the plan
    monkeypatch.setattr(evaluate_module.PlannedCodes, "__call__", spy)
    evaluate_models(vaes[1:2], data, METRICS, seed=1, config=SMALL)
    assert max(unplanned) > 0
    for rows, codes in served:
        np.testing.assert_allclose(codes, table[rows], rtol=0, atol=1e-6)


def test_dlib_budget_plans_every_row_and_training_budget_is_smaller():
    from fastfvae.data.dsprites import LATENT_GRID

    dlib = log_settings(("factor_vae", "beta_vae", "mig", "sap"), 0, "dlib")
    assert dlib["factor_vae"]["num_train"] == 10000 and dlib["beta_vae"]["num_eval"] == 5000
    assert np.array_equal(planned_rows(LATENT_GRID, dlib, 0), np.arange(LATENT_GRID.num_rows))
    training = log_settings(("factor_vae", "beta_vae", "mig", "sap", "recon"), 0, "training")
    assert training["factor_vae"]["num_eval"] == BUDGETS["training"]["factor_vae"]["num_eval"] < 5000
    assert training["recon"]["num_samples"] < dlib.get("recon", {"num_samples": 10000})["num_samples"]
    on_top = log_settings(("factor_vae",), 0, "training", {"factor_vae": {"num_eval": 777}})
    assert on_top["factor_vae"]["num_eval"] == 777 and on_top["factor_vae"]["num_train"] == 1000


def test_a_metric_subset_scores_only_those(vaes, data):
    (record,) = evaluate_models(vaes[:1], data, "mig,recon", config=SMALL)
    assert list(record["details"]) == ["mig", "recon"]
    assert set(record) == {"mig", "recon", "details", "seconds", "budget"}
    (codes_only,) = evaluate_models(vaes[:1], data, ("sap",), config=SMALL)
    assert list(codes_only["details"]) == ["sap"] and codes_only["sap"] == codes_only["details"]["sap"]["SAP_score"]


VALID = "factor_vae, beta_vae, mig, sap, dci, dci_fast, gaussian_tc, recon"


def _every_24th_row(data):
    """48 of the 1,152 rows: no full factor grid."""
    from fastfvae.data import DSprites

    return DSprites(data.packed[::24], data.latents_classes[::24], data.latents_values[::24])


def test_a_bad_metric_name_is_one_line_listing_the_valid_ones_before_any_work(vaes, data):
    def no_data():
        pytest.fail("loaded the data for a bad request")

    message = rf"^unknown metric 'factr_vae'; expected some of {VALID}$"
    with pytest.raises(FastFVAEError, match=message):
        periodic_evaluation(10, no_data, ("mig", "factr_vae"))

    class Untouchable(torch.nn.Module):
        channels = 1

        def encode(self, x):
            pytest.fail("encoded images for a bad request")

    with pytest.raises(FastFVAEError, match=message):
        evaluate_models([Untouchable()], data, ("factr_vae",))
    with pytest.raises(FastFVAEError, match=r"^unknown metric 'reconstruction' \(evaluations during training "
                                            r"call it recon\); expected some of "):
        evaluate_models([Untouchable()], data, ("reconstruction",))
    with pytest.raises(FastFVAEError, match=r"^unknown sample budget 'quick'; expected one of dlib, training"):
        evaluate_models([Untouchable()], data, ("mig",), budget="quick")
    with pytest.raises(FastFVAEError, match=r"^unknown setting\(s\) \['num_evals'\] for metric 'factor_vae'"):
        periodic_evaluation(10, no_data, ("factor_vae",), config={"factor_vae": {"num_evals": 5}})
    with pytest.raises(FastFVAEError, match=r"^the 48 rows of this dataset are not a full row-major factor grid"):
        periodic_evaluation(10, _every_24th_row(data), ("mig",))
    with pytest.raises(FastFVAEError, match=r"^--eval-every must be an integer >= 1 step, got 0$"):
        periodic_evaluation(0, no_data)
    with pytest.raises(FastFVAEError, match=r"^model 1 \(object\) has no encode"):
        evaluate_models([vaes[0], object()], data, ("mig",))


def test_train_cli_refuses_a_bad_eval_metric_before_the_run(tmp_path, capsys):
    from fastfvae.cli import main

    out = tmp_path / "r"
    for every in (["--eval-every", "1"], []):  # a name is checked even when nothing is evaluated
        code = main(["train", "--out", str(out), "--steps", "1", *every, "--eval-metrics", "mig,bogus",
                     "--no-progress", "--no-figures"])
        assert code == 2
        assert capsys.readouterr().err.strip() == f"fastfvae: error: unknown metric 'bogus'; expected some of {VALID}"
        assert not out.exists()


def test_train_cli_eval_metrics_reach_the_callback(data, tmp_path, monkeypatch):
    import fastfvae.train.loop as loop
    from fastfvae.cli import build_parser
    from fastfvae.cli.train import callbacks_for, config_from_args

    args = build_parser().parse_args(["train", "--eval-every", "5", "--eval-metrics", "mig", "sap,recon",
                                      "--out", str(tmp_path)])
    cfg = config_from_args(args)
    assert cfg.eval_metrics == ("mig", "sap", "recon")
    asked = []
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: data)
    monkeypatch.setattr("fastfvae.metrics.periodic.evaluate_models",
                        lambda models, d, metrics, **kw: asked.append((tuple(metrics), kw["budget"])) or [
                            {"mig": 0.0, "details": {"mig": {}}, "seconds": {"encode": 0.0, "metrics": 0.0}}])
    (callback,) = callbacks_for(cfg, args)
    callback(SimpleNamespace(models=SimpleNamespace(vae=None), step=5), {})
    assert asked == [(("mig", "sap", "recon"), "dlib")]


def test_bf16_encoding_is_opt_in_and_close_to_fp32(vaes, data):
    rows = np.arange(256)
    fp32 = encode_module.encode_rows(vaes[0], data, rows)
    bf16 = encode_module.encode_rows(vaes[0], data, rows, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # really another arithmetic
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=2e-2 * np.abs(fp32).max())
    with pytest.raises(FastFVAEError, match=r"^unknown encoder precision 'fp16'; expected one of fp32, bf16$"):
        evaluate_models(vaes[:1], data, ("mig",), precision="fp16")


def test_a_pack_evaluation_writes_each_models_line_to_its_own_run(vaes, data, tmp_path):
    from fastfvae.metrics.periodic import periodic_pack_evaluation

    outs = [tmp_path / f"run{k}" for k in range(3)]
    for out in outs:
        out.mkdir()
    evaluate = periodic_pack_evaluation(5, data, outs, ("mig", "sap"), config=SMALL, stream=io.StringIO())
    assert evaluate(4, vaes) is None and not (outs[0] / "eval_log.jsonl").exists()
    records = evaluate(5, vaes)
    want = evaluate_models(vaes, data, ("mig", "sap"), config=SMALL)
    for k, out in enumerate(outs):
        (line,) = [json.loads(text) for text in (out / "eval_log.jsonl").read_text().splitlines()]
        assert line["step"] == 5 and line["details"] == want[k]["details"] == records[k]["details"]
    with pytest.raises(FastFVAEError, match=r"^2 models for the 3 run folders of this pack$"):
        evaluate(10, vaes[:2])


@pytest.mark.parametrize("k", [1, 2])
def test_a_pack_scores_its_runs_together_at_their_configs_budget(data, tmp_path, monkeypatch, k):
    """`train_pack` evaluates its runs itself from their config (every, metrics, budget): one
    `evaluate_models` call with the K VAEs per evaluation step, each run's line in its own log,
    and those scores equal to the models' own evaluation afterwards (the checkpoints' VAEs)."""
    from fastfvae.study.pack import train_pack
    from fastfvae.train.checkpoint import load_models
    from fastfvae.train.config import TrainConfig

    calls = []
    real = evaluate_module.evaluate_models

    def counting(models, *args, **kwargs):
        calls.append((len(models), kwargs.get("budget")))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_models", counting)
    import fastfvae.metrics.periodic as periodic_module

    monkeypatch.setattr(periodic_module, "evaluate_models", counting)
    cfgs = [TrainConfig(model="betavae", beta=b, seed=s, z_dim=3, fc_dim=16, batch_size=8, steps=4,
                        out=str(tmp_path / f"run{s}"), eval_every=2, eval_metrics=("mig", "sap"),
                        eval_budget="training", device="cpu")
            for s, b in zip(range(k), (1.0, 4.0))]
    train_pack(cfgs, data=data, progress=False)
    assert calls == [(k, "training"), (k, "training")]
    for cfg in cfgs:
        lines = [json.loads(line) for line in (tmp_path / cfg.out / "eval_log.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [2, 4]
        assert all(line["budget"] == "training" for line in lines)
        (own,) = real([load_models(cfg.out)[0]], data, ("mig", "sap"), seed=0, budget="training")
        assert scores_of(lines[-1]) == pytest.approx(scores_of(log_record_of(own)), abs=1e-6)


def log_record_of(result):
    from fastfvae.metrics.periodic import log_record

    return log_record(4, result)


def test_a_bad_eval_budget_is_one_line_before_training(tmp_path):
    from fastfvae.train.config import EVAL_BUDGETS, TrainConfig

    assert set(EVAL_BUDGETS) <= set(BUDGETS)
    with pytest.raises(FastFVAEError, match=r"^eval-budget must be dlib, training, got 'tiny'$"):
        TrainConfig(eval_budget="tiny").validate()
