"""One train job (finegrained.train.job) on tiny shards: a checkpoint made with other
settings or inputs is set aside, never resumed; a stale or damaged feature cache is refused;
an unreadable checkpoint falls back to an older one; an empty validation split is named."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from finegrained.errors import DataError
from finegrained.fileio import read_json, sha256_file
from finegrained.models.transfer import write_target_init
from finegrained.models.weights import read_tensors
from finegrained.plan import jobs, regimes
from finegrained.train.features import run_features_job
from finegrained.train.job import run_job
from finegrained.train.loop import NonFinite, Preempted, TIMING_FIELDS
from helpers.training import (JOB_CLASSES, coloured_squares, feature_indexes, job_inputs,
                              overwrite_tensor, tiny_job_config as tiny_config, write_split)


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


# ---------------------------------------------------------------------------- damaged artifacts

@pytest.fixture(scope="module")
def probe_cache(inputs, tmp_path_factory):
    """The linear probe's settings, its feature cache of the tiny splits (copy to edit) and
    a function of a cache folder giving the job's feature indexes there."""
    config = tiny_config(linear_probe={"l2_grid": [0.01]})
    features = tmp_path_factory.mktemp("cache") / "features"
    for split in ("train", "val"):
        run_features_job(jobs.features(config, split),
                         shard_index=inputs[f"{split}_index"], init_weights=inputs["init_weights"],
                         stats=inputs["stats"], classes=inputs["classes"],
                         out_dir=features / split, log_fn=None)
    return (regimes.job_settings(config, "linear_probe"), features,
            lambda folder: feature_indexes(folder, config, "linear_probe"))


def _nan_bytes(path, count=64):
    """Overwrite the last ``count`` bytes of a file with 0xFF (NaN as float16 or float32)."""
    with open(path, "r+b") as f:
        f.seek(-count, 2)
        f.write(b"\xff" * count)


def test_a_feature_cache_changed_after_its_job_is_refused_and_no_nan_head_is_written(
        inputs, probe_cache, tmp_path):
    """Flipped bytes in features/train/stage4.npy gave a NaN probe head and chance accuracy
    with exit 0: the cache's index records the sha256 of every array its job wrote and the
    reading job checks it, naming the file; with the check off (shards.verify: false) the
    probe refuses the non-finite features itself. Nothing is written either way."""
    settings, cache, indexes = probe_cache
    features = shutil.copytree(cache, tmp_path / "features")
    index = read_json(features / "train" / "index.json")
    entry = index["layers"][settings["phases"][0]["input"]["layer"]]
    array = features / "train" / entry["file"]
    _nan_bytes(array)
    with pytest.raises(DataError, match="changed since it was written") as caught:
        run_job(settings, **inputs, feature_indexes=indexes(features), out_dir=tmp_path / "out",
                checkpoint_dir=tmp_path / "ck", log_fn=None)
    assert caught.value.path == str(array)
    with pytest.raises(NonFinite, match="linear probe: 32 of the training features are NaN"):
        run_job({**settings, "verify_shards": False}, **inputs, feature_indexes=indexes(features),
                out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ck2", log_fn=None)
    assert not (tmp_path / "out").exists()

    shutil.copy(cache / "train" / entry["file"], array)
    _nan_bytes(features / "val" / "labels.npy", 8)
    with pytest.raises(DataError, match="changed since it was written") as caught:
        run_job(settings, **inputs, feature_indexes=indexes(features), out_dir=tmp_path / "out",
                checkpoint_dir=tmp_path / "ck3", log_fn=None)
    assert caught.value.path == str(features / "val" / "labels.npy")
    assert not (tmp_path / "out").exists()


def test_an_empty_validation_split_is_named_not_a_key_error(inputs, tmp_path):
    """Classes too small to give validation an image left it empty: the features job ended
    in `KeyError: 'stage4'`, a train job would score every epoch on nothing."""
    empty = write_split(tmp_path / "shards", "val", *coloured_squares(0, size=36), JOB_CLASSES)
    config = tiny_config(linear_probe={"l2_grid": [0.01]}, full_finetune={"epochs": 1})
    with pytest.raises(DataError, match="the val split has no images .*no class has 2 or more") \
            as caught:
        run_features_job(jobs.features(config, "val"), shard_index=empty,
                         init_weights=inputs["init_weights"], stats=inputs["stats"],
                         classes=inputs["classes"], out_dir=tmp_path / "features" / "val",
                         log_fn=None)
    assert caught.value.path == str(empty)
    assert not (tmp_path / "features" / "val").exists()
    with pytest.raises(DataError, match="the val split has no images") as caught:
        run_job(regimes.job_settings(config, "full_finetune"), **{**inputs, "val_index": empty},
                out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ck", log_fn=None)
    assert caught.value.path == str(empty)
    assert not (tmp_path / "out").exists()


def _sigterm_after_epoch(n):
    def log(line):
        if f"main epoch {n} " in line:
            os.kill(os.getpid(), signal.SIGTERM)
    return log


def _same_model(a, b):
    x, y = read_tensors(a / "weights.safetensors"), read_tensors(b / "weights.safetensors")
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.slow(seconds=30)
def test_a_damaged_checkpoint_falls_back_to_the_newest_readable_step(inputs, tmp_path):
    """A lost orbax data file or meta/metadata gave a raw ValueError/FileNotFoundError on
    every rerun: the unreadable step is set aside (logged, named), the rerun resumes from
    the older step, or starts afresh when none reads, to the uninterrupted run's history
    and weights; a finished phase's damaged record is set aside and redone the same way."""
    settings = regimes.job_settings(tiny_config(full_finetune={"epochs": 3}), "full_finetune")
    run_job(settings, **inputs, out_dir=tmp_path / "fresh", checkpoint_dir=tmp_path / "ck0",
            log_fn=None)
    ckpt = tmp_path / "ck"
    phase = ckpt / "0-main"

    def killed_after_epoch_2() -> list[int]:
        with pytest.raises(Preempted):
            run_job(settings, **inputs, out_dir=tmp_path / "killed", checkpoint_dir=ckpt,
                    log_fn=_sigterm_after_epoch(2))
        return sorted(int(p.name) for p in phase.iterdir() if p.name.isdigit())

    older, newer = killed_after_epoch_2()
    next((phase / str(newer) / "arrays" / "d").iterdir()).unlink()
    lines = []
    run_job(settings, **inputs, out_dir=tmp_path / "fallback", checkpoint_dir=ckpt,
            log_fn=lines.append)
    [bad] = [line for line in lines if "cannot be read" in line]
    assert f"checkpoint step {newer} in {phase.resolve()} cannot be read (ValueError" in bad
    assert f"set aside as 0-main.step-{newer}.unreadable-" in bad and f"trying step {older}" in bad
    assert any(f"resumed from checkpoint at step {older}" in line for line in lines)
    assert _history(tmp_path / "fallback") == _history(tmp_path / "fresh")
    assert _same_model(tmp_path / "fallback", tmp_path / "fresh")

    older, newer = killed_after_epoch_2()
    (phase / str(newer) / "meta" / "metadata").unlink()
    next((phase / str(older) / "arrays" / "d").iterdir()).unlink()
    lines = []
    run_job(settings, **inputs, out_dir=tmp_path / "afresh", checkpoint_dir=ckpt,
            log_fn=lines.append)
    bad = [line for line in lines if "cannot be read" in line]
    assert f"checkpoint step {newer} " in bad[0] and "FileNotFoundError" in bad[0]
    assert "no readable checkpoint is left, training starts afresh" in bad[1]
    assert not any("resumed from checkpoint" in line for line in lines)
    assert _history(tmp_path / "afresh") == _history(tmp_path / "fresh")
    assert _same_model(tmp_path / "afresh", tmp_path / "fresh")

    kept = {**settings, "keep_checkpoints": True}
    run_job(kept, **inputs, out_dir=tmp_path / "kept", checkpoint_dir=ckpt, log_fn=None)
    overwrite_tensor(phase / "done.safetensors", "head/kernel")
    lines = []
    run_job(kept, **inputs, out_dir=tmp_path / "redone", checkpoint_dir=ckpt,
            log_fn=lines.append)
    [bad] = [line for line in lines if "set aside" in line]
    assert bad.startswith(f"{phase / 'done.safetensors'}: changed since it was written"), bad
    assert "the record of finished phase 0-main is set aside" in bad
    assert _history(tmp_path / "redone") == _history(tmp_path / "fresh")
    assert _same_model(tmp_path / "redone", tmp_path / "fresh")

    # what the evaluation and the report check the weights and the history against
    summary = read_json(tmp_path / "redone" / "summary.json")
    for name, file in (("weights", "weights.safetensors"), ("history", "history.parquet")):
        assert summary[f"{name}_sha256"] == sha256_file(tmp_path / "redone" / file)
