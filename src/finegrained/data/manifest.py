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

Rows within each split are in a seeded random order, not file order: the shard stage cuts
each split into contiguous ranges, and file order is grouped by class folder, so shards cut
from it would each hold only a handful of classes.

All six files are written to temporary names and renamed together at the end, so a failure
never leaves a partial set under the final names.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finegrained.data.readers import (CLASSES_SCHEMA, Dataset, check_image_files,
                                      read_dataset)
from finegrained.errors import DataError
from finegrained.fileio import atomic_output

SPLITS = ("train", "val", "test")
CLASSES_FILE = "classes.parquet"
TAXONOMY_FILE = "taxonomy.parquet"
SKIPPED_FILE = "skipped.json"

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
                    follow_symlinks: bool = False) -> dict:
    """Write the split manifests, class tables and skipped list for ``dataset`` into ``out_dir``.

    ``check_files`` confirms every image is a regular file inside the dataset root first
    (``follow_symlinks``: or reached through a link that leaves it; ``on_bad_image``:
    ``'error'`` raises, ``'skip'`` drops the image and lists it in skipped.json, after the
    images the reader already left out). The same ``seed`` gives byte-identical tables. Returns counts:
    images, classes, train/val/test, skipped.
    """
    if check_files:
        dataset, _ = check_image_files(dataset, on_bad_image=on_bad_image,
                                       follow_symlinks=follow_symlinks)
    skipped = list(dataset.skipped)

    # Independent streams: the test order does not change when val_fraction does.
    val_rng, order_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    split = assign_splits(dataset.images.column("label").to_numpy(),
                          dataset.images.column("is_train").to_numpy(zero_copy_only=False),
                          val_fraction, val_rng)
    tables = _manifest_tables(dataset, split, order_rng)
    for name in ("train", "test"):
        if tables[name].num_rows == 0:
            raise DataError(dataset.images_file,
                            f"no {name} images left after skipping {len(skipped)} bad images")

    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        def temp(name: str) -> Path:
            return stack.enter_context(atomic_output(out_dir / name))
        # Every file is written before any is renamed: atomic_output renames on exit,
        # which the ExitStack runs only once the whole block has succeeded.
        for name, table in tables.items():
            pq.write_table(table, temp(f"{name}.parquet"))
        pq.write_table(dataset.classes, temp(CLASSES_FILE))
        pq.write_table(dataset.taxonomy, temp(TAXONOMY_FILE))
        temp(SKIPPED_FILE).write_text(json.dumps(skipped, indent=2) + "\n")

    return {
        "format": dataset.format,
        "images": sum(table.num_rows for table in tables.values()),
        "classes": dataset.num_classes,
        **{name: table.num_rows for name, table in tables.items()},
        "skipped": len(skipped),
        "val_fraction": val_fraction,
        "seed": seed,
    }


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
