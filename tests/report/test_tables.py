"""The run summary and the regime x view table over replicate seeds."""

from __future__ import annotations

import csv
import json
import math

import pytest

from finegrained.errors import DataError
from finegrained.report import tables as T


def test_mean_std_and_student_t_interval_by_hand():
    row = T.mean_ci([0.80, 0.84, 0.88])
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.84)
    assert row["std"] == pytest.approx(0.04)                       # sample std, ddof 1
    half = 4.302652729749464 * 0.04 / math.sqrt(3)                 # t(0.975, df=2)
    assert row["ci95_low"] == pytest.approx(0.84 - half)
    assert row["ci95_high"] == pytest.approx(0.84 + half)
    # an interval is cut to the range of what it bounds: top-1 never above 1
    near_one = T.mean_ci([0.94, 0.96, 1.0], bounds=T.FRACTION)
    assert near_one["ci95_high"] == 1.0 and near_one["ci95_low"] == pytest.approx(
        near_one["mean"] - 4.302652729749464 * near_one["std"] / math.sqrt(3))
    assert T.mean_ci([0.94, 0.96, 1.0])["ci95_high"] > 1.0
    assert T.summarize({"r": [metrics("r", "", 0.94, 0.94), metrics("r", "+seed=1", 1.0, 1.0),
                              metrics("r", "+seed=2", 0.96, 0.96)]})[0]["ci95_high"] == 1.0
    single = T.mean_ci([0.7])
    assert single == {"n": 1, "mean": 0.7, "std": None, "ci95_low": None, "ci95_high": None}
    with pytest.raises(ValueError):
        T.mean_ci([])


def metrics(regime, variant, center, ten_crop, train_variant=None):
    return {"regime": regime, "variant": variant, "n_test": 10,
            "train_variant": variant if train_variant is None else train_variant,
            "views": {"ten_crop": {"top1": ten_crop, "top5": 1.0},
                      "center": {"top1": center, "top5": 0.9}}}


def test_summarize_rows_and_markdown():
    refit = {"select_by": "val_loss", "refit": True, "trained_on": "train+val"}
    rows = T.summarize({"full_finetune": [metrics("full_finetune", "", 0.8, 0.82),
                                          metrics("full_finetune", "+seed=1", 0.7, 0.74)],
                        "scratch": [{**metrics("scratch", "", 0.4, 0.45), "protocol": refit}]})
    assert [(r["regime"], r["view"], r["metric"]) for r in rows][:4] == [
        ("full_finetune", "center", "top1"), ("full_finetune", "center", "top5"),
        ("full_finetune", "ten_crop", "top1"), ("full_finetune", "ten_crop", "top5")]
    center = rows[0]
    assert center["values"] == [0.8, 0.7] and center["mean"] == pytest.approx(0.75)
    assert center["std"] == pytest.approx(math.sqrt(0.005))
    md = T.markdown_table(rows, "top1")
    lines = md.splitlines()
    assert lines[0] == "| regime | protocol | seeds | center | ten_crop |"
    assert lines[2].startswith("| full_finetune | val_top1, train | 2 | 75.0 ± 7.1 [")
    assert lines[3] == "| scratch | val_loss, refit on train+val | 1 | 40.0 | 45.0 |"


def test_write_summary_from_a_run_directory(tmp_path):
    run = tmp_path / "results" / "r"
    for regime, variant, train_variant, seed, top1 in [
            ("full_finetune", "", "+lr=0.1", 0, 0.8),
            ("full_finetune", "+seed=1", "+seed=1+lr=0.1", 1, 0.7),
            ("scratch", "", "", 0, 0.4)]:
        (run / "train" / f"{regime}{train_variant}").mkdir(parents=True)
        (run / "train" / f"{regime}{train_variant}" / "summary.json").write_text(
            json.dumps({"settings": {"seed": seed}}))
        (run / "eval" / f"{regime}{variant}").mkdir(parents=True)
        (run / "eval" / f"{regime}{variant}" / "metrics.json").write_text(
            json.dumps(metrics(regime, variant, top1, top1, train_variant)))
    (run / "select").mkdir()
    (run / "select" / "full_finetune.json").write_text(
        json.dumps({"regime": "full_finetune", "chosen": "+lr=0.1"}))
    paths = [str(run / "eval" / name / "metrics.json")
             for name in ["full_finetune", "full_finetune+seed=1", "scratch"]]
    summary = T.write_summary(run_name="r", results_dir=str(run), metrics_paths=paths,
                              selection_paths=[str(run / "select" / "full_finetune.json")],
                              out_dir=run / "report")
    on_disk = json.loads((run / "report" / "summary.json").read_text())
    assert on_disk == summary
    ft = on_disk["regimes"]["full_finetune"]
    assert ft["selection"]["chosen"] == "+lr=0.1"
    assert [r["seed"] for r in ft["runs"]] == [0, 1]
    assert ft["runs"][1]["history"] == f"{run}/train/full_finetune+seed=1+lr=0.1/history.parquet"
    assert ft["runs"][1]["benchmarks"]["evaluate"] == f"{run}/benchmarks/evaluate/full_finetune+seed=1.tsv"
    assert on_disk["regimes"]["scratch"]["selection"] is None
    with open(run / "report" / "tables" / "regime_views.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["regime"] == "full_finetune" and rows[0]["n"] == "2"
    assert rows[0]["values"] == "0.8;0.7"
    assert rows[-1]["std"] == ""        # one seed: no spread
    assert "## Top-1" in (run / "report" / "tables" / "regime_views.md").read_text()


def _one_run(tmp_path, edit):
    """A run of one evaluated regime whose metrics.json ``edit`` changed; its metrics path."""
    run = tmp_path / "results" / "r"
    (run / "train" / "scratch").mkdir(parents=True)
    (run / "train" / "scratch" / "summary.json").write_text(json.dumps({"settings": {"seed": 0}}))
    path = run / "eval" / "scratch" / "metrics.json"
    path.parent.mkdir(parents=True)
    data = {**metrics("scratch", "", 0.4, 0.5), "per_level": {"leaf": 0.5}, "ece": 0.1,
            "confused_pairs": [["a", "b", 3]], "protocol": {"train_count": 40}}
    text = edit(data)
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return run, path


@pytest.mark.parametrize("key, value", [
    ("views.ten_crop.top1", 1.7), ("views.ten_crop.top1", "0.9"), ("views.ten_crop.top1", True),
    ("views.center.top5", float("nan")), ("views.center.top1", -0.1),
    ("views.center.top5", 0.3),                      # below its top-1 (0.4)
    ("n_test", -3), ("n_test", 12.5), ("n_test", "10"), ("per_level.leaf", 1.2),
    ("ece", "0.1"), ("confused_pairs.0.2", -1), ("protocol.train_count", 40.5)])
def test_a_metric_out_of_range_or_of_the_wrong_type_stops_the_summary(tmp_path, key, value):
    """metrics.json edited to a top-1 of 1.7 or "0.9" was tabled as 170.0 / 90.0 %: every
    value the tables read is checked, the error names the file and the key, and nothing of
    the summary is written."""
    def edit(data):
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    run, path = _one_run(tmp_path, edit)
    with pytest.raises(DataError, match=rf"{key.replace('.', '[.]')} is ") as caught:
        T.write_summary(run_name="r", results_dir=str(run), metrics_paths=[str(path)],
                        selection_paths=[], out_dir=run / "report")
    assert caught.value.path == str(path)
    assert not (run / "report").exists()


def test_a_truncated_metrics_file_is_named(tmp_path):
    run, path = _one_run(tmp_path, lambda data: json.dumps(data)[:40])
    with pytest.raises(DataError, match="not a valid metrics file .*truncated") as caught:
        T.write_summary(run_name="r", results_dir=str(run), metrics_paths=[str(path)],
                        selection_paths=[], out_dir=run / "report")
    assert caught.value.path == str(path)
    assert not (run / "report").exists()
