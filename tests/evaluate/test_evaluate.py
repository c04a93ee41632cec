"""The evaluation stage: test-time views, score averaging, metrics, the evaluate job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from finegrained.data.manifest import EXCLUDED_CLASSES_KEY
from finegrained.evaluate import metrics as M
from finegrained.evaluate.views import average_scores, render_view, view_boxes
from finegrained.train.augment import center_crop

from helpers.scripts import load_script
from finegrained.fileio import sha256_file
from helpers.training import coloured_squares, overwrite_tensor, write_classes, write_split

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- views

def test_ten_crop_is_five_distinct_windows_and_their_mirrors():
    views = view_boxes("ten_crop", 40, 40, crop_fraction=0.75)
    assert len(views) == 10
    boxes = [box for box, _ in views]
    assert len(set(boxes[:5])) == 5 and boxes[5:] == boxes[:5]
    assert [flip for _, flip in views] == [False] * 5 + [True] * 5
    assert all(box[2] == box[3] == 30.0 for box in boxes)
    assert {(box[0], box[1]) for box in boxes[:5]} == {(0, 0), (0, 10), (10, 0), (10, 10),
                                                        (5, 5)}


def test_mirrored_view_is_the_mirror_image():
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3)).astype(np.uint8)
    for box, _ in view_boxes("ten_crop", 24, 24, crop_fraction=0.75)[:5]:
        plain = np.asarray(render_view(images, box, False, 16))
        mirrored = np.asarray(render_view(images, box, True, 16))
        np.testing.assert_array_equal(mirrored, plain[:, :, ::-1, :])


def test_center_view_is_the_validation_view():
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 40, 3)).astype(np.uint8)
    [(box, flip)] = view_boxes("center", 40, 40, crop_fraction=0.875)
    assert not flip
    np.testing.assert_array_equal(np.asarray(render_view(images, box, False, 32)),
                                  np.asarray(center_crop(images, 32, 0.875)))


def test_multi_scale_is_a_ten_crop_per_fraction():
    views = view_boxes("multi_scale", 40, 40, crop_fraction=0.875,
                       multi_scale_fractions=[0.75, 1.0])
    assert len(views) == 20
    assert views[:10] == view_boxes("ten_crop", 40, 40, crop_fraction=0.75)
    assert {box[2] for box, _ in views[10:]} == {40.0}


def test_softmax_and_logit_averaging():
    logits = np.array([[[2.0, 0.0]], [[-2.0, 0.0]]])      # two views, one image
    soft = average_scores(logits, "softmax")
    e = np.exp(2.0) / (1 + np.exp(2.0))
    np.testing.assert_allclose(soft, [[(e + 1 - e) / 2, (1 - e + e) / 2]], rtol=1e-6)
    np.testing.assert_allclose(average_scores(logits, "logits"), [[0.5, 0.5]], rtol=1e-6)
    # The two rules differ when the views disagree in confidence.
    logits = np.array([[[4.0, 0.0]], [[0.0, 1.0]]])
    soft, mean = average_scores(logits, "softmax"), average_scores(logits, "logits")
    np.testing.assert_allclose(mean, jax.nn.softmax(np.array([[2.0, 0.5]])), rtol=1e-6)
    assert not np.allclose(soft, mean)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        average_scores(logits, "median")


# ---------------------------------------------------------------------------- metrics

def test_top_k_on_a_hand_example():
    probs = np.array([[0.1, 0.5, 0.3, 0.1],
                      [0.4, 0.1, 0.2, 0.3],
                      [0.25, 0.25, 0.4, 0.1]])
    labels = np.array([2, 0, 1])
    top, scores = M.top_k(probs, 2)
    np.testing.assert_array_equal(top, [[1, 2], [0, 3], [2, 0]])    # tie: lower label first
    np.testing.assert_allclose(scores, [[0.5, 0.3], [0.4, 0.3], [0.4, 0.25]])
    assert M.top_k_accuracy(top, labels, 1) == pytest.approx(1 / 3)
    assert M.top_k_accuracy(top, labels, 2) == pytest.approx(2 / 3)
    assert M.top_k(probs, 10)[0].shape == (3, 4)                       # k capped at C


# A 3-level hierarchy (ids: root 1; orders 10, 20; families 100, 101, 200) with leaves at
# unequal depths: leaves 0, 1 under family 100, leaf 2 under family 101 (all order 10),
# leaf 3 directly under order 20 (depth 2), leaf 4 under family 200 (order 20).
ANCESTORS = [[100, 10, 1], [100, 10, 1], [101, 10, 1], [20, 1], [200, 20, 1]]


def test_taxonomy_levels_with_unequal_depths():
    labels = np.array([0, 0, 2, 3, 4, 4])
    predicted = np.array([0, 1, 0, 4, 3, 2])
    acc = M.taxonomy_accuracy(predicted, labels, ANCESTORS)
    assert list(acc) == ["level1", "level2", "level3", "leaf"]
    assert acc["level1"] == 1.0                 # every class shares the root
    # level2 (orders): 0,0 right; 2->0 right (10); 3->4 right (20); 4->3 right; 4->2 wrong.
    assert acc["level2"] == pytest.approx(5 / 6)
    # level3 (families) counts only the 5 images whose true class has one (not label 3):
    # 0->0, 0->1 right (100); 2->0 wrong; 4->3 wrong (3 has no family); 4->2 wrong.
    assert acc["level3"] == pytest.approx(2 / 5)
    assert acc["leaf"] == pytest.approx(1 / 6)


def test_no_hierarchy_has_the_leaf_level_only():
    acc = M.taxonomy_accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]), [[], []])
    assert acc == {"leaf": pytest.approx(2 / 3)}


def test_ece_hand_example():
    # Perfectly calibrated: in the 0.8 bin 4 of 5 right, in the 0.6 bin 3 of 5 right.
    confidence = np.array([0.8] * 5 + [0.6] * 5)
    correct = np.array([1, 1, 1, 1, 0, 1, 1, 1, 0, 0], bool)
    assert M.expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)
    # Over-confident: confidence 0.9, accuracy 0.5 in one bin; 1.0 and right in another.
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 1.0, 1.0])
    correct = np.array([1, 0, 1, 0, 1, 1], bool)
    assert M.expected_calibration_error(confidence, correct) == pytest.approx(4 / 6 * 0.4)


def test_per_class_and_confused_pairs():
    names = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 1, 1])
    predicted = np.array([0, 1, 1, 0, 1])
    assert M.per_class_accuracy(predicted, labels, names) == {
        "a": pytest.approx(1 / 3), "b": 0.5, "c": None}
    assert M.confused_pairs(predicted, labels, names) == [["a", "b", 2], ["b", "a", 1]]
    assert M.confused_pairs(predicted, labels, names, top=1) == [["a", "b", 2]]


# ---------------------------------------------------------------------------- the job

CONTRACT = {"regime", "variant", "n_test", "excluded_classes", "views", "summary_view",
            "per_level", "ece", "per_class", "confused_pairs", "protocol", "provenance"}


@pytest.fixture(scope="module")
def evaluate_script():
    return load_script("evaluate")


def test_evaluate_job_writes_the_contract(tmp_path, random_model, evaluate_script):
    from finegrained.provenance import git_revision
    from finegrained.models import flatten_state
    from finegrained.models.weights import save_weights, weights_metadata

    names = ["red", "green", "blue", "yellow"]
    images, labels = coloured_squares(13, size=24)
    test_index = write_split(tmp_path / "shards", "test", images, labels, names)
    classes = tmp_path / "classes.parquet"
    write_classes(classes, names)
    # A class with test photos and none in train, left out by the manifests.
    excluded = [{"class_id": 9, "name": "purple", "val": 0, "test": 3}]
    pq.write_table(pq.read_table(classes).replace_schema_metadata(
        {EXCLUDED_CLASSES_KEY: json.dumps(excluded).encode()}), classes)
    model = random_model("resnet18", 4, width=8, stage_depths=[1, 1, 1, 1])
    weights = tmp_path / "weights.safetensors"
    save_weights(weights, flatten_state(model), metadata=weights_metadata(
        arch="resnet18", num_classes=4, class_names=names, width="8",
        stage_depths=json.dumps([1, 1, 1, 1])))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({     # a refit of the grid point +lr=0.1
        "config_hash": "f" * 64, "variant": "", "refit": True, "select_by": "val_loss",
        "trained_on": "train+val", "train_count": 64, "weights_sha256": sha256_file(weights),
        "settings": {"refit": {"train_variant": "+lr=0.1"}}}))
    settings = {"regime": "full_finetune", "variant": "", "image_size": 16,
                "eval_crop_fraction": 0.875, "multi_scale_fractions": [0.75, 1.0],
                "average": "softmax", "batch_size": 8, "verify_shards": True,
                "protocol": {"select_by": "val_loss", "refit": True}}

    # A model made under another protocol than the run's is refused.
    args = ["--test-index", str(test_index), "--weights", str(weights), "--train-summary",
            str(summary), "--classes", str(classes), "--out-dir", str(tmp_path / "other")]
    for protocol in ({"select_by": "val_loss", "refit": False},
                     {"select_by": "val_top1", "refit": True}):
        assert evaluate_script.main(["--settings", json.dumps({**settings, "protocol": protocol}),
                                     *args]) == 1
        assert not (tmp_path / "other").exists()

    # Through the script, as the rule runs it.
    rc = evaluate_script.main([
        "--settings", json.dumps(settings), "--test-index", str(test_index),
        "--weights", str(weights), "--train-summary", str(summary), "--classes", str(classes),
        "--out-dir", str(tmp_path / "eval")])
    assert rc == 0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert CONTRACT <= set(written)
    assert written["n_test"] == 13 and written["summary_view"] == "ten_crop"
    assert written["excluded_classes"] == excluded
    assert written["protocol"] == {"select_by": "val_loss", "refit": True,
                                   "trained_on": "train+val", "train_count": 64}
    assert written["train_variant"] == "+lr=0.1"
    assert set(written["views"]) == {"center", "ten_crop", "multi_scale"}
    for view in written["views"].values():
        assert 0.0 <= view["top1"] <= view["top5"] <= 1.0
        assert view["top5"] == 1.0                  # 4 classes: the true one is in the top 5
    assert list(written["per_level"]) == ["leaf"]
    assert written["per_level"]["leaf"] == written["views"]["ten_crop"]["top1"]
    assert 0.0 <= written["ece"] <= 1.0
    assert set(written["per_class"]) == set(names)
    provenance = written["provenance"]
    assert provenance["config_hash"] == "f" * 64
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    assert provenance["git_revision"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert git_revision(tmp_path) is None            # not a checkout
    assert set(provenance["package_versions"]) == {"python", "jax", "jaxlib", "flax", "optax",
                                                   "numpy", "pyarrow"}
    assert provenance["shard_indexes_sha256"] == {"test": provenance["shard_index_sha256"]}
    assert provenance["device"]["count"] >= 1
    assert len(provenance["shard_index_sha256"]) == len(provenance["weights_sha256"]) == 64
    assert provenance["predictions_sha256"] == sha256_file(tmp_path / "eval"
                                                           / "predictions.parquet")

    predictions = pq.read_table(tmp_path / "eval" / "predictions.parquet")
    assert predictions.num_rows == 13
    assert predictions.column("label").to_pylist() == labels.tolist()
    top = np.array(predictions.column("ten_crop_top5_labels").to_pylist())
    probs = np.array(predictions.column("ten_crop_top5_probs").to_pylist())
    assert top.shape == probs.shape == (13, 4)
    assert np.all(np.diff(probs, axis=1) <= 0) and np.all(probs.sum(1) <= 1 + 1e-5)
    top1 = float(np.mean(top[:, 0] == labels))
    assert top1 == pytest.approx(written["views"]["ten_crop"]["top1"])


def test_evaluate_refuses_a_model_changed_after_its_train_job(tmp_path, random_model,
                                                             evaluate_script, capsys):
    """Overwritten head bytes were evaluated (50 -> 30 % on the tiny set); a weights file
    swapped for another model, and a torn train summary, are refused the same way: one
    line naming the file, exit 1, nothing written."""
    from finegrained.models import flatten_state
    from finegrained.models.weights import save_weights, weights_metadata

    names = ["red", "green", "blue", "yellow"]
    test_index = write_split(tmp_path / "shards", "test", *coloured_squares(8, size=24), names)
    classes = tmp_path / "classes.parquet"
    write_classes(classes, names)
    meta = weights_metadata(arch="resnet18", num_classes=4, class_names=names, width="8",
                            stage_depths=json.dumps([1, 1, 1, 1]))
    weights, other = tmp_path / "weights.safetensors", tmp_path / "other.safetensors"
    for path, seed in ((weights, 0), (other, 1)):
        model = random_model("resnet18", 4, width=8, stage_depths=[1, 1, 1, 1], seed=seed)
        save_weights(path, flatten_state(model), metadata=meta)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"config_hash": "f" * 64, "refit": False, "select_by": "val_top1",
                                   "weights_sha256": sha256_file(weights)}))
    settings = {"regime": "full_finetune", "variant": "", "image_size": 16,
                "eval_crop_fraction": 0.875, "multi_scale_fractions": [1.0],
                "average": "softmax", "batch_size": 8, "verify_shards": True,
                "protocol": {"select_by": "val_top1", "refit": False}}

    def evaluate(model):
        capsys.readouterr()
        rc = evaluate_script.main([
            "--settings", json.dumps(settings), "--test-index", str(test_index), "--weights",
            str(model), "--train-summary", str(summary), "--classes", str(classes),
            "--out-dir", str(tmp_path / "eval")])
        return rc, capsys.readouterr().err.strip().splitlines()

    overwrite_tensor(weights, "head/kernel")
    rc, err = evaluate(weights)
    assert rc == 1 and len(err) == 1
    assert err[0].startswith(f"error: {weights}: changed since it was written") and \
        f"{summary} records" in err[0], err
    rc, err = evaluate(other)
    assert rc == 1 and err[0].startswith(f"error: {other}: changed since it was written")
    summary.write_text(summary.read_text()[:30])
    rc, err = evaluate(weights)
    assert rc == 1 and err[0].startswith(f"error: {summary}: not a valid train summary")
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_weights_of_other_classes(tmp_path, random_model):
    from finegrained.errors import DataError
    from finegrained.models.loading import trained_model
    from finegrained.models import flatten_state
    from finegrained.models.weights import save_weights, weights_metadata

    model = random_model("resnet18", 2, width=8, stage_depths=[1, 1, 1, 1])
    weights = tmp_path / "weights.safetensors"
    save_weights(weights, flatten_state(model), metadata=weights_metadata(
        arch="resnet18", num_classes=2, class_names=["a", "b"], width="8",
        stage_depths=json.dumps([1, 1, 1, 1])))
    with pytest.raises(DataError, match="classes"):
        trained_model(weights, ["a", "c"])
