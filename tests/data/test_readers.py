"""Dataset readers: the real NABirds annotations and cub50 photos, and every kind of bad input
on tiny hand-written folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from finegrained.data.readers import check_image_files, image_file, read_dataset
from finegrained.errors import DataError

# --------------------------------------------------------------------------- tiny datasets

# Two leaf classes whose ids (10, 3) are out of order, a class name with a double space and
# one with a trailing space, a taxonomy node (1) and an unused species (11).
TINY_NABIRDS = {
    "images.txt": ["a-1 0010/a1.jpg", "a-2 0010/a2.jpg", "a-3 0010/a3.jpg",
                   "b-1 0003/b1.jpg", "b-2 0003/b2.jpg", "b-3 0003/b3.jpg"],
    "image_class_labels.txt": ["a-1 10", "a-2 10", "a-3 10", "b-1 3", "b-2 3", "b-3 3"],
    "train_test_split.txt": ["a-1 1", "a-2 1", "a-3 0", "b-1 1", "b-2 1", "b-3 0"],
    "bounding_boxes.txt": ["a-1 1 2 30 40", "a-2 0 0 100 80", "a-3 10 10 20 20",
                           "b-1 5 5 50 50", "b-2 0 0 10 10", "b-3 3 4 5 6"],
    "sizes.txt": ["a-1 100 80", "a-2 100 80", "a-3 100 80",
                  "b-1 64 64", "b-2 64 64", "b-3 64 64"],
    "classes.txt": ["0 Birds", "1 Ducks, Geese, and Swans", "3 Blue-winged Teal  (Male)",
                    "10 Wood Duck ", "11 Unused species"],
    "hierarchy.txt": ["1 0", "3 1", "10 1", "11 0"],
    "photographers.txt": ["a-1 Jane  Q. Public", "b-2 John Doe"],
}

TINY_CUB = {
    "images.txt": ["1 007.Parakeet_Auklet/p1.jpg", "2 007.Parakeet_Auklet/p2.jpg",
                   "3 001.Black_footed_Albatross/b1.jpg", "4 001.Black_footed_Albatross/b2.jpg"],
    "image_class_labels.txt": ["1 7", "2 7", "3 1", "4 1"],
    "train_test_split.txt": ["1 1", "2 0", "3 1", "4 0"],
    "bounding_boxes.txt": ["1 1.5 2.0 30.25 40.0", "2 0.0 0.0 10.0 10.0",
                           "3 3.0 4.0 5.0 6.0", "4 7.0 8.0 9.0 10.5"],
    "classes.txt": ["1 001.Black_footed_Albatross", "7 007.Parakeet_Auklet"],
}


def write_tiny_dataset(root: Path, files: dict[str, list[str]], *, replace: dict | None = None,
                       drop: tuple[str, ...] = (), image_files: bool = False) -> Path:
    """Write ``files`` (name -> lines) under ``root``; ``replace`` swaps a file's lines.

    ``image_files`` also creates a file for every image listed in images.txt, holding its
    name (distinct bytes: identical ones would be copies of one photo).
    """
    root.mkdir(parents=True, exist_ok=True)
    contents = {**files, **(replace or {})}
    for name, lines in contents.items():
        if name not in drop:
            (root / name).write_text("".join(line + "\n" for line in lines))
    if image_files:
        for line in contents["images.txt"]:
            path = root / "images" / line.split(" ", 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(line)
    return root


def tiny_nabirds(root: Path, **kwargs) -> Path:
    return write_tiny_dataset(root, TINY_NABIRDS, **kwargs)


def tiny_cub(root: Path, **kwargs) -> Path:
    return write_tiny_dataset(root, TINY_CUB, **kwargs)


def with_line(name: str, line_no: int, text: str | None, files=TINY_NABIRDS) -> dict:
    """``files[name]`` with 1-based line ``line_no`` replaced (``None`` deletes it; one past
    the end appends)."""
    lines = list(files[name])
    if line_no == len(lines) + 1:
        lines.append(text)
    elif text is None:
        del lines[line_no - 1]
    else:
        lines[line_no - 1] = text
    return {name: lines}


def assert_names(error: DataError, file_name: str, line: int | None, value) -> None:
    text = str(error)
    assert Path(error.path).name == file_name, text
    where = f"{file_name}:{line}:" if line is not None else f"{file_name}:"
    assert where in text, text
    assert error.line == line, text
    if value is not None:
        assert repr(value) in text, text
        assert error.value == value, text


# --------------------------------------------------------------------------- tiny: good input

def test_tiny_nabirds_parses_exactly(tmp_path):
    dataset = read_dataset("nabirds", tiny_nabirds(tmp_path))
    classes = dataset.classes.to_pylist()
    # Leaf labels in numeric class-id order: 3 -> 0, 10 -> 1; 11 labels no image.
    assert [c["class_id"] for c in classes] == [3, 10]
    assert [c["label"] for c in classes] == [0, 1]
    assert classes[0]["name"] == "Blue-winged Teal  (Male)"
    assert classes[1]["name"] == "Wood Duck "              # trailing space kept
    assert classes[1]["common_name"] == "Wood Duck "
    assert classes[0]["ancestor_ids"] == [1, 0]
    assert classes[0]["ancestor_names"] == ["Ducks, Geese, and Swans", "Birds"]
    assert classes[0]["depth"] == 2
    assert dataset.taxonomy.to_pydict() == {
        "class_id": [0, 1, 3, 10, 11],
        "name": ["Birds", "Ducks, Geese, and Swans", "Blue-winged Teal  (Male)", "Wood Duck ",
                 "Unused species"],
        "parent_id": [None, 0, 1, 1, 0]}

    images = dataset.images.to_pylist()
    assert [r["image_id"] for r in images] == ["a-1", "a-2", "a-3", "b-1", "b-2", "b-3"]
    first = images[0]
    assert first["path"] == "images/0010/a1.jpg"
    assert (first["class_id"], first["label"], first["is_train"]) == (10, 1, True)
    assert (first["bbox_x"], first["bbox_y"], first["bbox_w"], first["bbox_h"]) == (1, 2, 30, 40)
    assert (first["width"], first["height"]) == (100, 80)
    assert first["photographer"] == "Jane  Q. Public"
    assert images[1]["photographer"] is None
    assert [r["is_train"] for r in images] == [True, True, False, True, True, False]


def test_partial_overlap_box_is_valid(tmp_path):
    # Real NABirds boxes run past the border (by up to 21.6 % of the side); they are clamped
    # at crop time, not rejected.
    root = tiny_nabirds(tmp_path, replace=with_line("bounding_boxes.txt", 3, "a-3 -10 -5 125 50"))
    row = read_dataset("nabirds", root).images.to_pylist()[2]
    assert (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]) == (-10, -5, 125, 50)


def test_parts_folder_and_blank_trailing_line_are_ignored(tmp_path):
    root = tiny_nabirds(tmp_path)
    (root / "parts").mkdir()
    (root / "parts" / "part_locs.txt").write_text("garbage that is never read\n")
    with open(root / "images.txt", "a") as f:
        f.write("\n")
    assert read_dataset("nabirds", root).images.num_rows == 6


def test_tiny_cub_float_boxes_and_common_names(tmp_path):
    dataset = read_dataset("cub", tiny_cub(tmp_path))
    classes = dataset.classes.to_pylist()
    assert [(c["label"], c["class_id"], c["name"], c["common_name"]) for c in classes] == [
        (0, 1, "001.Black_footed_Albatross", "Black footed Albatross"),
        (1, 7, "007.Parakeet_Auklet", "Parakeet Auklet")]
    assert all(c["ancestor_ids"] == [] and c["depth"] == 0 for c in classes)
    assert dataset.taxonomy.num_rows == 0
    first = dataset.images.to_pylist()[0]
    assert (first["bbox_x"], first["bbox_y"], first["bbox_w"], first["bbox_h"]) == (1.5, 2.0, 30.25, 40.0)
    assert first["width"] is None and first["label"] == 1


def test_cub_without_boxes_or_sizes_has_null_geometry(tmp_path):
    # Neither boxes nor sizes: the crop is the whole image, whose size the crop stage reads.
    dataset = read_dataset("cub", tiny_cub(tmp_path, drop=("bounding_boxes.txt",)))
    for column in ("bbox_x", "bbox_w", "width", "height"):
        assert dataset.images.column(column).null_count == 4


def test_cub_without_boxes_uses_whole_image_when_sizes_known(tmp_path):
    sizes = {"sizes.txt": ["1 120 90", "2 120 90", "3 50 60", "4 50 60"]}
    dataset = read_dataset("cub", tiny_cub(tmp_path, replace=sizes, drop=("bounding_boxes.txt",)))
    row = dataset.images.to_pylist()[2]
    assert (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]) == (0, 0, 50, 60)
    assert (row["width"], row["height"]) == (50, 60)


# --------------------------------------------------------------------------- tiny: bad input

BAD_NABIRDS = [
    # (id, replacement, file named, line named, value named)
    ("wrong field count", with_line("images.txt", 2, "a-2"), "images.txt", 2, "a-2"),
    ("too many fields", with_line("sizes.txt", 4, "b-1 64 64 3"), "sizes.txt", 4, "b-1 64 64 3"),
    ("non-numeric label", with_line("image_class_labels.txt", 2, "a-2 ten"),
     "image_class_labels.txt", 2, "ten"),
    ("float box in NABirds", with_line("bounding_boxes.txt", 5, "b-2 0 0 10.5 10"),
     "bounding_boxes.txt", 5, "10.5"),
    ("zero size", with_line("sizes.txt", 3, "a-3 0 80"), "sizes.txt", 3, "0"),
    ("duplicate image id", with_line("train_test_split.txt", 7, "a-1 0"),
     "train_test_split.txt", 7, "a-1"),
    ("duplicate class id", with_line("classes.txt", 6, "3 Another teal", TINY_NABIRDS),
     "classes.txt", 6, "3"),
    ("unknown class id", with_line("image_class_labels.txt", 6, "b-3 99"),
     "image_class_labels.txt", 6, 99),
    ("image without label", with_line("image_class_labels.txt", 6, None), "images.txt", 6, "b-3"),
    ("image without split", with_line("train_test_split.txt", 1, None), "images.txt", 1, "a-1"),
    ("image without box", with_line("bounding_boxes.txt", 2, None), "images.txt", 2, "a-2"),
    ("label for unknown image", with_line("image_class_labels.txt", 7, "z-9 3"),
     "image_class_labels.txt", 7, "z-9"),
    ("photographer for unknown image", with_line("photographers.txt", 2, "z-9 John Doe"),
     "photographers.txt", 2, "z-9"),
    ("split flag 2", with_line("train_test_split.txt", 3, "a-3 2"), "train_test_split.txt", 3, 2),
    ("zero-width box", with_line("bounding_boxes.txt", 2, "a-2 5 5 0 10"),
     "bounding_boxes.txt", 2, "5 5 0 10"),
    ("negative-height box", with_line("bounding_boxes.txt", 2, "a-2 5 5 10 -3"),
     "bounding_boxes.txt", 2, "5 5 10 -3"),
    ("box right of image", with_line("bounding_boxes.txt", 3, "a-3 100 10 20 20"),
     "bounding_boxes.txt", 3, "100 10 20 20"),
    ("box above image", with_line("bounding_boxes.txt", 4, "b-1 5 -50 10 50"),
     "bounding_boxes.txt", 4, "5 -50 10 50"),
    ("unknown parent", with_line("hierarchy.txt", 4, "11 77"), "hierarchy.txt", 4, 77),
    ("unknown child", with_line("hierarchy.txt", 5, "12 0"), "hierarchy.txt", 5, 12),
    ("hierarchy cycle", with_line("hierarchy.txt", 1, "1 10"), "hierarchy.txt", 3, "1 -> 10 -> 1"),
    ("width beyond int32", with_line("sizes.txt", 1, "a-1 99999999999 80"), "sizes.txt", 1,
     "99999999999"),
    ("class id beyond int64", with_line("image_class_labels.txt", 1, "a-1 99999999999999999999"),
     "image_class_labels.txt", 1, "99999999999999999999"),
    ("box far outside the photo", with_line("bounding_boxes.txt", 1, "a-1 1 1 99999 99999"),
     "bounding_boxes.txt", 1, "1 1 99999 99999"),
    ("path leaving the root", with_line("images.txt", 2, "a-2 ../../outside/x.jpg"),
     "images.txt", 2, "../../outside/x.jpg"),
]


@pytest.mark.parametrize("replacement, file_name, line, value",
                         [case[1:] for case in BAD_NABIRDS], ids=[case[0] for case in BAD_NABIRDS])
def test_bad_nabirds_input_names_file_line_and_value(tmp_path, replacement, file_name, line, value):
    root = tiny_nabirds(tmp_path, replace=replacement)
    with pytest.raises(DataError) as caught:
        read_dataset("nabirds", root)
    assert_names(caught.value, file_name, line, value)


def test_non_utf8_line_is_named(tmp_path):
    root = tiny_nabirds(tmp_path)
    with open(root / "classes.txt", "ab") as f:
        f.write(b"12 Caf\xe9 bird\n")
    with pytest.raises(DataError, match="not UTF-8") as caught:
        read_dataset("nabirds", root)
    assert_names(caught.value, "classes.txt", 6, b"\xe9")


def _tables(dataset) -> tuple:
    return dataset.images, dataset.classes, dataset.taxonomy


TINY = {"nabirds": TINY_NABIRDS, "cub": TINY_CUB}


@pytest.mark.parametrize("fmt, name", [(fmt, name) for fmt, files in TINY.items()
                                       for name in files])
def test_a_utf8_byte_order_mark_at_the_start_of_a_file_is_dropped(tmp_path, fmt, name):
    """Windows editors start a file with a BOM; it used to make images.txt's first id
    '\ufeffa-1', blamed on image_class_labels.txt, which lists 'a-1'."""
    files = TINY[fmt]
    root = write_tiny_dataset(tmp_path / "bom", files)
    path = root / name
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    clean = read_dataset(fmt, write_tiny_dataset(tmp_path / "clean", files))
    for got, expected in zip(_tables(read_dataset(fmt, root)), _tables(clean)):
        assert got.equals(expected)


@pytest.mark.parametrize("fmt", TINY)
def test_a_byte_order_mark_inside_a_file_is_named_where_it_is(tmp_path, fmt):
    root = write_tiny_dataset(tmp_path, TINY[fmt])
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    lines[2] = "\ufeff" + lines[2]
    (root / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="byte-order mark") as caught:
        read_dataset(fmt, root)
    assert_names(caught.value, "image_class_labels.txt", 3, lines[2])


def test_a_utf16_file_is_named(tmp_path):
    root = tiny_nabirds(tmp_path)
    (root / "images.txt").write_bytes((root / "images.txt").read_text().encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16") as caught:
        read_dataset("nabirds", root)
    assert_names(caught.value, "images.txt", 1, None)


@pytest.mark.parametrize("name, line", [
    ("images.txt", "a-2 0010/" + "x" * 10_000_000 + ".jpg"),        # a path: file not found
    ("image_class_labels.txt", "a-2 " + "9" * 10_000_000),          # a value: not an int64
    ("bounding_boxes.txt", "a-2 " + "0 " * 5_000_000),              # a line: too many fields
])
def test_a_10_mb_line_gives_a_short_message(tmp_path, name, line):
    root = tiny_nabirds(tmp_path, image_files=True)
    tiny_nabirds(tmp_path, replace=with_line(name, 2, line))
    with pytest.raises(DataError) as caught:
        check_image_files(read_dataset("nabirds", root))
    text = str(caught.value)
    assert len(text) < 3_000, len(text)
    assert f"{name}:2: " in text and "more characters]" in text


def test_image_without_label_names_the_labels_file(tmp_path):
    root = tiny_nabirds(tmp_path, replace=with_line("image_class_labels.txt", 6, None))
    with pytest.raises(DataError, match="image_class_labels.txt"):
        read_dataset("nabirds", root)


@pytest.mark.parametrize("flag, empty", [("1", "test"), ("0", "train")])
def test_empty_split_is_an_error(tmp_path, flag, empty):
    split = {"train_test_split.txt": [f"{line.split()[0]} {flag}"
                                      for line in TINY_NABIRDS["train_test_split.txt"]]}
    with pytest.raises(DataError, match=f"the {empty} split is empty") as caught:
        read_dataset("nabirds", tiny_nabirds(tmp_path, replace=split))
    assert_names(caught.value, "train_test_split.txt", None, None)


@pytest.mark.parametrize("missing", ["hierarchy.txt", "bounding_boxes.txt", "classes.txt"])
def test_missing_required_nabirds_file(tmp_path, missing):
    with pytest.raises(DataError, match="required nabirds annotation file is missing") as caught:
        read_dataset("nabirds", tiny_nabirds(tmp_path, drop=(missing,)))
    assert Path(caught.value.path).name == missing


BAD_CUB = [
    ("non-integer image id", with_line("images.txt", 2, "x2 007.Parakeet_Auklet/p2.jpg", TINY_CUB),
     "images.txt", 2, "x2"),
    ("non-numeric box", with_line("bounding_boxes.txt", 3, "3 3.0 abc 5.0 6.0", TINY_CUB),
     "bounding_boxes.txt", 3, "abc"),
    ("nan box", with_line("bounding_boxes.txt", 1, "1 nan 2.0 3.0 4.0", TINY_CUB),
     "bounding_boxes.txt", 1, "nan"),
    ("zero-area float box", with_line("bounding_boxes.txt", 4, "4 7.0 8.0 0.0 10.5", TINY_CUB),
     "bounding_boxes.txt", 4, "7.0 8.0 0.0 10.5"),
    ("class id not numeric", with_line("classes.txt", 2, "seven 007.Parakeet_Auklet", TINY_CUB),
     "classes.txt", 2, "seven"),
]


@pytest.mark.parametrize("replacement, file_name, line, value",
                         [case[1:] for case in BAD_CUB], ids=[case[0] for case in BAD_CUB])
def test_bad_cub_input_names_file_line_and_value(tmp_path, replacement, file_name, line, value):
    with pytest.raises(DataError) as caught:
        read_dataset("cub", tiny_cub(tmp_path, replace=replacement))
    assert_names(caught.value, file_name, line, value)


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_dataset("imagenet", tmp_path)


# --------------------------------------------------------------------------- image files

def test_missing_image_file_errors_with_images_line(tmp_path):
    root = tiny_nabirds(tmp_path, image_files=True)
    (root / "images" / "0003" / "b2.jpg").unlink()
    dataset = read_dataset("nabirds", root)
    with pytest.raises(DataError, match="image file not found") as caught:
        check_image_files(dataset)
    assert_names(caught.value, "images.txt", 5, "images/0003/b2.jpg")


def test_missing_image_file_skipped_and_reported(tmp_path):
    root = tiny_nabirds(tmp_path, image_files=True)
    (root / "images" / "0003" / "b2.jpg").unlink()
    checked, skipped = check_image_files(read_dataset("nabirds", root), on_bad_image="skip")
    assert skipped == [{"image_id": "b-2", "path": "images/0003/b2.jpg",
                        "reason": "image file not found"}]
    assert checked.images.column("image_id").to_pylist() == ["a-1", "a-2", "a-3", "b-1", "b-3"]


def test_missing_image_folder_and_explicit_root(tmp_path):
    dataset = read_dataset("nabirds", tiny_nabirds(tmp_path / "annotations"))
    elsewhere = tiny_nabirds(tmp_path / "photos", image_files=True)
    assert check_image_files(dataset, elsewhere)[1] == []
    _, skipped = check_image_files(dataset, on_bad_image="skip")   # no images/ folder at all
    assert len(skipped) == 6


# --------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def nabirds(nabirds_annotations):
    start = time.perf_counter()
    dataset = read_dataset("nabirds", nabirds_annotations)
    print(f"\nparsed NABirds annotations ({dataset.images.num_rows} images) "
          f"in {time.perf_counter() - start:.2f} s")
    return dataset


def test_nabirds_counts_and_split(nabirds):
    images = nabirds.images
    assert images.num_rows == 48_562
    assert nabirds.num_classes == 555
    assert nabirds.taxonomy.num_rows == 1_011
    assert pc.sum(images.column("is_train")).as_py() == 23_929
    assert images.num_rows - pc.sum(images.column("is_train")).as_py() == 24_633
    assert len(set(images.column("image_id").to_pylist())) == 48_562


def test_nabirds_labels_follow_sorted_class_ids(nabirds):
    labels = nabirds.images.column("label").to_numpy()
    assert np.array_equal(np.unique(labels), np.arange(555))
    class_ids = nabirds.classes.column("class_id").to_numpy()
    assert np.all(np.diff(class_ids) > 0)
    assert np.array_equal(nabirds.classes.column("label").to_numpy(), np.arange(555))
    # Every image's label points back at its own class id.
    assert np.array_equal(class_ids[labels], nabirds.images.column("class_id").to_numpy())


def test_nabirds_class_name_with_double_space_kept(nabirds, nabirds_annotations):
    raw = next(line.rstrip("\n").split(" ", 1)[1]
               for line in open(nabirds_annotations / "classes.txt", encoding="utf-8")
               if line.startswith("318 "))
    assert raw == "Blue-winged Teal  (Male)"
    row = next(c for c in nabirds.classes.to_pylist() if c["class_id"] == 318)
    assert row["name"] == raw and row["common_name"] == raw
    assert row["ancestor_names"] == ["Blue-winged Teal", "Ducks, Geese, and Swans", "Birds"]


def test_nabirds_ancestor_chains_end_at_birds(nabirds):
    classes = nabirds.classes.to_pylist()
    assert all(c["ancestor_ids"][-1] == 0 and c["ancestor_names"][-1] == "Birds" for c in classes)
    assert all(c["depth"] == len(c["ancestor_ids"]) for c in classes)
    depths = [c["depth"] for c in classes]
    # Measured: 290 leaves sit at depth 3 (species -> order -> Birds), 265 at depth 4
    # (a plumage under its species).
    assert (min(depths), max(depths)) == (3, 4)
    assert depths.count(3) == 290 and depths.count(4) == 265
    parents = dict(zip(nabirds.taxonomy.column("class_id").to_pylist(),
                       nabirds.taxonomy.column("parent_id").to_pylist()))
    assert parents[0] is None and sum(p is None for p in parents.values()) == 1


def test_nabirds_boxes_past_border_are_kept(nabirds):
    columns = {name: nabirds.images.column(name).to_numpy().astype(float)
               for name in ("bbox_x", "bbox_y", "bbox_w", "bbox_h", "width", "height")}
    past_border = ((columns["bbox_x"] < 0) | (columns["bbox_y"] < 0)
                   | (columns["bbox_x"] + columns["bbox_w"] > columns["width"])
                   | (columns["bbox_y"] + columns["bbox_h"] > columns["height"]))
    assert past_border.sum() == 201
    assert np.all(columns["bbox_w"] > 0) and np.all(columns["bbox_h"] > 0)


def test_cub50_reads_and_all_photos_exist(cub50):
    dataset = read_dataset("cub", cub50)
    images = dataset.images
    assert images.num_rows == 2_952
    assert dataset.num_classes == 50
    class_ids = dataset.classes.column("class_id").to_pylist()
    assert class_ids[:3] == [1, 7, 12] and class_ids == sorted(class_ids)
    assert class_ids != list(range(1, 51))          # non-contiguous ids were remapped
    assert np.array_equal(np.unique(images.column("label").to_numpy()), np.arange(50))
    assert dataset.classes.column("common_name")[0].as_py() == "Black footed Albatross"
    assert pc.sum(images.column("is_train")).as_py() == 1_500
    for column, expected in [("bbox_x", 0), ("bbox_y", 0), ("bbox_w", 227), ("bbox_h", 227),
                             ("width", 227), ("height", 227)]:
        assert pc.all(pc.equal(images.column(column), expected)).as_py(), column
    checked, skipped = check_image_files(dataset)
    assert skipped == [] and checked.images.num_rows == 2_952


# --------------------------------------------------------------------------- on_bad_image


@pytest.mark.parametrize("line, reason", [("a-2 5 5 0 10", "zero or negative area"),
                                          ("a-2 100 10 20 20", "does not overlap"),
                                          ("a-2 1 1 99999 99999", "by more than 25%")])
def test_unusable_box_is_skipped_with_its_reason(tmp_path, line, reason):
    root = tiny_nabirds(tmp_path, replace=with_line("bounding_boxes.txt", 2, line))
    dataset = read_dataset("nabirds", root, on_bad_image="skip")
    assert dataset.images.column("image_id").to_pylist() == ["a-1", "a-3", "b-1", "b-2", "b-3"]
    [skipped] = dataset.skipped
    assert skipped["image_id"] == "a-2" and skipped["path"] == "images/0010/a2.jpg"
    assert reason in skipped["reason"] and "bounding_boxes.txt line 2" in skipped["reason"]
    assert line.split(" ", 1)[1] in skipped["reason"]
    with pytest.raises(DataError, match=reason):
        read_dataset("nabirds", root)                 # 'error' (the default) still stops


def test_dataset_level_faults_stay_fatal_with_skip(tmp_path):
    root = tiny_nabirds(tmp_path, replace=with_line("image_class_labels.txt", 6, "b-3 99"))
    with pytest.raises(DataError, match="class id is not in classes.txt"):
        read_dataset("nabirds", root, on_bad_image="skip")
    root = tiny_nabirds(tmp_path / "climb", replace=with_line("images.txt", 1, "a-1 ../../x.jpg"))
    with pytest.raises(DataError, match="leaves the dataset root"):
        read_dataset("nabirds", root, on_bad_image="skip")


def test_a_link_out_of_the_root_is_refused_unless_followed(tmp_path):
    """images/ may hold links to each other (inside the root); one that points elsewhere is
    read only with follow_symlinks."""
    root = tiny_nabirds(tmp_path / "data", image_files=True)
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"")
    (root / "images" / "0010" / "a1.jpg").unlink()
    (root / "images" / "0010" / "a1.jpg").symlink_to(outside)
    (root / "images" / "0003" / "b2.jpg").unlink()
    (root / "images" / "0003" / "b2.jpg").symlink_to("b1.jpg")     # inside: fine
    dataset = read_dataset("nabirds", root)
    with pytest.raises(DataError, match="symbolic link") as caught:
        check_image_files(dataset)
    assert_names(caught.value, "images.txt", 1, "images/0010/a1.jpg")
    checked, skipped = check_image_files(dataset, on_bad_image="skip")
    assert [s["image_id"] for s in skipped] == ["a-1"]
    assert "follow_symlinks" in skipped[0]["reason"]
    checked, skipped = check_image_files(dataset, follow_symlinks=True)
    assert skipped == [] and checked.images.num_rows == 6
    with pytest.raises(DataError, match="symbolic link"):
        image_file(root, "images/0010/a1.jpg")
    assert image_file(root, "images/0010/a1.jpg", follow_symlinks=True) == \
        root / "images/0010/a1.jpg"


def test_a_fifo_or_folder_is_not_a_photo(tmp_path):
    root = tiny_nabirds(tmp_path, image_files=True)
    fifo = root / "images" / "0003" / "b1.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file") as caught:
        check_image_files(read_dataset("nabirds", root))
    assert_names(caught.value, "images.txt", 4, "images/0003/b1.jpg")
    with pytest.raises(DataError, match="not a regular file"):
        image_file(root, "images/0003/b1.jpg")       # a stat, never an open that blocks


def test_blank_photographer_is_no_credit(tmp_path):
    credits = {"photographers.txt": ["a-1 Jane  Q. Public", "a-2", "a-3  ", "b-2 John Doe"]}
    dataset = read_dataset("nabirds", tiny_nabirds(tmp_path, replace=credits))
    assert dataset.images.column("photographer").to_pylist() == [
        "Jane  Q. Public", None, None, None, "John Doe", None]
