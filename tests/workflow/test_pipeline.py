"""The whole workflow, end to end, on a tiny generated dataset (real jobs, real files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from finegrained.data.shards import ShardReader
from finegrained.fileio import sha256_file
from finegrained.models.weights import read_metadata, read_tensors

REPO = Path(__file__).resolve().parents[2]

#: The tiny run: the workflow catalog's smoke-test config (.test/config/config.yaml).
TINY = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())


def snakemake(workdir, *configs, target="all", dry_run=False):
    """Run the workflow in ``workdir`` on the tiny config plus ``configs`` (dicts)."""
    files = []
    for i, layer in enumerate((TINY,) + configs):
        files.append(workdir / f"config-{i}.yaml")
        files[-1].write_text(yaml.safe_dump(layer))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--configfile", str(REPO / "config" / "config.yaml"), *map(str, files),
         "--cores", "2", target] + (["-n"] if dry_run else []),
        cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}"
                         for p in sorted((workdir / "results").rglob("*.log")))
        pytest.fail(f"workflow failed:\n{proc.stderr[-5000:]}\n{logs}")
    return proc


def job_counts(dry_run_output: str) -> dict[str, int]:
    """rule -> count from the "Job stats" table of a dry run."""
    lines = dry_run_output.split("Job stats:")[1].splitlines()   # '', header, rule, rows
    counts = {}
    for line in lines[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    snakemake(workdir)
    return workdir / "results" / "tiny"


@pytest.mark.slow(seconds=130)
def test_manifests_and_shards_agree(tiny_run):
    data = tiny_run / "data" / "target"
    counts = {}
    for split in ["train", "val", "test"]:
        manifest = pq.read_table(data / "manifest" / f"{split}.parquet")
        reader = ShardReader(data / "shards" / split / "index.json")
        images, labels = reader.load_all()
        assert images.shape == (manifest.num_rows, 40, 40, 3) and images.dtype == np.uint8
        assert sorted(labels.tolist()) == sorted(manifest["label"].to_pylist())
        counts[split] = manifest.num_rows
    # 3 classes x 10 official-train images, 20% held out per class; 3 x 4 test.
    assert counts == {"train": 24, "val": 6, "test": 12}


def test_stats_and_logs(tiny_run):
    stats = json.loads((tiny_run / "data" / "target" / "stats.json").read_text())
    assert stats["num_images"] == 24
    assert all(0 < m < 255 for m in stats["mean"])
    for rule in ["manifests", "channel_stats", "pretrain", "init_target_model"]:
        assert list((tiny_run / "logs").rglob(f"{rule}*")), rule
        assert list((tiny_run / "benchmarks").rglob(f"{rule}*")), rule


def test_pretrained_weights_flow_into_the_target_model(tiny_run):
    pretrained = read_tensors(tiny_run / "pretrain" / "weights.safetensors")
    meta = read_metadata(tiny_run / "pretrain" / "weights.safetensors")
    assert meta["arch"] == "resnet18" and json.loads(meta["class_names"]).__len__() == 4
    init = read_tensors(tiny_run / "weights" / "init.safetensors")
    assert init["head/kernel"].shape[1] == 3 and pretrained["head/kernel"].shape[1] == 4
    body = [k for k in pretrained if not k.startswith("head/")]
    assert body and all(np.array_equal(init[k], pretrained[k]) for k in body)
    report = json.loads((tiny_run / "weights" / "init_report.json").read_text())
    assert report["load"]["loaded"] == len(body)
    metrics = json.loads((tiny_run / "pretrain" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2


@pytest.mark.parametrize("regime", ["linear_probe", "partial_finetune", "full_finetune",
                                    "two_stage", "scratch"])
def test_every_regime_writes_weights_history_and_summary(tiny_run, regime):
    out = tiny_run / "train" / regime
    summary = json.loads((out / "summary.json").read_text())
    history = pq.read_table(out / "history.parquet").to_pylist()
    assert summary["regime"] == regime and len(summary["config_hash"]) == 64
    assert summary["best_epoch"] in [row["epoch"] for row in history]
    best_rows = [r for r in history if r["phase"] == summary["best_phase"]
                 and r["epoch"] == summary["best_epoch"]]
    assert best_rows[0]["val_top1"] == summary["best_val_top1"]
    assert summary["best_val_top1"] == max(r["val_top1"] for r in history)
    columns = set(history[0])
    assert {"epoch", "phase", "train_loss", "train_top1", "val_loss", "val_top1"} <= columns
    if regime != "linear_probe":
        assert {"step", "lr", "images_per_second", "seconds", "input_wait_fraction"} <= columns
    tensors = read_tensors(out / "weights.safetensors")
    assert tensors["head/kernel"].shape[1] == 3
    assert not (tiny_run / "checkpoints" / regime).exists()     # removed after success


def test_frozen_regimes_keep_the_pretrained_backbone(tiny_run):
    init = read_tensors(tiny_run / "weights" / "init.safetensors")
    probe = read_tensors(tiny_run / "train" / "linear_probe" / "weights.safetensors")
    partial = read_tensors(tiny_run / "train" / "partial_finetune" / "weights.safetensors")
    for name, value in init.items():
        if not name.startswith("head/"):
            np.testing.assert_array_equal(probe[name], value, err_msg=name)
        if name.split("/")[0] in ("stem", "stage1", "stage2", "stage3"):
            np.testing.assert_array_equal(partial[name], value, err_msg=name)
    assert not np.array_equal(probe["head/kernel"], init["head/kernel"])
    assert not np.array_equal(partial["stage4/0/conv1/kernel"], init["stage4/0/conv1/kernel"])
    index = json.loads((tiny_run / "features" / "train" / "index.json").read_text())
    assert set(index["layers"]) == {"stage3", "stage4"}
    maps = json.loads((tiny_run / "features" / "train" / "stage3.map" / "index.json").read_text())
    assert set(maps["layers"]) == {"stage3:map"} and maps["count"] == index["count"]
    summary = json.loads((tiny_run / "train" / "partial_finetune" / "summary.json").read_text())
    assert summary["provenance"]["features_train_stage3:map_sha256"] == sha256_file(
        tiny_run / "features" / "train" / "stage3.map" / "index.json")


def test_config_paths_reach_jobs_without_a_shell_parsing_them(tiny_run, tmp_path):
    """backbone.weights and source_class_names used to be pasted between single quotes: a
    path holding ``'; touch PWNED; echo '`` ran that command, and an apostrophe broke the
    job. Now the file with that name is simply read."""
    evil = tmp_path / "it's here'; touch PWNED; echo '"
    evil.mkdir()
    weights = evil / "w'; touch PWNED2; echo '.safetensors"
    shutil.copy(tiny_run / "pretrain" / "weights.safetensors", weights)
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copytree(tiny_run / "data", workdir / "results" / "tiny" / "data")
    shutil.copytree(tiny_run / "demo_data", workdir / "results" / "tiny" / "demo_data")
    # a class name file there too, naming the first target class as source output 1
    sources = len(json.loads(read_metadata(weights)["class_names"]))
    target = pq.read_table(tiny_run / "data" / "target" / "manifest" / "classes.parquet")
    first = target.column("name")[0].as_py()
    names = evil / "names'; touch PWNED3; echo '.txt"
    names.write_text("\n".join(first if i == 1 else f"no such bird {i}"
                               for i in range(sources)) + "\n")
    snakemake(workdir, {"backbone": {"weights": str(weights), "source_class_names": str(names)},
                        "head": {"init_from_source_names": True}},
              target="results/tiny/weights/init.safetensors")
    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.glob("PWNED*"))
    report = json.loads((workdir / "results" / "tiny" / "weights" / "init_report.json").read_text())
    assert report["weights"] == str(weights) and report["load"]["loaded"] > 0
    assert report["head_init"]["num_source_classes"] == sources
    assert [(m["source_index"], m["source_name"]) for m in report["head_init"]["matched"]] == [
        (1, first)]


def test_a_finished_run_says_what_it_found(tiny_run):
    """What `make demo` ends with: the top-1 table, where the figures are, the report."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "show_results.py"),
                           str(tiny_run), "--report-command", "make report"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("Test top-1 (%) of run tiny, per regime and test-time view:")
    assert "| linear probe |" in out.lower().replace("_", " ") or "linear_probe" in out
    assert "Figures (PNG, SVG):" in out and "regime_views" in out
    assert out.rstrip().endswith("HTML report with every figure: make report")
    assert len(out.splitlines()) < 20


def test_dropping_a_regime_reruns_no_feature_cache(tiny_run):
    """Each boundary map is a job of its own: the probe's pooled cache does not depend on
    which cached regimes are listed."""
    regimes = ["linear_probe", "full_finetune", "two_stage", "scratch"]
    counts = job_counts(snakemake(tiny_run.parents[1], {"regimes": regimes},
                                  target="summarize", dry_run=True).stdout)
    assert counts == {"summarize": 1}


@pytest.mark.parametrize("regime", ["linear_probe", "partial_finetune", "full_finetune",
                                    "two_stage", "scratch"])
def test_every_regime_is_evaluated_on_the_test_split(tiny_run, regime):
    from finegrained.fileio import sha256_file

    out = tiny_run / "eval" / regime
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["regime"] == regime and metrics["variant"] == ""
    assert metrics["n_test"] == 12 and metrics["summary_view"] == "ten_crop"
    assert set(metrics["views"]) == {"center", "ten_crop", "multi_scale"}
    for view in metrics["views"].values():
        assert 0.0 <= view["top1"] <= view["top5"] == 1.0      # 3 classes: all in the top 5
    levels = list(metrics["per_level"])
    assert levels[0] == "level1" and levels[-1] == "leaf"      # the demo has a hierarchy
    assert all(0.0 <= metrics["per_level"][k] <= 1.0 for k in levels)
    assert 0.0 <= metrics["ece"] <= 1.0 and len(metrics["per_class"]) == 3
    summary = json.loads((tiny_run / "train" / regime / "summary.json").read_text())
    provenance = metrics["provenance"]
    assert provenance["config_hash"] == summary["config_hash"]
    test_index = tiny_run / "data" / "target" / "shards" / "test" / "index.json"
    assert provenance["shard_index_sha256"] == sha256_file(test_index)
    assert provenance["weights_sha256"] == sha256_file(
        tiny_run / "train" / regime / "weights.safetensors")
    predictions = pq.read_table(out / "predictions.parquet")
    reader = ShardReader(test_index)
    assert predictions.column("image_id").to_pylist() == reader.meta.column("image_id").to_pylist()
    assert predictions.column("label").to_pylist() == reader.labels.tolist()
    assert list((tiny_run / "logs").rglob(f"evaluate/{regime}.log"))


REPORT_FIGURES = ("learning_curves", "regime_views", "tta_gain", "taxonomy_levels",
                  "confused_pairs", "augmentation")


def test_all_ends_with_the_report_figures_and_the_html_report(tiny_run):
    report = tiny_run / "report"
    for name in REPORT_FIGURES:
        assert (report / "figures" / f"{name}.png").stat().st_size > 1000
        assert "<svg" in (report / "figures" / f"{name}.svg").read_text()
    for name in ("results", "examples"):
        notebook = json.loads((report / "notebooks" / f"{name}.ipynb").read_text())
        outputs = [o for c in notebook["cells"] for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o["output_type"] == "error"]
    table = (report / "tables" / "throughput.md").read_text()
    for regime in TINY["regime_settings"]:
        assert f"| {regime} |" in table
    html = tiny_run.parents[1] / "report.html"
    snakemake(tiny_run.parents[1], target=f"--report={html}")
    assert html.stat().st_size > 100_000


REPLICATED = {"regimes": ["full_finetune"], "seeds": [0, 1],
              "sweep": {"full_finetune": {"lr": [0.01, 0.2]}}}


@pytest.fixture(scope="module")
def replicated_run(tiny_run):
    """The tiny run again with two seeds and an lr sweep of full_finetune (after the other
    tests: it adds jobs)."""
    snakemake(tiny_run.parents[1], REPLICATED, target="summarize")
    return tiny_run


def test_seeds_and_sweep_train_every_point_and_evaluate_the_chosen_one(replicated_run):
    run = replicated_run
    for variant in ["+lr=0.01", "+lr=0.2", "+seed=1+lr=0.01", "+seed=1+lr=0.2"]:
        summary = json.loads((run / "train" / f"full_finetune{variant}" / "summary.json").read_text())
        assert summary["variant"] == variant
        assert summary["settings"]["seed"] == (1 if "seed" in variant else 0)
        lr = summary["settings"]["phases"][0]["train_settings"]["lr"]
        assert lr == (0.01 if "lr=0.01" in variant else 0.2)

    selection = json.loads((run / "select" / "full_finetune.json").read_text())
    means = {c["variant"]: c["val_top1_mean"] for c in selection["candidates"]}
    for variant, mean in means.items():
        tops = [json.loads((run / "train" / f"full_finetune{v}" / "summary.json").read_text())
                ["best_val_top1"] for v in (variant, f"+seed=1{variant}")]
        assert mean == pytest.approx(sum(tops) / 2)
    chosen = selection["chosen"]
    assert means[chosen] == max(means.values())

    # only the chosen point meets the test split, once per seed
    evaluated = sorted(p.parent.name for p in run.glob("eval/full_finetune*/metrics.json"))
    assert evaluated == ["full_finetune", "full_finetune+seed=1"]
    for eval_variant, train_variant in [("", chosen), ("+seed=1", f"+seed=1{chosen}")]:
        metrics = json.loads((run / "eval" / f"full_finetune{eval_variant}" / "metrics.json").read_text())
        assert metrics["train_variant"] == train_variant
        assert metrics["provenance"]["weights_sha256"] == sha256_file(
            run / "train" / f"full_finetune{train_variant}" / "weights.safetensors")

    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["regimes"]["full_finetune"]["selection"]["chosen"] == chosen
    assert [r["seed"] for r in summary["regimes"]["full_finetune"]["runs"]] == [0, 1]
    row = next(r for r in summary["rows"] if (r["regime"], r["view"], r["metric"])
               == ("full_finetune", "center", "top1"))
    values = [json.loads((run / "eval" / name / "metrics.json").read_text())["views"]["center"]["top1"]
              for name in ["full_finetune", "full_finetune+seed=1"]]
    assert row["values"] == values and row["n"] == 2
    assert row["mean"] == pytest.approx(sum(values) / 2)
    assert "± " in (run / "report" / "tables" / "regime_views.md").read_text()


def test_a_changed_evaluation_view_retrains_nothing(replicated_run):
    changed = dict(REPLICATED, evaluation={"multi_scale_fractions": [0.5, 1.0]})
    counts = job_counts(snakemake(replicated_run.parents[1], changed, target="summarize",
                                  dry_run=True).stdout)
    assert counts == {"evaluate_regime": 2, "summarize": 1}
    unchanged = snakemake(replicated_run.parents[1], REPLICATED, target="summarize", dry_run=True)
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr


def test_report_figures_over_seeds_and_a_sweep(replicated_run):
    snakemake(replicated_run.parents[1], REPLICATED, target="figures")
    figures = replicated_run / "report" / "figures"
    assert "mean of 2 seeds, +- 1 std" in (figures / "regime_views.svg").read_text()
    chosen = json.loads((replicated_run / "select" / "full_finetune.json").read_text())["chosen"]
    assert chosen.lstrip("+") in (figures / "learning_curves.svg").read_text()
