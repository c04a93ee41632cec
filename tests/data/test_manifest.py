"""Split manifests: stratified validation, seeded order, all-or-nothing writes, the CLI."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from finegrained.data.manifest import (MANIFEST_SCHEMA, SPLITS, excluded_classes,
                                       prepare_manifests, read_classes, read_manifest,
                                       validation_count, write_manifests)
from finegrained.data.readers import check_image_paths, read_dataset
from finegrained.errors import DataError
from finegrained.fileio import sha256_file
from test_readers import TINY_CUB, TINY_NABIRDS, tiny_cub, tiny_nabirds, with_line

OUTPUT_FILES = {"train.parquet", "val.parquet", "test.parquet", "classes.parquet",
                "taxonomy.parquet", "skipped.json", "report.json"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def read_splits(out_dir: Path) -> dict:
    return {name: read_manifest(out_dir / f"{name}.parquet") for name in SPLITS}


# --------------------------------------------------------------------------- split rule

@pytest.mark.parametrize("n_train, expected", [
    (0, 0), (1, 0),      # a lone image stays in train
    (2, 1), (4, 1),      # at least one validation image once a class can spare one
    (14, 1), (15, 2),    # 1.5 rounds half up
    (30, 3), (120, 12),
])
def test_validation_count(n_train, expected):
    assert validation_count(n_train, 0.1) == expected


def test_validation_count_keeps_one_train_image():
    assert validation_count(3, 0.9) == 2
    assert validation_count(10, 0.0) == 0


# --------------------------------------------------------------------------- tiny datasets

def test_tiny_manifests_columns_and_values(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    summary = write_manifests(read_dataset("nabirds", root), tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUT_FILES
    # Each class has 2 train images: one moves to validation.
    assert summary.pop("hash_seconds") >= 0
    assert summary == {"format": "nabirds", "images": 6, "classes": 2, "train": 2, "val": 2,
                       "test": 2, "skipped": 0, "val_fraction": 0.1, "seed": 0,
                       "photos_hashed": 6, "identical_photos_in_two_splits": 0,
                       "excluded_classes": 0}
    splits = read_splits(tmp_path / "out")
    for name, table in splits.items():
        assert table.schema.equals(MANIFEST_SCHEMA)
        assert set(table.column("split").to_pylist()) == {name}
        assert sorted(table.column("label").to_pylist()) == [0, 1]
    assert sorted(splits["test"].column("image_id").to_pylist()) == ["a-3", "b-3"]
    rows = {r["image_id"]: r for t in splits.values() for r in t.to_pylist()}
    assert rows["a-1"]["class_name"] == "Wood Duck " and rows["a-1"]["class_id"] == 10
    assert rows["a-1"]["label"] == 1 and rows["a-1"]["photographer"] == "Jane  Q. Public"
    assert rows["b-3"]["path"] == "images/0003/b3.jpg"
    assert (rows["a-1"]["bbox_w"], rows["a-1"]["width"]) == (30.0, 100)

    classes = read_classes(tmp_path / "out" / "classes.parquet")
    assert classes.column("name").to_pylist() == ["Blue-winged Teal  (Male)", "Wood Duck "]
    assert classes.column("ancestor_ids").to_pylist() == [[1, 0], [1, 0]]
    taxonomy = pq.read_table(tmp_path / "out" / "taxonomy.parquet")
    assert taxonomy.column("parent_id").to_pylist() == [None, 0, 1, 1, 0]
    assert json.loads((tmp_path / "out" / "skipped.json").read_text()) == []


def test_cub_without_sizes_has_null_geometry_and_empty_taxonomy(tmp_path):
    root = tiny_cub(tmp_path / "data", drop=("bounding_boxes.txt",))
    write_manifests(read_dataset("cub", root), tmp_path / "out", check_files=False)
    train = read_manifest(tmp_path / "out" / "train.parquet")
    assert train.column("width").null_count == train.num_rows
    assert train.column("bbox_x").null_count == train.num_rows
    assert pq.read_table(tmp_path / "out" / "taxonomy.parquet").num_rows == 0


def test_missing_image_error_writes_nothing(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    (root / "images" / "0010" / "a2.jpg").unlink()
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match=r"images.txt:2: image file not found"):
        write_manifests(read_dataset("nabirds", root), out_dir)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_missing_image_skipped_and_listed(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    (root / "images" / "0010" / "a2.jpg").unlink()
    summary = write_manifests(read_dataset("nabirds", root), tmp_path / "out", on_bad_image="skip")
    assert summary["skipped"] == 1 and summary["images"] == 5
    assert json.loads((tmp_path / "out" / "skipped.json").read_text()) == [
        {"image_id": "a-2", "path": "images/0010/a2.jpg", "reason": "image file not found"}]
    ids = [i for t in read_splits(tmp_path / "out").values() for i in t.column("image_id").to_pylist()]
    assert sorted(ids) == ["a-1", "a-3", "b-1", "b-2", "b-3"]


def test_unusable_box_and_missing_file_both_skipped_and_listed(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True,
                        replace=with_line("bounding_boxes.txt", 1, "a-1 1 2 0 40"))
    (root / "images" / "0003" / "b1.jpg").unlink()
    summary = prepare_manifests("nabirds", root, tmp_path / "out", on_bad_image="skip")
    assert summary["skipped"] == 2 and summary["images"] == 4
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [(s["image_id"], s["path"]) for s in skipped] == [("a-1", "images/0010/a1.jpg"),
                                                            ("b-1", "images/0003/b1.jpg")]
    assert skipped[0]["reason"] == ("bounding box has zero or negative area "
                                    "(bounding_boxes.txt line 1: 1 2 0 40)")
    with pytest.raises(DataError, match=r"bounding_boxes.txt:1: bounding box has zero"):
        prepare_manifests("nabirds", root, tmp_path / "out2", on_bad_image="error")


def test_manifest_rows_keep_their_images_txt_line(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    write_manifests(read_dataset("nabirds", root), tmp_path / "out")
    lines = {row["image_id"]: row["images_line"] for table in read_splits(tmp_path / "out").values()
             for row in table.to_pylist()}
    assert lines == {"a-1": 1, "a-2": 2, "a-3": 3, "b-1": 4, "b-2": 5, "b-3": 6}


def test_skipping_every_test_image_is_an_error(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    for name in ("0010/a3.jpg", "0003/b3.jpg"):
        (root / "images" / name).unlink()
    with pytest.raises(DataError, match="no test images left"):
        write_manifests(read_dataset("nabirds", root), tmp_path / "out", on_bad_image="skip")
    assert list((tmp_path / "out").glob("*")) == []


def test_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    # The fourth parquet write fails after three have been written to temporary names.
    dataset = read_dataset("nabirds", tiny_nabirds(tmp_path / "data"))
    real_write = pq.write_table
    calls = []

    def failing_write(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 4:
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", failing_write)
    out_dir = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        write_manifests(dataset, out_dir, check_files=False)
    assert len(calls) == 4
    assert list(out_dir.iterdir()) == []       # neither final names nor temporaries


# --------------------------------------------------------------------------- leakage

@pytest.mark.parametrize("fmt, first, second", [
    ("nabirds", "a-1 0010/a1.jpg", "a-3 0010/a1.jpg"),          # train and test
    ("nabirds", "a-1 0010/a1.jpg", "a-2 0010/./a1.jpg"),        # both train, spelt apart
    ("nabirds", "a-1 0010/a1.jpg", "a-3 0010//a1.jpg"),
    ("cub", "1 007.Parakeet_Auklet/p1.jpg", "2 007.Parakeet_Auklet/p1.jpg"),
])
def test_one_file_under_two_ids_is_an_error_naming_both(tmp_path, fmt, first, second):
    """It used to go into both manifests: a test photo trained on."""
    files = TINY_CUB if fmt == "cub" else TINY_NABIRDS
    lines = [line for line in files["images.txt"]
             if line.split()[0] != second.split()[0]]
    where = [line.split()[0] for line in files["images.txt"]].index(second.split()[0])
    lines.insert(where, second)
    root = (tiny_cub if fmt == "cub" else tiny_nabirds)(tmp_path / "data",
                                                        replace={"images.txt": lines})
    with pytest.raises(DataError) as caught:
        read_dataset(fmt, root)
    first_id, second_id = first.split()[0], second.split()[0]
    assert caught.value.line == where + 1 and caught.value.value == second.split()[1]
    assert (f"images.txt:{where + 1}: image {second_id!r} names the file of image {first_id!r} "
            f"(line 1)") in str(caught.value)
    with pytest.raises(DataError, match="names the file of image"):
        check_image_paths(fmt, root)        # so a dry run refuses it too


def _copy_photo(root: Path, source: str, target: str) -> None:
    (root / "images" / target).write_bytes((root / "images" / source).read_bytes())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_photos_in_train_and_test_are_an_error_naming_both(tmp_path, seed):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    _copy_photo(root, "0003/b3.jpg", "0003/b2.jpg")        # b-2 (train or val) = b-3 (test)
    with pytest.raises(DataError) as caught:
        prepare_manifests("nabirds", root, tmp_path / "out", seed=seed)
    text = str(caught.value)
    assert caught.value.line == 6 and caught.value.value == "images/0003/b3.jpg"
    assert "image 'b-3' (test, images/0003/b3.jpg) has the same bytes as image 'b-2' on line 5" \
        in text and "dataset.duplicate_photos: allow" in text
    if seed == 0:                                   # the carve-out put b-2 in validation
        assert "line 5 (val, images/0003/b2.jpg)" in text
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_identical_photos_allowed_are_counted_in_the_report(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    _copy_photo(root, "0003/b3.jpg", "0003/b2.jpg")
    summary = prepare_manifests("nabirds", root, tmp_path / "out", duplicate_photos="allow")
    assert summary["identical_photos_in_two_splits"] == 2 and summary["photos_hashed"] == 6
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    splits = {row["image_id"]: name for name, table in read_splits(tmp_path / "out").items()
              for row in table.to_pylist()}
    assert report["identical_photos"] == {"copies": 2, "in_two_splits": 2, "across_splits": [[
        {"image_id": "b-2", "path": "images/0003/b2.jpg", "split": splits["b-2"],
         "images_line": 5},
        {"image_id": "b-3", "path": "images/0003/b3.jpg", "split": "test", "images_line": 6}]]}


@pytest.mark.parametrize("seed", range(4))
def test_copies_within_train_stay_out_of_validation(tmp_path, seed):
    """Two copies in the official train split: the validation carve-out used to be free to
    put one in train and one in validation, which would then be no measure of anything."""
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    _copy_photo(root, "0003/b1.jpg", "0003/b2.jpg")
    summary = prepare_manifests("nabirds", root, tmp_path / "out", seed=seed)
    train = read_manifest(tmp_path / "out" / "train.parquet").column("image_id").to_pylist()
    assert {"b-1", "b-2"} <= set(train) and summary["identical_photos_in_two_splits"] == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["identical_photos"] == {"copies": 2, "in_two_splits": 0, "across_splits": []}


TEST_ONLY = {"train_test_split.txt": ["a-1 1", "a-2 1", "a-3 0", "b-1 0", "b-2 0", "b-3 0"]}


def test_a_class_with_no_training_photo_is_an_error(tmp_path):
    """It used to be evaluated: each of its test photos a certain error."""
    root = tiny_nabirds(tmp_path / "data", image_files=True, replace=TEST_ONLY)
    with pytest.raises(DataError) as caught:
        prepare_manifests("nabirds", root, tmp_path / "out")
    assert str(caught.value).startswith(
        f"{root / 'images.txt'}:4: class 3 ('Blue-winged Teal  (Male)') has 3 test and 0 "
        f"validation photos but no training photo")
    assert "dataset.test_only_classes: exclude" in str(caught.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_class_whose_training_photos_were_skipped_is_an_error(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    for name in ("0003/b1.jpg", "0003/b2.jpg"):
        (root / "images" / name).unlink()
    with pytest.raises(DataError, match="class 3 .* has 1 test and 0 validation photos"):
        prepare_manifests("nabirds", root, tmp_path / "out", on_bad_image="skip")


def test_a_class_with_no_training_photo_excluded_is_reported_everywhere(tmp_path):
    root = tiny_nabirds(tmp_path / "data", image_files=True, replace=TEST_ONLY)
    summary = prepare_manifests("nabirds", root, tmp_path / "out", test_only_classes="exclude")
    assert summary["excluded_classes"] == 1 and summary["classes"] == 1
    splits = read_splits(tmp_path / "out")
    assert sorted(i for t in splits.values() for i in t.column("image_id").to_pylist()) == [
        "a-1", "a-2", "a-3"]
    assert {label for t in splits.values() for label in t.column("label").to_pylist()} == {0}
    classes = read_classes(tmp_path / "out" / "classes.parquet")
    assert classes.column("name").to_pylist() == ["Wood Duck "]
    expected = [{"class_id": 3, "name": "Blue-winged Teal  (Male)", "val": 0, "test": 3}]
    assert excluded_classes(classes) == expected
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["excluded_classes"] == expected


# --------------------------------------------------------------------------- command line

def run_script(root, out_dir, file_size_limit=None, **settings) -> subprocess.CompletedProcess:
    settings = {"format": "cub", "val_fraction": 0.1, "split_seed": 0, "on_bad_image": "error",
                "check_files": True, "follow_symlinks": False, "duplicate_photos": "error",
                "test_only_classes": "error", **settings}
    limit = (None if file_size_limit is None else
             lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit,) * 2))
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "prepare_manifests.py"),
                           "--settings", json.dumps(settings), "--root", str(root),
                           "--out-dir", str(out_dir)], capture_output=True, text=True, timeout=60,
                          preexec_fn=limit, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


def test_script_writes_manifests_and_prints_summary(tmp_path):
    root = tiny_cub(tmp_path / "data", image_files=True)
    result = run_script(root, tmp_path / "out", val_fraction=0.5, split_seed=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cub: 4 images, 2 classes, train 2 / val 0 / test 2")
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUT_FILES


def test_script_past_the_file_size_limit_ends_in_one_line(tmp_path):
    """``ulimit -f`` stands in for a full disk (see test_shards): an OSError traceback before."""
    root = tiny_cub(tmp_path / "data", image_files=True)
    result = run_script(root, tmp_path / "out", file_size_limit=1024)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'out'}/")
    assert "(File too large): it needs " in result.stderr and " are free on" in result.stderr
    assert result.stderr.count("\n") == 1 and list((tmp_path / "out").iterdir()) == []


def test_script_reports_bad_input_without_traceback(tmp_path):
    root = tiny_cub(tmp_path / "data", replace=with_line("train_test_split.txt", 2, "2 7", TINY_CUB))
    result = run_script(root, tmp_path / "out", check_files=False)
    assert result.returncode == 1
    assert "train_test_split.txt:2: split flag must be 1 (train) or 0 (test) (value: 7)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def nabirds_manifests(nabirds_annotations, tmp_path_factory):
    """Manifests of the real annotations with seed 0 (twice) and seed 1."""
    dataset = read_dataset("nabirds", nabirds_annotations)
    out = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        out_dir = tmp_path_factory.mktemp(f"nabirds_{name}")
        out[name] = (out_dir, write_manifests(dataset, out_dir, seed=seed, check_files=False))
    return out


def test_nabirds_validation_is_stratified(nabirds_manifests):
    out_dir, summary = nabirds_manifests["a"]
    splits = read_splits(out_dir)
    assert summary["train"] + summary["val"] == 23_929 and summary["test"] == 24_633
    assert summary["images"] == 48_562 and summary["classes"] == 555
    # No file under two ids (read_dataset would refuse it), no class without a train photo.
    assert summary["excluded_classes"] == 0
    # Rounding per class (with at least one per class) lands close to 10 %.
    assert abs(summary["val"] - 0.1 * 23_929) < 0.03 * 23_929
    train = Counter(splits["train"].column("label").to_pylist())
    val = Counter(splits["val"].column("label").to_pylist())
    for label in range(555):
        n = train[label] + val[label]
        assert n >= 2 and train[label] >= 1 and val[label] >= 1, label
        assert val[label] == validation_count(n, 0.1)
    ids = [set(t.column("image_id").to_pylist()) for t in splits.values()]
    assert sum(map(len, ids)) == len(set.union(*ids)) == 48_562


def test_nabirds_rows_are_class_mixed(nabirds_manifests):
    train = read_manifest(nabirds_manifests["a"][0] / "train.parquet")
    # A contiguous range of 200 rows (a shard) spans many classes, not one class folder.
    assert len(set(train.column("label").to_pylist()[:200])) > 100


def test_nabirds_manifests_are_deterministic(nabirds_manifests):
    (first, _), (again, _), (other, _) = (nabirds_manifests[k] for k in "abc")
    for name in OUTPUT_FILES:
        assert sha256_file(first / name) == sha256_file(again / name), name
    for name in SPLITS:
        assert not read_manifest(first / f"{name}.parquet").equals(read_manifest(other / f"{name}.parquet"))
    val_ids = [set(read_manifest(d / "val.parquet").column("image_id").to_pylist()) for d in (first, other)]
    assert val_ids[0] != val_ids[1]
    assert sha256_file(first / "classes.parquet") == sha256_file(other / "classes.parquet")


def test_cub50_manifests(cub50, tmp_path):
    summary = write_manifests(read_dataset("cub", cub50), tmp_path)
    print(f"\nhashed the {summary['photos_hashed']} cub50 photos in "
          f"{summary.pop('hash_seconds'):.2f} s")
    assert summary == {"format": "cub", "images": 2_952, "classes": 50, "train": 1_350,
                       "val": 150, "test": 1_452, "skipped": 0, "val_fraction": 0.1, "seed": 0,
                       "photos_hashed": 2_952, "identical_photos_in_two_splits": 0,
                       "excluded_classes": 0}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["identical_photos"] == {"copies": 0, "in_two_splits": 0, "across_splits": []}
    val = read_manifest(tmp_path / "val.parquet")
    assert Counter(val.column("label").to_pylist()) == {label: 3 for label in range(50)}
    test = read_manifest(tmp_path / "test.parquet")
    assert test.column("bbox_w").to_pylist() == [227.0] * 1_452
    classes = read_classes(tmp_path / "classes.parquet")
    assert classes.column("common_name")[1].as_py() == "Parakeet Auklet"
    assert np.array_equal(np.unique(test.column("label").to_numpy()), np.arange(50))


def test_read_classes_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "classes.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="classes.parquet: cannot read class table"):
        read_classes(bad)
    with pytest.raises(DataError, match="absent.parquet: cannot read class table"):
        read_classes(tmp_path / "absent.parquet")
