"""The regime x view table reads eval metrics, train summaries and benchmark files."""

from __future__ import annotations

import json

import pytest

from finegrained.errors import DataError
from finegrained.report.runs_table import (collect_rows, job_seconds, markdown_job_times,
                                       markdown_table, replace_between)

TSV_HEAD = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _run(root, regimes):
    for regime, (top1, val) in regimes.items():
        (root / "eval" / regime).mkdir(parents=True)
        (root / "eval" / regime / "metrics.json").write_text(json.dumps({
            "regime": regime, "n_test": 10, "per_level": {"leaf": top1},
            "views": {"center": {"top1": top1 - 0.1, "top5": 1.0},
                      "ten_crop": {"top1": top1, "top5": 1.0},
                      "multi_scale": {"top1": top1, "top5": 0.9}}}))
        (root / "train" / regime).mkdir(parents=True)
        (root / "train" / regime / "summary.json").write_text(json.dumps({"best_val_top1": val}))
        for family, seconds in (("train", 150.0), ("evaluate", 30.0)):
            (root / "benchmarks" / family).mkdir(parents=True, exist_ok=True)
            (root / "benchmarks" / family / f"{regime}.tsv").write_text(
                TSV_HEAD + f"{seconds}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t0\n")
    (root / "benchmarks" / "manifests").mkdir(parents=True)
    (root / "benchmarks" / "manifests" / "target.tsv").write_text(
        TSV_HEAD + "4.5\t0:00:04\t1\t1\t1\t1\t0\t0\t0\t0\n")
    return root


def test_rows_follow_runs_then_regime_order(tmp_path):
    a = _run(tmp_path / "a", {"scratch": (0.2, 0.25), "linear_probe": (0.9, 0.95)})
    b = _run(tmp_path / "b", {"full_finetune": (0.8, 0.85)})
    rows = collect_rows([("A", a), ("B", b)])
    assert [(r["run"], r["regime"]) for r in rows] == [
        ("A", "linear_probe"), ("A", "scratch"), ("B", "full_finetune")]
    first = rows[0]
    assert first["center_top1"] == pytest.approx(0.8) and first["ten_crop_top1"] == 0.9
    assert first["val_top1"] == 0.95
    assert first["train_seconds"] == 150.0 and first["eval_seconds"] == 30.0
    table = markdown_table(rows, levels=["leaf"])
    assert "| A | `linear_probe` | 80.0 / 100.0 | 90.0 / 100.0 | 90.0 / 90.0 | 90.0 | 95.0 " \
           "| 2.5 min | 30 s |" in table
    assert job_seconds(b) == {"evaluate/full_finetune": 30.0, "manifests/target": 4.5,
                              "train/full_finetune": 150.0}
    assert "| B | 4 s | evaluate/full_finetune 30 s, train/full_finetune 2.5 min | 3.1 min |" \
        in markdown_job_times([("B", b)])


def test_replace_between_keeps_markers():
    text = "intro\n<!-- b -->\nold\n<!-- e -->\nrest\n"
    assert replace_between(text, "new\n", "<!-- b -->", "<!-- e -->") == \
        "intro\n<!-- b -->\nnew\n<!-- e -->\nrest\n"
    with pytest.raises(ValueError):
        replace_between("no markers", "x", "<!-- b -->", "<!-- e -->")


def test_a_swept_regime_reads_its_chosen_training_job(tmp_path):
    run = _run(tmp_path / "a", {"full_finetune": (0.8, 0.85)})
    chosen = run / "train" / "full_finetune+lr=0.003"
    chosen.mkdir()
    (chosen / "summary.json").write_text(json.dumps({"best_val_top1": 0.9}))
    (run / "benchmarks" / "train" / "full_finetune+lr=0.003.tsv").write_text(
        TSV_HEAD + "60.0\t0:01:00\t1\t1\t1\t1\t0\t0\t0\t0\n")
    metrics = run / "eval" / "full_finetune" / "metrics.json"
    metrics.write_text(json.dumps(dict(json.loads(metrics.read_text()),
                                       train_variant="+lr=0.003")))
    [row] = collect_rows([("A", run)])
    assert row["train_variant"] == "+lr=0.003"
    assert row["val_top1"] == 0.9 and row["train_seconds"] == 60.0
    assert "| A | `full_finetune` (`+lr=0.003`) | 70.0 / 100.0 |" in markdown_table([row])


def test_replicate_table_reads_a_runs_seed_table(tmp_path):
    """--replicates: a run's table over its seeds, mean ± std [interval], read back from the
    CSV its report wrote."""
    from finegrained.report import tables
    from finegrained.report.runs_table import markdown_replicates

    def metrics(top1, refit):
        return {"views": {"center": {"top1": top1, "top5": 1.0}},
                "protocol": {"select_by": "val_loss", "refit": refit}}
    rows = tables.summarize({"linear_probe": [metrics(0.90, True), metrics(0.92, True),
                                              metrics(0.94, True)]})
    out = tmp_path / "run" / "report" / "tables"
    out.mkdir(parents=True)
    tables.write_tables(rows, out / "regime_views.csv", out / "regime_views.md")
    text = markdown_replicates([("iNat", tmp_path / "run")])
    assert text.startswith("iNat (top-1 %, over the seeds):")
    # mean 92.0, std 2.0, t(0.975, 2) = 4.303: half-width 4.303 * 2 / sqrt(3) = 4.97
    assert "| linear_probe | val_loss, refit on train+val | 3 | 92.0 ± 2.0 [87.0, 97.0] |" in text


def test_replicates_and_refits_read_their_own_jobs(tmp_path):
    """An evaluation `<regime>+seed=N` reads train/<regime>+seed=N; a refit row's train time
    adds the refit job's; a swept replicate names its chosen point."""
    root = _run(tmp_path / "a", {"linear_probe": (0.9, 0.95), "linear_probe+seed=1": (0.8, 0.85),
                                 "full_finetune+seed=1": (0.7, 0.75)})
    metrics = root / "eval" / "full_finetune+seed=1" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()),
                                   "train_variant": "+seed=1+lr=0.1"}))
    (root / "train" / "full_finetune+seed=1+lr=0.1").mkdir()
    (root / "train" / "full_finetune+seed=1+lr=0.1" / "summary.json").write_text(
        json.dumps({"best_val_top1": 0.77}))
    probe = root / "eval" / "linear_probe" / "metrics.json"
    probe.write_text(json.dumps({**json.loads(probe.read_text()), "protocol": {"refit": True}}))
    (root / "benchmarks" / "refit").mkdir()
    (root / "benchmarks" / "refit" / "linear_probe.tsv").write_text(
        TSV_HEAD + "50.0\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t0\n")
    rows = {r["regime"]: r for r in collect_rows([("A", root)])}
    assert rows["linear_probe+seed=1"]["val_top1"] == 0.85
    assert rows["linear_probe+seed=1"]["train_variant"] == ""
    assert rows["linear_probe"]["train_seconds"] == 200.0           # 150 train + 50 refit
    assert rows["full_finetune+seed=1"]["train_variant"] == "+seed=1+lr=0.1"
    assert rows["full_finetune+seed=1"]["val_top1"] == 0.77
    assert "refit/linear_probe 50 s" in markdown_job_times([("A", root)])


@pytest.mark.parametrize("file, edit, key", [
    ("eval/scratch/metrics.json", {"views": {"center": {"top1": 1.7, "top5": 1.0}}},
     "views.center.top1"),
    ("eval/scratch/metrics.json", {"views": {"center": {"top1": "0.9", "top5": 1.0}}},
     "views.center.top1"),
    ("eval/scratch/metrics.json", {"n_test": 0}, "n_test"),
    ("train/scratch/summary.json", {"best_val_top1": 95.0}, "best_val_top1"),
])
def test_a_value_out_of_range_or_of_the_wrong_type_is_refused_naming_file_and_key(
        tmp_path, file, edit, key):
    run = _run(tmp_path / "a", {"scratch": (0.2, 0.25)})
    path = run / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(DataError, match=rf"{key.replace('.', '[.]')} is ") as caught:
        collect_rows([("A", run)])
    assert caught.value.path == str(path)


def test_a_negative_wall_time_and_a_replicate_mean_above_one_are_refused(tmp_path):
    run = _run(tmp_path / "a", {"scratch": (0.2, 0.25)})
    bench = run / "benchmarks" / "train" / "scratch.tsv"
    bench.write_text(TSV_HEAD + "-150.0\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t0\n")
    with pytest.raises(DataError, match="s is -150.0, not a number of seconds") as caught:
        collect_rows([("A", run)])
    assert caught.value.path == str(bench)

    from finegrained.report.runs_table import markdown_replicates
    table = run / "report" / "tables" / "regime_views.csv"
    table.parent.mkdir(parents=True)
    table.write_text("regime,protocol,view,metric,n,mean,std,ci95_low,ci95_high,values\n"
                     "scratch,\"val_top1, train\",center,top1,2,1.2,0.1,0.3,1.0,0.7;1.7\n")
    with pytest.raises(DataError, match="mean is 1.2, not a fraction") as caught:
        markdown_replicates([("A", run)])
    assert caught.value.path == f"{table}:2"


def test_the_results_table_script_names_a_bad_metrics_file_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    run = _run(tmp_path / "a", {"scratch": (0.2, 0.25)})
    metrics = run / "eval" / "scratch" / "metrics.json"
    metrics.write_text(metrics.read_text()[:50])
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "results_table.py"), "--run",
                           f"A={run}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo / "src")})
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {metrics}: not a valid metrics file (") and \
        line.endswith("at line 1, column 51; truncated or edited?)"), line
