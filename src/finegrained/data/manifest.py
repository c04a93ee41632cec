"""Per-split manifests: the one table of images every later stage reads.

:func:`write_manifests` turns a parsed :class:`~finegrained.data.readers.Dataset` into

- ``train.parquet``, ``val.parquet``, ``test.parquet`` — one row per image
  (:data:`MANIFEST_SCHEMA`). Validation images are carved out of the official train split,
  stratified per class; test is the official test split, untouched.
- ``classes.parquet`` — the leaf classes, row i = label i, with ancestor chains
  (:data:`~finegrained.data.readers.CLASSES_SCHEMA`).
- ``taxonomy.parquet`` — every class id with its parent (empty for CUB).
- ``skipped.json`` — images dropped with ``on_bad_image='skip'`` because their box cannot be
  cropped or their file is missing, with the reason (always written).
- ``report.json`` — the leakage checks: photos with identical bytes and where they went,
  the classes left out (:func:`write_manifests`).

Two faults would make every test number wrong without a word, and are checked here, where
the splits are made: a photo in two splits (its file listed under two ids is refused by the
reader; identical bytes under two names are found by the sha256 of every photo, computed
once here), and a class with test or validation photos but no training photo, which no
model can learn.

Rows within each split are in a seeded random order, not file order: the shard stage cuts
each split into contiguous ranges, and file order is grouped by class folder, so shards cut
from it would each hold only a handful of classes.

All seven files are written to temporary names and renamed together at the end, so a
failure never leaves a partial set under the final names.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finegrained.data.readers import (CLASSES_SCHEMA, Dataset, check_image_files,
                                      read_dataset)
from finegrained.errors import DataError
from finegrained.fileio import atomic_output, parquet_bytes, sha256_file, write_reserved

SPLITS = ("train", "val", "test")
CLASSES_FILE = "classes.parquet"
TAXONOMY_FILE = "taxonomy.parquet"
SKIPPED_FILE = "skipped.json"
REPORT_FILE = "report.json"
#: What to do with a photo whose bytes are also in another split, and with a class that has
#: validation or test photos but no training photo (see :func:`write_manifests`).
DUPLICATE_PHOTOS = ("error", "allow")
TEST_ONLY_CLASSES = ("error", "exclude")
#: classes.parquet schema metadata: the classes left out, which each metrics.json states.
EXCLUDED_CLASSES_KEY = b"finegrained.excluded_classes"

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),            # relative to the dataset root
    ("label", pa.int32()),            # 0..C-1, row of classes.parquet
    ("class_id", pa.int64()),         # the dataset's original class id
    ("class_name", pa.string()),
    ("bbox_x", pa.float64()),         # pixels; the whole image when the dataset has no boxes
    ("bbox_y", pa.float64()),
    ("bbox_w", pa.float64()),
    ("bbox_h", pa.float64()),
    ("width", pa.int32()),            # null when the dataset has no sizes.txt
    ("height", pa.int32()),
    ("photographer", pa.string()),
    ("split", pa.string()),
    ("images_line", pa.int32()),      # 1-based line in images.txt, for error messages
])


def manifest_path(out_dir: str | os.PathLike, split: str) -> Path:
    """Where the manifest of ``split`` lives under ``out_dir``."""
    return Path(out_dir) / f"{split}.parquet"


def validation_count(n_train: int, val_fraction: float) -> int:
    """How many of a class's ``n_train`` official-train images go to validation.

    ``val_fraction * n_train`` rounded half up, but at least one (so every class with two or
    more images is represented in validation: NABirds has classes with only 4 train images,
    where plain rounding would give none) and at most ``n_train - 1`` (so every class keeps
    a train image).
    """
    if val_fraction <= 0 or n_train < 2:
        return 0
    wanted = int(np.floor(val_fraction * n_train + 0.5))
    return min(max(wanted, 1), n_train - 1)


def assign_splits(labels: np.ndarray, is_train: np.ndarray, val_fraction: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Return ``'train'``/``'val'``/``'test'`` per image, validation stratified per class."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    split = np.where(is_train, "train", "test").astype(object)
    train_index = np.flatnonzero(is_train)
    # Group the train images by class once (stable, so the draw depends only on the seed).
    order = train_index[np.argsort(labels[train_index], kind="stable")]
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, boundaries):
        n_val = validation_count(len(members), val_fraction)
        if n_val:
            split[rng.choice(members, size=n_val, replace=False)] = "val"
    return split


def _manifest_tables(dataset: Dataset, split: np.ndarray,
                     order_rng: np.random.Generator) -> dict[str, pa.Table]:
    images = dataset.images
    class_names = np.asarray(dataset.classes.column("name").to_pylist(), dtype=object)
    labels = images.column("label").to_numpy()
    full = pa.table({
        "image_id": images.column("image_id"),
        "path": images.column("path"),
        "label": images.column("label"),
        "class_id": images.column("class_id"),
        "class_name": pa.array(class_names[labels], type=pa.string()),
        **{name: images.column(name) for name in
           ("bbox_x", "bbox_y", "bbox_w", "bbox_h", "width", "height", "photographer")},
        "split": pa.array(split, type=pa.string()),
        "images_line": images.column("images_line"),
    }, schema=MANIFEST_SCHEMA)
    tables = {}
    for name in SPLITS:
        rows = np.flatnonzero(split == name)
        tables[name] = full.take(pa.array(order_rng.permutation(rows)))
    return tables


def write_manifests(dataset: Dataset, out_dir: str | os.PathLike, *, val_fraction: float = 0.1,
                    seed: int = 0, on_bad_image: str = "error", check_files: bool = True,
                    follow_symlinks: bool = False, duplicate_photos: str = "error",
                    test_only_classes: str = "error") -> dict:
    """Write the split manifests, class tables, skipped list and report for ``dataset`` into
    ``out_dir``.

    ``check_files`` confirms every image is a regular file inside the dataset root first
    (``follow_symlinks``: or reached through a link that leaves it; ``on_bad_image``:
    ``'error'`` raises, ``'skip'`` drops the image and lists it in skipped.json, after the
    images the reader already left out) and hashes every photo: copies within the official
    train split stay in one split (never one in train, one in validation), and a copy in
    train and test is a :class:`DataError` naming both, or with ``duplicate_photos='allow'``
    counted in report.json. A class with validation or test photos but none in train is a
    DataError, or with ``test_only_classes='exclude'`` left out of every split and of the
    class table (its labels renumbered), and listed in report.json and in classes.parquet's
    schema metadata, which each evaluation states (:func:`excluded_classes`). The same
    ``seed`` gives byte-identical files. Returns counts: images, classes, train/val/test,
    skipped, photos hashed and the seconds it took.
    """
    if duplicate_photos not in DUPLICATE_PHOTOS or test_only_classes not in TEST_ONLY_CLASSES:
        raise ValueError(f"bad leakage options: duplicate_photos={duplicate_photos!r} "
                         f"test_only_classes={test_only_classes!r}")
    if check_files:
        dataset, _ = check_image_files(dataset, on_bad_image=on_bad_image,
                                       follow_symlinks=follow_symlinks)
    skipped = list(dataset.skipped)
    start = time.perf_counter()
    copies = _identical_photos(dataset) if check_files else []
    hash_seconds = time.perf_counter() - start

    # Independent streams: the test order does not change when val_fraction does.
    val_rng, order_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    split = assign_splits(dataset.images.column("label").to_numpy(),
                          dataset.images.column("is_train").to_numpy(zero_copy_only=False),
                          val_fraction, val_rng)
    _keep_copies_together(split, copies)
    leaks = [rows for rows in copies if len(set(split[rows])) > 1]
    if leaks and duplicate_photos == "error":
        _raise_leak(dataset, split, leaks)
    dataset, split, excluded = _test_only_classes(dataset, split, test_only_classes)
    tables = _manifest_tables(dataset, split, order_rng)
    for name in ("train", "test"):
        if tables[name].num_rows == 0:
            raise DataError(dataset.images_file,
                            f"no {name} images left after skipping {len(skipped)} bad images")
    classes = dataset.classes.replace_schema_metadata(
        {EXCLUDED_CLASSES_KEY: json.dumps(excluded).encode()})
    report = {"photos_hashed": dataset.images.num_rows if check_files else None,
              "identical_photos": {"copies": sum(len(rows) for rows in copies),
                                   "in_two_splits": sum(len(rows) for rows in leaks),
                                   "across_splits": [_copies_entry(dataset, split, rows)
                                                     for rows in leaks]},
              "excluded_classes": excluded}

    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        def write(name: str, data) -> None:
            write_reserved(stack.enter_context(atomic_output(out_dir / name)), out_dir / name,
                           data)
        # Every file is written before any is renamed: atomic_output renames on exit,
        # which the ExitStack runs only once the whole block has succeeded.
        for name, table in tables.items():
            write(f"{name}.parquet", parquet_bytes(table))
        write(CLASSES_FILE, parquet_bytes(classes))
        write(TAXONOMY_FILE, parquet_bytes(dataset.taxonomy))
        write(SKIPPED_FILE, (json.dumps(skipped, indent=2) + "\n").encode())
        write(REPORT_FILE, (json.dumps(report, indent=2) + "\n").encode())

    return {
        "format": dataset.format,
        "images": sum(table.num_rows for table in tables.values()),
        "classes": dataset.num_classes,
        **{name: table.num_rows for name, table in tables.items()},
        "skipped": len(skipped),
        "val_fraction": val_fraction,
        "seed": seed,
        "photos_hashed": report["photos_hashed"],
        "identical_photos_in_two_splits": report["identical_photos"]["in_two_splits"],
        "excluded_classes": len(excluded),
        "hash_seconds": hash_seconds,
    }


def excluded_classes(classes: pa.Table) -> list[dict]:
    """The classes the manifests left out (``test_only_classes='exclude'``), from the
    schema metadata of the class table they wrote: ``[{class_id, name, val, test}]``."""
    return json.loads((classes.schema.metadata or {}).get(EXCLUDED_CLASSES_KEY, b"[]"))


def _identical_photos(dataset: Dataset) -> list[np.ndarray]:
    """Rows of the photos whose bytes another photo has, a group per content (rows in
    images.txt order), from the sha256 of every file (hashed side by side: hashlib
    releases the GIL). A file that cannot be read is compared with none: the crop job
    reports it (``on_bad_image``)."""
    paths = [dataset.root / rel for rel in dataset.images.column("path").to_pylist()]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(_photo_digest, paths))
    rows = defaultdict(list)
    for row, digest in enumerate(digests):
        if digest is not None:
            rows[digest].append(row)
    return [np.array(group) for group in rows.values() if len(group) > 1]


def _photo_digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _keep_copies_together(split: np.ndarray, copies: list[np.ndarray]) -> None:
    """Put every copy of a photo that the validation carve-out split between train and
    validation back into train (in place), so validation never measures a training photo."""
    for rows in copies:
        official_train = rows[split[rows] != "test"]
        if len(set(split[official_train])) > 1:
            split[official_train] = "train"


def _copies_entry(dataset: Dataset, split: np.ndarray, rows: np.ndarray) -> list[dict]:
    images = dataset.images.take(pa.array(rows))
    return [{"image_id": image_id, "path": path, "split": where, "images_line": line}
            for image_id, path, where, line in zip(
                images.column("image_id").to_pylist(), images.column("path").to_pylist(),
                split[rows], images.column("images_line").to_pylist())]


def _raise_leak(dataset: Dataset, split: np.ndarray, leaks: list[np.ndarray]) -> None:
    first, *others = _copies_entry(dataset, split, leaks[0])
    other = next(c for c in others if c["split"] != first["split"])
    raise DataError(dataset.images_file,
                    f"image {other['image_id']!r} ({other['split']}, {other['path']}) has the "
                    f"same bytes as image {first['image_id']!r} on line {first['images_line']} "
                    f"({first['split']}, {first['path']}): one photo in two splits makes the "
                    f"evaluation measure photos the model was trained or selected on "
                    f"({sum(len(rows) for rows in leaks)} such photos in all); remove the "
                    f"copies, or set dataset.duplicate_photos: allow to keep them (counted in "
                    f"the manifests' report.json)",
                    line=other["images_line"], value=other["path"])


def _test_only_classes(dataset: Dataset, split: np.ndarray,
                       action: str) -> tuple[Dataset, np.ndarray, list[dict]]:
    """Refuse (``'error'``) or leave out (``'exclude'``) the classes with validation or test
    photos but no training photo; return the dataset and split without them, and the list."""
    labels = dataset.images.column("label").to_numpy()
    counts = {name: np.bincount(labels[split == name], minlength=dataset.num_classes)
              for name in SPLITS}
    lonely = np.flatnonzero((counts["train"] == 0) & (counts["val"] + counts["test"] > 0))
    if len(lonely) == 0:
        return dataset, split, []
    class_ids = dataset.classes.column("class_id").to_pylist()
    names = dataset.classes.column("name").to_pylist()
    excluded = [{"class_id": class_ids[k], "name": names[k], "val": int(counts["val"][k]),
                 "test": int(counts["test"][k])} for k in lonely]
    if action == "error":
        k, first = excluded[0], int(np.flatnonzero(labels == lonely[0])[0])
        raise DataError(dataset.images_file,
                        f"class {k['class_id']} ({k['name']!r}) has {k['test']} test and "
                        f"{k['val']} validation photos but no training photo: no model can "
                        f"learn it, and each of its photos would count as an error "
                        f"({len(excluded)} such classes in all); give it training photos, or set "
                        f"dataset.test_only_classes: exclude to leave it out of training and of "
                        f"the metrics", line=dataset.images.column("images_line")[first].as_py(),
                        value=k["name"])
    kept_class = ~np.isin(np.arange(dataset.num_classes), lonely)
    new_label = np.cumsum(kept_class) - 1
    keep = kept_class[labels]
    images = dataset.images.filter(pa.array(keep))
    images = images.set_column(images.schema.get_field_index("label"), "label",
                               pa.array(new_label[labels[keep]], pa.int32()))
    classes = dataset.classes.filter(pa.array(kept_class))
    classes = classes.set_column(0, "label", pa.array(np.arange(classes.num_rows, dtype=np.int32)))
    return replace(dataset, images=images, classes=classes), split[keep], excluded


def prepare_manifests(fmt: str, root: str | os.PathLike, out_dir: str | os.PathLike,
                      *, on_bad_image: str = "error", **options) -> dict:
    """Read the ``fmt`` dataset at ``root`` and write its manifests (options: see write_manifests)."""
    dataset = read_dataset(fmt, root, on_bad_image=on_bad_image)
    return write_manifests(dataset, out_dir, on_bad_image=on_bad_image, **options)


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read one split manifest written by :func:`write_manifests` (the one manifest reader:
    the crop phase reads through it too)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(path, f"cannot read manifest: {exc}") from exc
    if not table.schema.equals(MANIFEST_SCHEMA):
        raise DataError(path, "not a split manifest (unexpected columns)",
                        value=", ".join(table.schema.names))
    return table


def class_names(path: str | os.PathLike) -> list[str]:
    """Common names of the classes of ``classes.parquet``, index = label: the names a
    classifier's outputs carry (weights metadata, name matching)."""
    return read_classes(path).column("common_name").to_pylist()


def read_classes(path: str | os.PathLike) -> pa.Table:
    """Read ``classes.parquet``: the leaf classes, row i = label i."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(path, f"cannot read class table: {exc}") from exc
    if not table.schema.equals(CLASSES_SCHEMA):
        raise DataError(path, "not a class table (unexpected columns)",
                        value=", ".join(table.schema.names))
    labels = table.column("label").to_numpy()
    if not np.array_equal(labels, np.arange(len(labels))):
        raise DataError(path, "labels are not 0..C-1 in row order")
    return table
