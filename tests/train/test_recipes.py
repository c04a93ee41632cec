"""Fine-tuning recipes on tiny shards, job by job: two-stage from the converged probe (LP-FT),
the head-only SGD stage it replaces, L2-SP, the refit on train + validation and the choice
of epochs by validation loss."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from finegrained.errors import DataError
from finegrained.models.weights import read_tensors
from finegrained.plan import jobs, protocol, regimes
from finegrained.train.job import run_features_job, run_job
from helpers.scripts import load_script
from helpers.training import feature_indexes, job_inputs, tiny_job_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return job_inputs(tmp_path_factory.mktemp("recipes"))


def _features(config, inputs, out):
    for split in ("train", "val"):
        run_features_job(jobs.features(config, split),
                         shard_index=inputs[f"{split}_index"], init_weights=inputs["init_weights"],
                         stats=inputs["stats"], classes=inputs["classes"],
                         out_dir=out / split, log_fn=None)
    return out


def _run(config, regime, inputs, out, variant="", features=None, **more):
    settings = regimes.job_settings(config, regime, variant)
    return run_job(settings, **inputs, out_dir=out, checkpoint_dir=out.parent / f"ck-{out.name}",
                   feature_indexes=feature_indexes(features, config, regime, variant),
                   log_fn=None, **more)


def _rows(out_dir):
    return pq.read_table(out_dir / "history.parquet").to_pylist()


def _probe(out):
    return {"weights": out / "weights.safetensors", "summary": out / "summary.json"}


@pytest.fixture(scope="module")
def probe_run(inputs, tmp_path_factory):
    """The probe job (L-BFGS on the cached features) of the LP-FT config."""
    root = tmp_path_factory.mktemp("probe")
    config = tiny_job_config(linear_probe={"l2_grid": [0.001, 0.1]}, two_stage={"epochs": 2})
    features = _features(config, inputs, root / "features")
    _run(config, "linear_probe", inputs, root / "linear_probe", features=features)
    return config, features, root / "linear_probe"


def test_two_stage_starts_from_the_probe_head_exactly(inputs, probe_run, tmp_path):
    """The first phase is the probe's solved head, bit for bit, on the untouched backbone;
    no head epoch is trained by SGD; the summary names where the head came from."""
    config, features, probe_dir = probe_run
    settings = regimes.job_settings(config, "two_stage")
    settings["keep_checkpoints"] = True
    run_job(settings, **inputs, feature_indexes=feature_indexes(features, config, "two_stage"),
            probe=_probe(probe_dir),
            out_dir=tmp_path / "two_stage", checkpoint_dir=tmp_path / "ck", log_fn=None)
    start = read_tensors(tmp_path / "ck" / "0-head" / "done.safetensors")
    probe = read_tensors(probe_dir / "weights.safetensors")
    init = read_tensors(inputs["init_weights"])
    for name in start:
        expected = probe[name] if name.startswith("head/") else init[name]
        assert np.array_equal(start[name], expected), name
    assert not np.array_equal(probe["head/kernel"], init["head/kernel"])
    rows = _rows(tmp_path / "two_stage")
    head_rows = [r for r in rows if r["phase"] == "head"]
    probe_summary = json.loads((probe_dir / "summary.json").read_text())
    assert len(head_rows) == 1 and head_rows[0]["head_from"] == "linear_probe"
    assert head_rows[0]["l2"] == probe_summary["best"]["l2"]           # an L-BFGS row
    assert head_rows[0]["val_top1"] == probe_summary["best_val_top1"]
    assert [r["epoch"] for r in rows if r["phase"] == "main"] == [1, 2]
    summary = json.loads((tmp_path / "two_stage" / "summary.json").read_text())
    assert summary["head_from"] == "linear_probe"
    assert summary["phase_epochs"] == {"head": 1, "main": 2}


def test_a_probe_of_other_settings_or_weights_is_refused(inputs, probe_run, tmp_path):
    config, features, probe_dir = probe_run
    other = tiny_job_config(linear_probe={"l2_grid": [0.5]}, two_stage={"epochs": 2})
    with pytest.raises(DataError, match="trained with other settings"):
        _run(other, "two_stage", inputs, tmp_path / "a", features=features,
             probe=_probe(probe_dir))
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError, match="no probe weights were given"):
        _run(config, "two_stage", inputs, tmp_path / "b", features=features)


def test_head_from_sgd_trains_the_head_by_sgd_first(inputs, probe_run, tmp_path):
    config = tiny_job_config(two_stage={"head_from": "sgd", "head_epochs": 2, "epochs": 1,
                                        "head_patience": 5})
    _run(config, "two_stage", inputs, tmp_path / "two_stage", features=probe_run[1])
    rows = _rows(tmp_path / "two_stage")
    assert [(r["phase"], r["epoch"]) for r in rows] == [("head", 1), ("head", 2), ("main", 1)]
    assert all(r["head_from"] is None for r in rows if "head_from" in r)
    assert all(r["train_count"] == 48 for r in rows)
    assert json.loads((tmp_path / "two_stage" / "summary.json").read_text())["head_from"] is None


def _distance(weights, init):
    return sum(float(np.sum((weights[k] - init[k]) ** 2)) for k in init
               if k.endswith("kernel") and not k.startswith("head/"))


def test_l2_sp_keeps_fine_tuned_weights_near_the_pretrained_ones(inputs, tmp_path):
    """The same fine-tune with a strong L2-SP pull ends nearer the pretrained kernels than
    with weight decay toward zero."""
    recipe = {"epochs": 3, "lr": 0.2, "backbone_lr_mult": 1.0, "weight_decay": 0.0}
    plain = tiny_job_config(full_finetune=recipe)
    l2sp = tiny_job_config(full_finetune={**recipe, "regularizer": "l2_sp", "l2_sp_alpha": 5.0})
    _run(plain, "full_finetune", inputs, tmp_path / "plain")
    _run(l2sp, "full_finetune", inputs, tmp_path / "l2sp")
    init = read_tensors(inputs["init_weights"])
    far = _distance(read_tensors(tmp_path / "plain" / "weights.safetensors"), init)
    near = _distance(read_tensors(tmp_path / "l2sp" / "weights.safetensors"), init)
    assert 0 < near < 0.8 * far, (near, far)


def test_refit_trains_on_train_and_validation_for_the_chosen_epochs(inputs, tmp_path):
    config = tiny_job_config(protocol={"refit": True}, full_finetune={"epochs": 3, "lr": 0.05})
    summary = _run(config, "full_finetune", inputs, tmp_path / "train")
    request = protocol.refit_request(config, "full_finetune", "")
    settings = protocol.refit_settings(request, summary)
    assert settings["phases"][0]["stop_after_epochs"] == summary["best_epoch"]
    # the refit_regime rule's script (train.py, given the chosen job), as the rule calls it
    rc = load_script("train").main([
        "--settings", json.dumps(request),
        "--train-summary", str(tmp_path / "train" / "summary.json"),
        *[f"--{k.replace('_', '-')}={v}" for k, v in inputs.items()],
        "--checkpoint-dir", str(tmp_path / "ck-refit"), "--out-dir", str(tmp_path / "refit")])
    assert rc == 0
    refit = json.loads((tmp_path / "refit" / "summary.json").read_text())
    rows = _rows(tmp_path / "refit")
    assert [r["epoch"] for r in rows] == list(range(1, summary["best_epoch"] + 1))
    assert all(r["train_count"] == 48 + 16 for r in rows)
    assert all(r.get("val_top1") is None for r in rows)
    assert refit["refit"] and refit["trained_on"] == "train+val" and refit["best"] is None
    assert refit["settings"]["refit"]["train_config_hash"] == summary["config_hash"]
    a = read_tensors(tmp_path / "train" / "weights.safetensors")
    b = read_tensors(tmp_path / "refit" / "weights.safetensors")
    assert not np.array_equal(a["head/kernel"], b["head/kernel"])
    # A summary of other settings is not refitted.
    other = protocol.refit_request(tiny_job_config(protocol={"refit": True},
                                                   full_finetune={"epochs": 4}),
                                   "full_finetune", "")
    with pytest.raises(DataError, match="not of a train job the current config asks for"):
        protocol.refit_settings(other, summary)


def test_the_probe_refits_with_its_chosen_l2(inputs, probe_run, tmp_path):
    config, features, probe_dir = probe_run
    summary = json.loads((probe_dir / "summary.json").read_text())
    settings = protocol.refit_settings(protocol.refit_request(config, "linear_probe", ""),
                                       summary)
    assert settings["phases"][0]["l2_grid"] == [summary["best"]["l2"]]
    run_job(settings, **inputs, feature_indexes=feature_indexes(features, config, "linear_probe"),
            out_dir=tmp_path / "refit",
            checkpoint_dir=tmp_path / "ck", log_fn=None)
    [row] = _rows(tmp_path / "refit")
    assert row["l2"] == summary["best"]["l2"] and row["train_count"] == 64


def test_select_by_val_loss_picks_the_lower_loss_epoch_and_strength(inputs, probe_run, tmp_path):
    config = tiny_job_config(protocol={"select_by": "val_loss"},
                             full_finetune={"epochs": 4, "lr": 0.05},
                             linear_probe={"l2_grid": [1e-5, 0.01, 10.0]})
    summary = _run(config, "full_finetune", inputs, tmp_path / "ft")
    rows = _rows(tmp_path / "ft")
    lowest = min(rows, key=lambda r: (r["val_loss"], -r["val_top1"]))
    assert summary["best_epoch"] == lowest["epoch"] and summary["select_by"] == "val_loss"
    _, features, _ = probe_run
    probe = _run(config, "linear_probe", inputs, tmp_path / "probe", features=features)
    rows = _rows(tmp_path / "probe")
    assert probe["best"]["l2"] == min(rows, key=lambda r: r["val_loss"])["l2"]
