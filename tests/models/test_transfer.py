"""The target model at the start of transfer: pretrained body, new head, name-matched rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from finegrained.data.readers import CLASSES_SCHEMA, read_dataset
from finegrained.errors import WeightsError
from finegrained.fileio import sha256_file
from finegrained.plan.paths import sha256_record
from finegrained.models import build_model, flatten_state, to_flat
from finegrained.models.transfer import init_target_model, write_target_init
from finegrained.models.weights import read_metadata, read_tensors, save_weights, weights_metadata


def test_inat_weights_initialise_cub50_rows_by_name(cub50, shared_weights):
    names = read_dataset("cub", cub50).classes["common_name"].to_pylist()
    npz = shared_weights / "mobilenet_v2_1.0_224_inat_birds.npz"
    model, report = init_target_model(
        arch="mobilenet_v2", class_names=names, weights=npz,
        source_names_file=shared_weights / "inat_bird_labels.txt", init_from_source_names=True)
    head = report["head_init"]
    assert head["num_target_classes"] == 50 and head["num_source_classes"] == 965
    assert head["num_matched"] == 42
    source = to_flat(read_tensors(npz), "mobilenet_v2")
    flat = flatten_state(model)
    for pair in head["matched"]:
        t, s = pair["target_index"], pair["source_index"]
        np.testing.assert_array_equal(flat["head/kernel"][:, t], source["head/kernel"][:, s])
        assert flat["head/bias"][t] == source["head/bias"][s]
    black_footed = next(p for p in head["matched"] if p["target_name"] == "Black footed Albatross")
    assert black_footed["source_name"] == "Black-footed Albatross"
    body = [k for k in source if not k.startswith("head/")]
    assert report["load"]["loaded"] == len(body)
    assert all(np.array_equal(flat[k], source[k]) for k in body)


def _pretrained_file(tmp_path, class_names):
    model = build_model("resnet18", len(class_names), width=8, rngs=nnx.Rngs(1))
    path = tmp_path / "source.safetensors"
    save_weights(path, flatten_state(model), metadata=weights_metadata(
        arch="resnet18", num_classes=len(class_names), class_names=class_names))
    return path, flatten_state(model)


def _classes_parquet(tmp_path, names):
    path = tmp_path / "classes.parquet"
    n = len(names)
    pq.write_table(pa.table({
        "label": list(range(n)), "class_id": [10 * i + 7 for i in range(n)], "name": names,
        "common_name": names, "ancestor_ids": [[]] * n, "ancestor_names": [[]] * n,
        "depth": [0] * n}, schema=CLASSES_SCHEMA), path)
    return path


def test_write_target_init_matches_names_from_metadata(tmp_path):
    weights, source = _pretrained_file(tmp_path, ["Sora", "Blue Jay", "Least Tern", "Rock Wren"])
    classes = _classes_parquet(tmp_path, ["Rock wren", "Mallard", "blue-jay"])
    report = write_target_init(classes, tmp_path / "init.safetensors", tmp_path / "report.json",
                               arch="resnet18", width=8, weights=weights,
                               init_from_source_names=True)
    assert report["head_init"]["num_matched"] == 2
    init = read_tensors(tmp_path / "init.safetensors")
    np.testing.assert_array_equal(init["head/kernel"][:, 0], source["head/kernel"][:, 3])
    np.testing.assert_array_equal(init["head/kernel"][:, 2], source["head/kernel"][:, 1])
    assert not np.array_equal(init["head/kernel"][:, 1], source["head/kernel"][:, 0])
    assert np.array_equal(init["stage4/1/conv2/kernel"], source["stage4/1/conv2/kernel"])
    meta = read_metadata(tmp_path / "init.safetensors")
    assert json.loads(meta["class_names"]) == ["Rock wren", "Mallard", "blue-jay"]
    assert json.loads((tmp_path / "report.json").read_text())["head_init"]["num_matched"] == 2


def test_report_records_the_weights_sha256_and_checks_a_download_record(tmp_path):
    weights, _ = _pretrained_file(tmp_path, ["x", "y"])
    classes = _classes_parquet(tmp_path, ["a", "b"])
    report = write_target_init(classes, tmp_path / "init.safetensors", tmp_path / "r.json",
                               arch="resnet18", width=8, weights=weights)
    assert report["weights_sha256"] == sha256_file(weights)
    assert read_metadata(tmp_path / "init.safetensors")["source_sha256"] == sha256_file(weights)
    sha256_record(weights).write_text(f"{'0' * 64}  {weights.name}\n")   # changed since download
    with pytest.raises(WeightsError, match="recorded"):
        write_target_init(classes, tmp_path / "init2.safetensors", tmp_path / "r2.json",
                          arch="resnet18", width=8, weights=weights)
    assert not (tmp_path / "init2.safetensors").exists()


def test_random_init_and_refusals(tmp_path):
    classes = _classes_parquet(tmp_path, ["a", "b"])
    report = write_target_init(classes, tmp_path / "init.safetensors", tmp_path / "r.json",
                               arch="resnet18", width=8)
    assert report["weights"] is None
    assert read_tensors(tmp_path / "init.safetensors")["head/kernel"].shape == (64, 2)
    with pytest.raises(WeightsError, match="needs source weights"):
        init_target_model(arch="resnet18", width=8, class_names=["a"],
                          init_from_source_names=True)
    weights, _ = _pretrained_file(tmp_path, ["x", "y"])
    with pytest.raises(WeightsError, match="wrong shape"):
        init_target_model(arch="resnet18", width=16, class_names=["a"], weights=weights)


def test_self_pretrained_mobilenet_with_batch_norm_loads_back(tmp_path):
    """Pretraining MobileNetV2 from scratch uses batch norm; its weights say so in their
    metadata and the target model is built the same way."""
    from finegrained.models.loading import weight_options

    options = weight_options("mobilenet_v2", None)
    assert options == {"batch_norm": True}
    source = build_model("mobilenet_v2", 3, width=16, rngs=nnx.Rngs(0), **options)
    path = tmp_path / "mnv2.safetensors"
    save_weights(path, flatten_state(source), metadata=weights_metadata(
        arch="mobilenet_v2", num_classes=3, class_names=["a", "b", "c"], **options))
    assert weight_options("mobilenet_v2", path) == {"batch_norm": True}
    model, report = init_target_model(arch="mobilenet_v2", width=16, class_names=["c", "d"],
                                      weights=path, init_from_source_names=True)
    assert report["head_init"]["num_matched"] == 1
    assert any("/bn/" in name for name in flatten_state(model))


@pytest.mark.parametrize("problem", ["garbage classes", "missing names file"])
def test_init_model_script_reports_bad_input_without_traceback(tmp_path, problem):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "init_model.py"
    classes = _classes_parquet(tmp_path, ["a", "b"])
    weights, _ = _pretrained_file(tmp_path, ["x", "y"])
    settings = {"model": {"arch": "resnet18", "width": 8, "stage_depths": None, "options": {}},
                "init_from_source_names": False, "seed": 0}
    args = ["--classes", str(classes), "--weights", str(weights),
            "--out-weights", str(tmp_path / "o.safetensors"), "--out-report", str(tmp_path / "o.json")]
    if problem == "garbage classes":
        classes.write_bytes(b"garbage")
        expected = "classes.parquet: cannot read class table"
    else:
        args += ["--source-class-names", str(tmp_path / "labels.txt")]
        settings["init_from_source_names"] = True
        expected = "labels.txt: class name file not found"
    args += ["--settings", json.dumps(settings)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert expected in done.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_an_empty_weights_path_is_named_as_such():
    from finegrained.models.transfer import weights_sha256
    with pytest.raises(WeightsError, match="empty path .*backbone.weights: none"):
        weights_sha256("")
