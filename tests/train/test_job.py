"""One train job (finegrained.train.job) on tiny shards: a checkpoint made with other
settings or inputs is set aside, never resumed; a stale feature cache is refused."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from finegrained.errors import DataError
from finegrained.models.transfer import write_target_init
from finegrained.models.weights import read_tensors
from finegrained.plan import jobs, regimes
from finegrained.train.features import run_features_job
from finegrained.train.job import run_job
from finegrained.train.loop import Preempted, TIMING_FIELDS
from helpers.training import feature_indexes, job_inputs, tiny_job_config as tiny_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return job_inputs(tmp_path_factory.mktemp("job"))


def _history(out_dir):
    rows = pq.read_table(out_dir / "history.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def _sigterm_after_epoch_1(line: str) -> None:
    if "main epoch 1 " in line:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_checkpoint_made_with_other_settings_is_set_aside_not_resumed(inputs, tmp_path):
    """Killed after epoch 1 at lr 0.05, rerun at lr 0.01: the rerun starts from the initial
    weights (the same history and weights as a run that never saw the old checkpoint) and
    says why; an unchanged rerun resumes."""
    old = regimes.job_settings(tiny_config(full_finetune={"lr": 0.05}), "full_finetune")
    new = regimes.job_settings(tiny_config(full_finetune={"lr": 0.01}), "full_finetune")
    ckpt = tmp_path / "checkpoints" / "full_finetune"
    with pytest.raises(Preempted):
        run_job(old, **inputs, out_dir=tmp_path / "killed", checkpoint_dir=ckpt,
                log_fn=_sigterm_after_epoch_1)
    assert (ckpt / "0-main").is_dir()

    lines = []
    run_job(new, **inputs, out_dir=tmp_path / "rerun", checkpoint_dir=ckpt, log_fn=lines.append)
    run_job(new, **inputs, out_dir=tmp_path / "fresh", checkpoint_dir=tmp_path / "fresh-ck",
            log_fn=None)
    [aside] = [line for line in lines if "set aside" in line]
    assert "phases.0.train_settings.lr 0.05 -> 0.01" in aside, aside
    assert not any("resumed from checkpoint" in line for line in lines)
    assert len(list(ckpt.parent.glob("full_finetune.set-aside-*"))) == 1
    assert _history(tmp_path / "rerun") == _history(tmp_path / "fresh")
    assert [row["epoch"] for row in _history(tmp_path / "rerun")] == [1, 2]
    a = read_tensors(tmp_path / "rerun" / "weights.safetensors")
    b = read_tensors(tmp_path / "fresh" / "weights.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)

    # The same settings again (killed, then rerun): resumed, not set aside.
    with pytest.raises(Preempted):
        run_job(new, **inputs, out_dir=tmp_path / "k2", checkpoint_dir=ckpt,
                log_fn=_sigterm_after_epoch_1)
    lines = []
    run_job(new, **inputs, out_dir=tmp_path / "resumed", checkpoint_dir=ckpt, log_fn=lines.append)
    assert any("resumed from checkpoint" in line for line in lines)
    assert not any("set aside" in line for line in lines)
    assert _history(tmp_path / "resumed") == _history(tmp_path / "fresh")


def test_changed_init_weights_set_a_finished_phase_aside(inputs, tmp_path):
    settings = regimes.job_settings(tiny_config(full_finetune={"epochs": 1}), "full_finetune")
    settings["keep_checkpoints"] = True
    ckpt = tmp_path / "ck"
    run_job(settings, **inputs, out_dir=tmp_path / "a", checkpoint_dir=ckpt, log_fn=None)
    assert (ckpt / "0-main" / "done.json").exists()
    other = tmp_path / "other-init.safetensors"
    write_target_init(inputs["classes"], other, tmp_path / "other.json", arch="resnet18",
                      width=8, stage_depths=[1, 1, 1, 1], seed=5)
    lines = []
    run_job(settings, **{**inputs, "init_weights": other}, out_dir=tmp_path / "b",
            checkpoint_dir=ckpt, log_fn=lines.append)
    assert any("another init_weights" in line and "set aside" in line for line in lines), lines
    a = read_tensors(tmp_path / "a" / "weights.safetensors")
    b = read_tensors(tmp_path / "b" / "weights.safetensors")
    assert not np.array_equal(a["head/kernel"], b["head/kernel"])


def test_a_cache_from_other_weights_fails_the_job_naming_the_cache(inputs, tmp_path):
    config = tiny_config(linear_probe={"l2_grid": [0.01]})
    settings = regimes.job_settings(config, "linear_probe")
    features = tmp_path / "features"
    for split in ("train", "val"):
        run_features_job(jobs.features(config, split),
                         shard_index=inputs[f"{split}_index"], init_weights=inputs["init_weights"],
                         stats=inputs["stats"], classes=inputs["classes"],
                         out_dir=features / split, log_fn=None)
    indexes = feature_indexes(features, config, "linear_probe")
    run_job(settings, **inputs, feature_indexes=indexes, out_dir=tmp_path / "ok",
            checkpoint_dir=tmp_path / "ck1", log_fn=None)
    swapped = tmp_path / "swapped.safetensors"
    write_target_init(inputs["classes"], swapped, tmp_path / "s.json", arch="resnet18", width=8,
                      stage_depths=[1, 1, 1, 1], seed=7)
    with pytest.raises(DataError, match="feature cache was made from weights") as caught:
        run_job(settings, **{**inputs, "init_weights": swapped}, feature_indexes=indexes,
                out_dir=tmp_path / "stale", checkpoint_dir=tmp_path / "ck2", log_fn=None)
    assert caught.value.path == str(features / "train" / "index.json")
    assert not (tmp_path / "stale").exists()
    # the same weights, but a shard index other than the one the cache was made from
    moved = tmp_path / "moved_index.json"
    moved.write_text(Path(inputs["train_index"]).read_text() + "\n")
    with pytest.raises(DataError, match="feature cache was made from shard index") as caught:
        run_job(settings, **{**inputs, "train_index": moved}, feature_indexes=indexes,
                out_dir=tmp_path / "stale", checkpoint_dir=tmp_path / "ck3", log_fn=None)
    assert caught.value.path == str(features / "train" / "index.json")
    assert not (tmp_path / "stale").exists()
