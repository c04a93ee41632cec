"""Figures and tables of the report on a small fake run: the files every function writes and
what they show, and one papermill notebook executed end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from finegrained.data.readers import CLASSES_SCHEMA  # noqa: E402
from finegrained.errors import DataError  # noqa: E402
from finegrained.fileio import sha256_file  # noqa: E402
from finegrained.report import figures, gallery, throughput  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN = "results/fake"
NAMES = ["Blue Jay", "Red Knot", "Grey Heron"]
VIEWS = {"center": 0.70, "ten_crop": 0.75, "multi_scale": 0.80}
AUGMENT = {"crop_area": [0.25, 1.0], "aspect_ratio": [0.75, 1.3333333], "flip": 0.5,
           "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0,
           "pca_lighting": 0.1, "rotation": 0.0, "scale_jitter": 0.0}
NO_AUGMENT = {"crop_area": [1.0, 1.0], "aspect_ratio": [1.0, 1.0], "flip": 0.0}


def _history(phases: dict[str, int], seed: int) -> dict:
    rows = {k: [] for k in ("phase", "epoch", "train_loss", "train_top1", "val_loss", "val_top1",
                            "images_per_second", "seconds", "input_wait_fraction")}
    for phase, epochs in phases.items():
        for e in range(epochs):
            rows["phase"].append(phase)
            rows["epoch"].append(e + 1)
            rows["train_loss"].append(2.0 / (e + 1 + seed))
            rows["train_top1"].append(min(1.0, 0.3 + 0.1 * e))
            rows["val_loss"].append(2.2 / (e + 1))
            rows["val_top1"].append(min(1.0, 0.25 + 0.1 * e))
            # First epoch of a phase compiles: slow; later ones 100, 200, 300 ...
            rows["images_per_second"].append(10.0 if e == 0 else 100.0 * e)
            rows["seconds"].append(1.0)
            rows["input_wait_fraction"].append(0.01)
    return rows


def _probe_history() -> dict:
    return {"phase": ["probe"] * 3, "epoch": [1, 2, 3], "l2": [0.001, 0.01, 0.1],
            "train_loss": [0.1, 0.3, 0.9], "train_top1": [1.0, 0.95, 0.8],
            "val_loss": [0.9, 0.6, 1.0], "val_top1": [0.6, 0.7, 0.65],
            "seconds": [0.2, 0.2, 0.2]}


def _write_shards(directory: Path, labels: list[int], seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (len(labels), 16, 16, 3), dtype=np.uint8)
    np.save(directory / "shard-00000.npy", images)
    ids = [f"{directory.name}-{i}" for i in range(len(labels))]
    pq.write_table(pa.table({"image_id": ids, "label": pa.array(labels, pa.int32())}),
                   directory / "shard-00000.parquet")
    index = {"split": directory.name, "image_size": 16, "format": "npy", "count": len(labels),
             "shards": [{"meta": "shard-00000.parquet", "images": "shard-00000.npy",
                         "meta_sha256": None, "images_sha256": None, "count": len(labels)}]}
    (directory / "index.json").write_text(json.dumps(index))
    return directory / "index.json"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _benchmark(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                    f"{seconds}\t0:00:{int(seconds):02d}\t512.5\t900\t400\t450\t1\t2\t90\t{seconds * 1.5}\n")


def make_fake_run(root: Path) -> Path:
    """A run under ``root`` with three regimes: the L-BFGS probe (one seed), full fine-tuning
    (two seeds, augmented, swept) and two-stage (head + main phases, one seed); 3 species,
    12 test images."""
    run = root / RUN
    data = run / "data/target"
    test_labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    _write_shards(data / "shards/test", test_labels, 1)
    _write_shards(data / "shards/train", [0, 1, 2, 0, 1, 2], 2)
    (data / "manifest").mkdir(parents=True)
    pq.write_table(pa.table({"label": pa.array([0, 1, 2], pa.int32()), "class_id": [5, 6, 7],
                             "name": NAMES, "common_name": NAMES,
                             "ancestor_ids": [[1], [1], [2]], "ancestor_names": [["a"], ["a"], ["b"]],
                             "depth": pa.array([1, 1, 1], pa.int32())}, schema=CLASSES_SCHEMA),
                   data / "manifest/classes.parquet")
    _write_json(data / "stats.json", {"eigenvalues": [100.0, 10.0, 1.0],
                                      "eigenvectors": np.eye(3).tolist()})
    # Predicted: every image of species 0 with an index >= 2 taken for species 1.
    predicted = [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0]
    regimes = {"linear_probe": [0], "full_finetune": [0, 1], "two_stage": [0]}
    summary = {"run_name": "fake", "regimes": {}, "rows": []}
    for regime, seeds in regimes.items():
        entries = []
        for seed in seeds:
            variant = "" if seed == 0 else f"+seed={seed}"
            train_dir, eval_dir = run / "train" / (regime + variant), run / "eval" / (regime + variant)
            train_dir.mkdir(parents=True)
            if regime == "linear_probe":
                history, phases = _probe_history(), [{"name": "probe", "kind": "lbfgs"}]
            else:
                spans = {"head": 2, "main": 3} if regime == "two_stage" else {"main": 4}
                history = _history(spans, seed)
                augment = AUGMENT if regime == "full_finetune" else NO_AUGMENT
                phases = [{"name": p, "kind": "sgd",
                           "train_settings": {"augment": augment, "image_size": 12}} for p in spans]
            pq.write_table(pa.table(history), train_dir / "history.parquet")
            _write_json(train_dir / "summary.json",
                        {"regime": regime, "variant": variant, "num_classes": 3,
                         "best_val_top1": max(history["val_top1"]),
                         "history_sha256": sha256_file(train_dir / "history.parquet"),
                         "settings": {"phases": phases}})
            top = [[p, (p + 1) % 3, (p + 2) % 3] for p in predicted]
            probs = [[0.9 - 0.01 * i, 0.05, 0.05] for i in range(12)]
            eval_dir.mkdir(parents=True)
            pq.write_table(pa.table({
                "image_id": [f"test-{i}" for i in range(12)],
                "label": pa.array(test_labels, pa.int32()),
                **{f"{v}_top5_labels": pa.array(top, pa.list_(pa.int32())) for v in VIEWS},
                **{f"{v}_top5_probs": pa.array(probs, pa.list_(pa.float32())) for v in VIEWS}}),
                eval_dir / "predictions.parquet")
            shift = 0.05 * seed + (0.1 if regime == "two_stage" else 0.0)
            _write_json(eval_dir / "metrics.json", {
                "regime": regime, "variant": variant, "n_test": 12, "summary_view": "ten_crop",
                "views": {v: {"top1": t + shift, "top5": 1.0} for v, t in VIEWS.items()},
                "per_level": {"leaf": 0.75 + shift, "level1": 0.9 + shift / 2},
                "confused_pairs": [[NAMES[0], NAMES[1], 2], [NAMES[2], NAMES[0], 1]],
                "provenance": {
                    "predictions_sha256": sha256_file(eval_dir / "predictions.parquet")}})
            _benchmark(run / f"benchmarks/train/{regime}{variant}.tsv", 30.0 + seed)
            _benchmark(run / f"benchmarks/evaluate/{regime}{variant}.tsv", 5.0)
            rel = f"{RUN}/%s/{regime}{variant}"
            entries.append({"seed": seed, "variant": variant, "train_variant": variant,
                            "metrics": rel % "eval" + "/metrics.json",
                            "predictions": rel % "eval" + "/predictions.parquet",
                            "history": rel % "train" + "/history.parquet",
                            "train_summary": rel % "train" + "/summary.json",
                            "benchmarks": {"train": f"{RUN}/benchmarks/train/{regime}{variant}.tsv",
                                           "evaluate": f"{RUN}/benchmarks/evaluate/{regime}{variant}.tsv"}})
        selection = ({"select_by": "val_top1", "chosen": "+lr=0.01",
                      "candidates": [{"variant": "+lr=0.01", "val_top1_mean": 0.5,
                                      "val_loss_mean": 1.25},
                                     {"variant": "+lr=0.1", "val_top1_mean": 0.25,
                                      "val_loss_mean": 2.0}]}
                     if regime == "full_finetune" else None)
        summary["regimes"][regime] = {"runs": entries, "selection": selection}
        for view, top1 in VIEWS.items():
            values = [top1 + 0.05 * s + (0.1 if regime == "two_stage" else 0.0) for s in seeds]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else None
            summary["rows"].append({
                "regime": regime, "view": view, "metric": "top1", "n": len(values),
                "mean": float(np.mean(values)), "std": std,
                "ci95_low": None if std is None else float(np.mean(values)) - 0.3,
                "ci95_high": None if std is None else float(np.mean(values)) + 0.3,
                "values": values})
    _benchmark(run / "benchmarks/pretrain.tsv", 100.0)
    _write_json(run / "report/summary.json", summary)
    return root


@pytest.fixture
def fake_run(tmp_path) -> Path:
    return make_fake_run(tmp_path)


@pytest.fixture
def runs(fake_run, monkeypatch):
    monkeypatch.chdir(fake_run)
    yield figures.load_runs(figures.read_json(f"{RUN}/report/summary.json"))
    plt.close("all")


def _written(stem: Path) -> str:
    """Both files exist and are images; returns the SVG's text."""
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    return text


def test_load_runs_reads_every_file(runs):
    assert list(runs) == ["linear_probe", "full_finetune", "two_stage"]
    assert [r["seed"] for r in runs["full_finetune"]] == [0, 1]
    run = runs["two_stage"][0]
    assert run["history_data"]["phase"][:3] == ["head", "head", "main"]
    assert run["metrics_data"]["views"]["center"]["top1"] == pytest.approx(0.8)
    assert figures.chance_percent(runs) == pytest.approx(100 / 3)
    table = figures.selection_markdown(figures.read_json(f"{RUN}/report/summary.json"))
    assert table.splitlines()[2] == ("| full_finetune | +lr=0.01 | val_top1 "
                                     "| +lr=0.01 (50.0 %, loss 1.250), +lr=0.1 (25.0 %, "
                                     "loss 2.000) |")


def test_regime_view_bars_one_bar_per_regime_and_view_error_bars_only_over_seeds(runs, tmp_path):
    summary = figures.read_json(f"{RUN}/report/summary.json")
    stem = tmp_path / "fig/regime_views"
    fig = figures.regime_view_bars(summary["rows"], stem, regimes=list(runs), chance=100 / 3)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
    assert len(bars) == 3 * 3
    # Heights are the means in percent, regime-major within each view's series.
    assert sorted(round(b.get_height(), 1) for b in bars)[:3] == [70.0, 72.5, 75.0]
    # Error bars: only full_finetune (two seeds) has them, one per view.
    errorbars = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert sum(len(c.lines[2][0].get_segments()) for c in errorbars) == 3
    svg = _written(stem)
    for text in ("full finetune", "two stage", "10-crop", "multi-scale", "82.5", "chance (33 %)"):
        assert text in svg
    # ci95 draws the rows' interval instead (here mean +- 0.3 = 30 points).
    fig = figures.regime_view_bars(summary["rows"], tmp_path / "ci", error="ci95")
    segments = [s for c in fig.axes[0].containers
                if isinstance(c, matplotlib.container.ErrorbarContainer)
                for s in c.lines[2][0].get_segments()]
    assert all(abs(s[1][1] - s[0][1] - 60) < 1e-6 for s in segments)
    with pytest.raises(ValueError):
        figures.regime_view_bars(summary["rows"], tmp_path / "bad", error="sem")


def test_learning_curves_panel_per_regime_phases_named(runs, tmp_path):
    fig = figures.learning_curves(runs, tmp_path / "curves")
    assert len(fig.axes) == 2 * 3
    svg = _written(tmp_path / "curves")
    for text in ("linear probe", "two stage", "head", "main", "L2 strength", "epoch"):
        assert text in svg
    loss_probe, top1_probe = fig.axes[0], fig.axes[3]
    assert loss_probe.get_xscale() == "log"
    assert top1_probe.get_xscale() == "log"
    # Two-stage: 2 head + 3 main epochs on one axis, 1..5, the main phase shaded.
    top1_two_stage = fig.axes[5]
    assert list(top1_two_stage.lines[0].get_xdata()) == [1, 2, 3, 4, 5]
    # The main phase (epochs 3-5) shaded from 2.5 to 5.5, the head phase not.
    [shade] = top1_two_stage.patches
    assert (shade.get_x(), shade.get_x() + shade.get_width()) == pytest.approx((2.5, 5.5))
    # Two seeds of full fine-tuning: two validation top-1 lines (+ train and chosen markers).
    assert len(fig.axes[4].lines) == 2 * 3


def test_tta_gain_in_points(runs, tmp_path):
    gains = figures.tta_gains(runs)
    assert gains["full_finetune"]["ten_crop"] == pytest.approx([5.0, 5.0])
    assert gains["two_stage"]["multi_scale"] == pytest.approx([10.0])
    fig = figures.tta_gain(runs, tmp_path / "tta")
    assert len([p for p in fig.axes[0].patches]) == 3 * 2
    svg = _written(tmp_path / "tta")
    assert "+5.0" in svg and "+10.0" in svg


def test_taxonomy_levels_coarse_to_fine(runs, tmp_path):
    fig = figures.taxonomy_levels(runs, tmp_path / "levels")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["level 1\n(coarsest)", "leaf\n(species)"]
    assert len(fig.axes[0].containers) == 3
    assert "linear probe" in _written(tmp_path / "levels")


def test_throughput_table(runs, tmp_path):
    speed, wait, epochs = throughput.history_speed(runs["two_stage"][0]["history_data"])
    # head: 10, 100; main: 10, 100, 200 -> first epochs left out -> median of 100, 100, 200.
    assert (speed, epochs) == (100.0, 5) and wait == pytest.approx(0.01)
    rows = throughput.throughput_rows(runs, extra_benchmarks={"pretrain": f"{RUN}/benchmarks/pretrain.tsv",
                                                              "missing": "nowhere.tsv"})
    assert [r["job"] for r in rows] == ["linear_probe", "full_finetune", "full_finetune+seed=1",
                                        "two_stage", "pretrain"]
    assert rows[0]["images_per_second"] is None and rows[0]["epochs"] is None
    assert rows[0]["note"] == "L-BFGS on cached features, 3 L2 strengths"
    assert rows[2]["train_wall_s"] == 31.0 and rows[2]["train_cpu_s"] == 46.5
    assert rows[2]["eval_max_rss_mb"] == 512.5
    throughput.write_throughput(rows, tmp_path / "t.csv", tmp_path / "t.md")
    table = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert table[3]["images_per_second"] == "100.0" and table[4]["epochs"] == ""
    md = (tmp_path / "t.md").read_text().splitlines()
    assert len(md) == 2 + 5 and md[0].startswith("| job | epochs | train images/s")
    assert "| full_finetune+seed=1 | 4 | 200 | 1.00 | 31 | 46 | 512 | 5.0 | 7.5 | 512 |  |" in md


def test_figures_and_tables_are_replaced_whole_or_not_at_all(runs, tmp_path, monkeypatch):
    """A drawing or formatting failure leaves the previous figure and table as they were."""
    fig = plt.figure()
    stem = tmp_path / "figures" / "curve"
    png, svg = figures.save(fig, stem)
    before = {png: png.read_bytes(), svg: svg.read_bytes()}
    rows = throughput.throughput_rows(runs)
    csv_path, md_path = tmp_path / "t.csv", tmp_path / "t.md"
    throughput.write_throughput(rows, csv_path, md_path)
    before[md_path] = md_path.read_bytes()

    def torn(self, path, **kwargs):
        Path(path).write_bytes(b"<half a figure")
        raise RuntimeError("renderer died")

    monkeypatch.setattr(type(fig), "savefig", torn)
    with pytest.raises(RuntimeError, match="renderer died"):
        figures.save(fig, stem)
    monkeypatch.setattr(throughput, "_format", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        throughput.write_throughput(rows, csv_path, md_path)
    plt.close(fig)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in stem.parent.iterdir()) == ["curve.png", "curve.svg"]


def test_a_history_or_predictions_file_changed_after_its_job_is_refused(fake_run, monkeypatch,
                                                                     tmp_path):
    """The report reads a train job's history and an evaluation's predictions only if they
    are the files those jobs wrote (the sha256 their summary and metrics.json record)."""
    monkeypatch.chdir(fake_run)
    history = Path(f"{RUN}/train/two_stage/history.parquet")
    table = pq.read_table(history)
    pq.write_table(table.set_column(table.schema.get_field_index("val_top1"), "val_top1",
                                    pa.array([0.99] * table.num_rows)), history)
    with pytest.raises(DataError, match="changed since it was written") as caught:
        figures.load_runs(figures.read_json(f"{RUN}/report/summary.json"))
    assert caught.value.path == str(history)

    predictions = Path(f"{RUN}/eval/linear_probe/predictions.parquet")
    pq.write_table(pq.read_table(predictions).slice(0, 6), predictions)
    metrics = figures.read_json(f"{RUN}/eval/linear_probe/metrics.json")
    with pytest.raises(DataError, match="changed since it was written") as caught:
        gallery.confused_pairs(metrics, predictions, f"{RUN}/data/target/shards/test/index.json",
                               f"{RUN}/data/target/manifest/classes.parquet", tmp_path / "pairs")
    assert caught.value.path == str(predictions)
    plt.close("all")


def test_confused_pairs_pick_the_confused_images(runs, tmp_path):
    regime, run = gallery.showcase_run(runs)
    assert regime == "linear_probe"     # the best on validation: 0.7 (0.55, 0.45)
    predictions = pq.read_table(run["predictions"]).to_pydict()
    examples = gallery.confusion_examples(predictions, run["metrics_data"]["confused_pairs"], NAMES,
                                          n_wrong=3, n_right=2)
    assert examples[0]["wrong"] == ["test-2", "test-3"]       # species 0 taken for 1
    assert examples[0]["right"] == ["test-4", "test-5"]       # species 1, right, most confident
    assert examples[1]["wrong"] == ["test-11"]
    fig = gallery.confused_pairs(run["metrics_data"], run["predictions"],
                                 f"{RUN}/data/target/shards/test/index.json",
                                 f"{RUN}/data/target/manifest/classes.parquet", tmp_path / "pairs")
    assert sum(len(ax.images) for ax in fig.axes) == (2 + 2) + (1 + 2)
    svg = _written(tmp_path / "pairs")
    assert "Blue Jay" in svg and "Red Knot" in svg


def test_augmentation_grid_uses_the_runs_recipe(runs, tmp_path):
    regime, run, (augment, size, phase) = gallery.augmented_run(runs)
    assert (regime, size, phase) == ("full_finetune", 12, "main") and augment == AUGMENT
    assert gallery.augmented_run(runs, "two_stage") is None
    fig = gallery.augmentation_of_runs(runs, f"{RUN}/data/target/shards/train/index.json",
                                       f"{RUN}/data/target/stats.json", tmp_path / "aug",
                                       n_images=2, n_draws=3)
    images = [ax.images[0].get_array() for ax in fig.axes]
    assert len(images) == 2 * (1 + 3)
    assert images[0].shape == (16, 16, 3) and images[1].shape == (12, 12, 3)
    assert not np.array_equal(images[1], images[2])     # independent draws
    svg = _written(tmp_path / "aug")
    assert "crop area 0.25-1" in svg and "pca lighting 0.1" in svg
    fig = gallery.augmentation_of_runs(runs, None, None, tmp_path / "none", regime="two_stage")
    assert "no regime" in _written(tmp_path / "none")


def test_results_notebook_executes_on_a_fake_run(fake_run, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.chdir(fake_run)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    out = fake_run / RUN / "report/notebooks/results.ipynb"
    out.parent.mkdir(parents=True)
    papermill.execute_notebook(
        str(REPO / "workflow/notebooks/results.ipynb"), str(out), kernel_name="python3",
        progress_bar=False,
        parameters={"summary": f"{RUN}/report/summary.json", "figures_dir": f"{RUN}/report/figures",
                    "tables_dir": f"{RUN}/report/tables", "benchmarks_dir": f"{RUN}/benchmarks"})
    report = fake_run / RUN / "report"
    for name in ("learning_curves", "regime_views", "tta_gain", "taxonomy_levels"):
        _written(report / "figures" / name)
    assert "pretrain" in (report / "tables/throughput.md").read_text()
    executed = json.loads(out.read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
