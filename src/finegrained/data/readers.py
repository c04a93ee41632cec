"""Read NABirds and CUB-200-2011 annotation folders into one in-memory :class:`Dataset`.

Both datasets ship the same family of space-separated text files (``images.txt``,
``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt``, ...); they differ in
id type (UUID strings vs integers), box type (integers vs floats), which files are
optional, and whether a class hierarchy exists. One reader handles both, driven by a small
:class:`FormatSpec`, so every check is written once.

Every problem in the input is reported as a :class:`~finegrained.errors.DataError` naming
the file, the 1-based line and the offending value: a dataset with 48k images is fixed by
reading the message, not by bisecting the files.

Two kinds of fault, and where the line between them runs (``on_bad_image``):

* *Image-level*: one image cannot be used, the rest of the dataset is fine: its file is
  missing, truncated or undecodable, or its box has zero area or lies outside the photo.
  With ``on_bad_image='skip'`` the image is dropped and listed with its reason; with
  ``'error'`` (the default) the first one stops the run.
* *Dataset-level*: the files themselves are inconsistent, so no image can be trusted: a
  malformed line, a duplicate id, one file listed under two ids, ids that do not match across
  files, an unknown class id, a split flag other than 0/1, a hierarchy cycle, an empty split.
  Always fatal.

``photographers.txt`` holds optional credits: a line with an id and no name is no credit.

Only classes that label at least one image are *leaf labels* (NABirds: 555 of 1,011 class
ids; the rest are taxonomy nodes). They are remapped to ``label`` 0..C-1 in numeric order of
their original class id, which keeps the mapping stable and easy to reproduce by hand.
"""

from __future__ import annotations

import codecs
import functools
import math
import os
import posixpath
import re
import stat
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa

from finegrained.data.crop import check_box
from finegrained.errors import ON_BAD_IMAGE, DataError

# Both datasets keep the photos under <root>/images/ and list them relative to that folder.
IMAGES_DIR = "images"

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),            # relative to the dataset root, e.g. images/0817/x.jpg
    ("class_id", pa.int64()),
    ("label", pa.int32()),
    ("is_train", pa.bool_()),
    ("bbox_x", pa.float64()),         # null only when neither boxes nor sizes are known
    ("bbox_y", pa.float64()),
    ("bbox_w", pa.float64()),
    ("bbox_h", pa.float64()),
    ("width", pa.int32()),            # null when sizes.txt is absent
    ("height", pa.int32()),
    ("photographer", pa.string()),
    ("images_line", pa.int32()),      # 1-based line in images.txt, for later error messages
])

CLASSES_SCHEMA = pa.schema([
    ("label", pa.int32()),
    ("class_id", pa.int64()),
    ("name", pa.string()),
    ("common_name", pa.string()),
    ("ancestor_ids", pa.list_(pa.int64())),      # parent first, root last
    ("ancestor_names", pa.list_(pa.string())),
    ("depth", pa.int32()),                       # number of ancestors; 0 without a hierarchy
])

TAXONOMY_SCHEMA = pa.schema([
    ("class_id", pa.int64()),
    ("name", pa.string()),
    ("parent_id", pa.int64()),        # null for the root
])


@dataclass(frozen=True)
class Dataset:
    """One annotated dataset: images (one row each, images.txt order), leaf classes, taxonomy.

    ``images`` follows :data:`IMAGES_SCHEMA`, ``classes`` :data:`CLASSES_SCHEMA` (row i has
    label i) and ``taxonomy`` :data:`TAXONOMY_SCHEMA` (every class id; empty without a
    hierarchy file). ``skipped`` lists the images left out (``{image_id, path, reason}``).
    """

    format: str
    root: Path
    images: pa.Table
    classes: pa.Table
    taxonomy: pa.Table
    skipped: tuple = ()

    @property
    def num_classes(self) -> int:
        return self.classes.num_rows

    @property
    def images_file(self) -> Path:
        return self.root / "images.txt"


@dataclass(frozen=True)
class FormatSpec:
    """What differs between the two on-disk formats."""

    name: str
    parse_image_id: Callable[[str], str]
    parse_box_number: Callable[[str], float]
    boxes_required: bool
    sizes_required: bool
    hierarchy_file: str | None
    common_name: Callable[[str], str]


    def annotation_names(self) -> list[tuple[str, bool]]:
        """``(file name, required)`` of every annotation file this format reads."""
        names = [("images.txt", True), ("image_class_labels.txt", True),
                 ("train_test_split.txt", True), ("classes.txt", True),
                 ("bounding_boxes.txt", self.boxes_required), ("sizes.txt", self.sizes_required)]
        if self.hierarchy_file:
            names.append((self.hierarchy_file, True))
        return names + [("photographers.txt", False)]


def dataset_root_problem(fmt: str, root: str | os.PathLike, key: str = "dataset") -> str | None:
    """Why ``root`` cannot be the dataset folder of a ``fmt`` dataset (one line naming the
    config key, the path and the page that explains the layout), or None."""
    root = Path(root)
    missing = [name for name, required in DATASET_FORMATS[fmt].annotation_names()
               if required and not (root / name).is_file()]
    if root.is_dir() and not missing:
        return None
    what = ("does not exist" if not root.exists() else "is not a folder" if not root.is_dir()
            else f"has no {', '.join(missing)}")
    return (f"{key}.root: {os.fspath(root)!r} ({root.absolute()}) {what}: put the extracted "
            f"{fmt} dataset there (images.txt, ..., images/) or set {key}.root; the layout: "
            f"docs/nabirds.md")


def check_image_paths(fmt: str, root: str | os.PathLike) -> None:
    """The images.txt check of :func:`read_dataset` alone: a DataError naming the line of a
    path that leaves ``root`` or names a file another line names. Cheap (one file, cached
    while the file is unchanged), so the workflow runs it when the DAG is built and
    ``snakemake -n`` refuses such a dataset."""
    listing = Path(root) / "images.txt"
    stat = listing.stat()
    _check_image_paths(fmt, os.fspath(listing), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _check_image_paths(fmt: str, listing: str, mtime_ns: int, size: int) -> None:
    images = _read_keyed(Path(listing), DATASET_FORMATS[fmt].parse_image_id, [("path", _text)],
                         rest_is_text=True)
    _check_listing(images, Path(listing))


def annotation_files(fmt: str, root: str | os.PathLike, *,
                     all_optional: bool = False) -> list[Path]:
    """The files :func:`read_dataset` reads in ``root``: the required ones (present or not)
    and the optional ones that exist (every one with ``all_optional``).

    The workflow declares exactly these as the inputs of the manifests, so editing one reruns
    the data phase, and adding an unrelated file to the dataset folder reruns nothing.
    """
    root = Path(root)
    return [root / name for name, required in DATASET_FORMATS[fmt].annotation_names()
            if required or all_optional or (root / name).is_file()]


def _uuid_id(token: str) -> str:
    # NABirds ids are opaque UUID strings; checking the UUID grammar would add nothing,
    # since every file is cross-checked against images.txt anyway.
    return token


def _integer_id(token: str) -> str:
    # Canonical decimal text, so "007" in one file matches "7" in another.
    return str(int(token))


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(token)
    return value


#: Largest image side and box coordinate accepted (the manifests store sizes as int32).
MAX_PIXELS = 2 ** 31 - 1


def _pixel_int(token: str) -> int:
    """An integer pixel coordinate or size (NABirds boxes), within int32."""
    value = int(token)
    if abs(value) > MAX_PIXELS:
        raise ValueError(token)
    return value


def _int64(token: str) -> int:
    """A class id: any integer that fits the manifests' int64 column."""
    value = int(token)
    if not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(token)
    return value


def _cub_common_name(name: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return re.sub(r"^\d+\.", "", name).replace("_", " ")


DATASET_FORMATS = {
    "nabirds": FormatSpec("nabirds", _uuid_id, _pixel_int, boxes_required=True, sizes_required=True,
                          hierarchy_file="hierarchy.txt", common_name=lambda name: name),
    "cub": FormatSpec("cub", _integer_id, _finite_float, boxes_required=False,
                      sizes_required=False, hierarchy_file=None, common_name=_cub_common_name),
}


# --------------------------------------------------------------------------- line parsing

_BOM = codecs.BOM_UTF8.decode("utf-8")

def _lines(path: Path):
    """Yield ``(line_no, text)`` for each non-blank line, without its newline only.

    Trailing spaces are kept on purpose: class names such as 'Blue-winged Teal  (Male)'
    are part of the released data and later files refer to them exactly. A UTF-8
    byte-order mark at the start of the file (Windows editors write one) is dropped; one
    anywhere else is an error on its own line, as is a file in UTF-16: otherwise the first
    id would carry an invisible character and be blamed on the next file that lists it.
    """
    # Decoded line by line (not by the text layer, which reads ahead in blocks) so that a
    # byte that is not UTF-8 is reported on its own line.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    raise DataError(path, "file is UTF-16 text (it starts with a UTF-16 "
                                          "byte-order mark): save it as UTF-8", line=1)
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise DataError(path, "line is not UTF-8 text", line=line_no,
                                value=raw[error.start:error.end]) from None
            if _BOM in text:
                raise DataError(path, "byte-order mark (U+FEFF, an invisible character) "
                                      "inside the file: two files joined? delete it",
                                line=line_no, value=text)
            if text.strip():
                yield line_no, text


def _split_fields(path: Path, line_no: int, text: str, n_fields: int, *,
                  rest_is_text: bool, optional_text: bool = False) -> list[str]:
    """Split a line into exactly ``n_fields`` fields.

    ``rest_is_text`` splits on the first space only, so the last field (a name or a path)
    may contain spaces of its own; ``optional_text`` lets that field be absent or blank
    (it is then ``''``).
    """
    fields = text.split(" ", 1) if rest_is_text else text.split()
    if optional_text:
        fields = [fields[0], fields[1] if len(fields) > 1 and fields[1].strip() else ""]
    elif len(fields) != n_fields or (rest_is_text and not fields[1]):
        raise DataError(path, f"expected {n_fields} space-separated fields, got {len(fields)}",
                        line=line_no, value=text)
    return fields


def _convert(path: Path, line_no: int, token: str, convert: Callable, what: str):
    try:
        return convert(token)
    except (ValueError, OverflowError):
        raise DataError(path, f"invalid {what}", line=line_no, value=token) from None


class _Record(NamedTuple):
    """One parsed line: its 1-based number and converted values (a tuple is cheap at 48k rows)."""

    line: int
    values: tuple


def _read_keyed(path: Path, parse_key: Callable, converters: list[tuple[str, Callable]], *,
                rest_is_text: bool = False, optional_text: bool = False) -> dict:
    """Read ``<key> <value>...`` lines into ``{key: _Record}``, rejecting duplicate keys."""
    records: dict = {}
    functions = [convert for _, convert in converters]
    for line_no, text in _lines(path):
        fields = _split_fields(path, line_no, text, 1 + len(converters), rest_is_text=rest_is_text,
                               optional_text=optional_text)
        try:
            key = parse_key(fields[0])
            values = tuple([convert(token) for token, convert in zip(fields[1:], functions)])
        except (ValueError, OverflowError):
            # Slow path only on failure: find which field is bad, for the message.
            _convert(path, line_no, fields[0], parse_key, "id")
            for token, (what, convert) in zip(fields[1:], converters):
                _convert(path, line_no, token, convert, what)
            raise
        if key in records:
            raise DataError(path, f"duplicate id (first seen on line {records[key].line})",
                            line=line_no, value=fields[0])
        records[key] = _Record(line_no, values)
    return records


def _text(token: str) -> str:
    return token


# --------------------------------------------------------------------------- cross-checks

def _check_same_ids(images: dict, images_path: Path, other: dict, other_path: Path,
                    *, every_image: bool) -> None:
    """Every id in ``other`` must be an image; with ``every_image`` every image needs a record."""
    for key, record in other.items():
        if key not in images:
            raise DataError(other_path, "image id is not listed in images.txt",
                            line=record.line, value=key)
    if every_image and len(other) != len(images):
        for key, record in images.items():
            if key not in other:
                raise DataError(images_path, f"image has no record in {other_path.name}",
                                line=record.line, value=key)


def _bad_boxes(path: Path, boxes: dict, sizes: dict, on_bad_image: str) -> dict[str, DataError]:
    """Boxes no crop can be cut from, by image id (raising the first with ``'error'``).

    Boxes that only partly leave the image are real (201 in NABirds) and are clamped at
    crop time; a box with no area or no pixel inside the image cannot be cropped at all.
    """
    bad = {}
    for image_id, record in boxes.items():
        size = sizes.get(image_id)
        try:
            check_box(record.values, size.values if size else None, source=path,
                      line=record.line)
        except DataError as error:
            if on_bad_image == "error":
                raise
            bad[image_id] = error
    return bad


def _positive_int(token: str) -> int:
    value = int(token)
    if not 0 < value <= MAX_PIXELS:
        raise ValueError(token)
    return value


# --------------------------------------------------------------------------- classes

def _read_hierarchy(path: Path, class_names: dict[int, str]) -> dict[int, _Record]:
    """Read ``<child> <parent>`` lines; both ids must exist in classes.txt."""
    parents = _read_keyed(path, _int64, [("parent id", _int64)])
    for child, record in parents.items():
        if child not in class_names:
            raise DataError(path, "child class id is not in classes.txt", line=record.line,
                            value=child)
        if record.values[0] not in class_names:
            raise DataError(path, "parent class id is not in classes.txt", line=record.line,
                            value=record.values[0])
    return parents


def _ancestor_chain(class_id: int, parents: dict[int, _Record], path: Path) -> list[int]:
    """Parent, grandparent, ..., root of ``class_id``; a cycle is a DataError."""
    chain: list[int] = []
    seen = {class_id}
    node = class_id
    while node in parents:
        record = parents[node]
        parent = record.values[0]
        if parent in seen:
            loop = " -> ".join(str(c) for c in [class_id, *chain, parent])
            raise DataError(path, "cycle in class hierarchy", line=record.line, value=loop)
        chain.append(parent)
        seen.add(parent)
        node = parent
    return chain


def _build_class_tables(spec: FormatSpec, class_names: dict[int, str], leaf_ids: list[int],
                        parents: dict[int, _Record], hierarchy_path: Path | None):
    chains = {class_id: _ancestor_chain(class_id, parents, hierarchy_path)
              for class_id in class_names}     # walking every node finds cycles off the leaves too
    leaf_chains = [chains[c] for c in leaf_ids]
    classes = pa.table({
        "label": np.arange(len(leaf_ids), dtype=np.int32),
        "class_id": leaf_ids,
        "name": [class_names[c] for c in leaf_ids],
        "common_name": [spec.common_name(class_names[c]) for c in leaf_ids],
        "ancestor_ids": leaf_chains,
        "ancestor_names": [[class_names[a] for a in chain] for chain in leaf_chains],
        "depth": [len(chain) for chain in leaf_chains],
    }, schema=CLASSES_SCHEMA)
    if hierarchy_path is None:
        taxonomy = TAXONOMY_SCHEMA.empty_table()
    else:
        ids = sorted(class_names)
        taxonomy = pa.table({
            "class_id": ids,
            "name": [class_names[c] for c in ids],
            "parent_id": [parents[c].values[0] if c in parents else None for c in ids],
        }, schema=TAXONOMY_SCHEMA)
    return classes, taxonomy


# --------------------------------------------------------------------------- reader

def read_dataset(fmt: str, root: str | os.PathLike, *, on_bad_image: str = "error") -> Dataset:
    """Parse the annotation files of a ``'nabirds'`` or ``'cub'`` dataset folder.

    Raises :class:`DataError` for malformed lines, duplicate ids, ids that do not match
    across files, unknown class ids, split values other than 0/1, empty train or test
    splits and hierarchy cycles. A box with no area or no overlap with the image is an
    image-level fault: raised with ``on_bad_image='error'``; with ``'skip'`` the image is
    left out and listed in ``Dataset.skipped``. Image files are not touched; see
    :func:`check_image_files`.
    """
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of "
                         f"{sorted(DATASET_FORMATS)}")
    _check_choice(on_bad_image)
    spec = DATASET_FORMATS[fmt]
    root = Path(root)

    def required(name: str) -> Path:
        path = root / name
        if not path.is_file():
            raise DataError(path, f"required {spec.name} annotation file is missing")
        return path

    def optional(name: str) -> Path | None:
        path = root / name
        return path if path.is_file() else None

    files = {name: required(name) if needed else optional(name)
             for name, needed in spec.annotation_names()}
    images_path = files["images.txt"]
    labels_path = files["image_class_labels.txt"]
    split_path = files["train_test_split.txt"]
    classes_path = files["classes.txt"]
    boxes_path = files["bounding_boxes.txt"]
    sizes_path = files["sizes.txt"]
    hierarchy_path = files.get(spec.hierarchy_file)
    photographers_path = files["photographers.txt"]
    # parts/ (part locations) is not used by this pipeline and is deliberately not read.

    key = spec.parse_image_id
    images = _read_keyed(images_path, key, [("path", _text)], rest_is_text=True)
    if not images:
        raise DataError(images_path, "no images listed")
    _check_listing(images, images_path)
    labels = _read_keyed(labels_path, key, [("class id (64-bit integer)", _int64)])
    split = _read_keyed(split_path, key, [("split flag", int)])
    sizes = (_read_keyed(sizes_path, key, [("width (integer, 1 to 2^31-1)", _positive_int),
                                            ("height (integer, 1 to 2^31-1)", _positive_int)])
             if sizes_path else {})
    boxes = (_read_keyed(boxes_path, key, [(f"box {n}", spec.parse_box_number) for n in "xywh"])
             if boxes_path else {})
    photographers = (_read_keyed(photographers_path, key, [("name", _text)], rest_is_text=True,
                                 optional_text=True)
                     if photographers_path else {})

    _check_same_ids(images, images_path, labels, labels_path, every_image=True)
    _check_same_ids(images, images_path, split, split_path, every_image=True)
    if sizes_path:
        _check_same_ids(images, images_path, sizes, sizes_path, every_image=True)
    bad_boxes = {}
    if boxes_path:
        _check_same_ids(images, images_path, boxes, boxes_path, every_image=True)
        bad_boxes = _bad_boxes(boxes_path, boxes, sizes, on_bad_image)
    if photographers_path:
        # Credits may be incomplete; only ids that are not images are wrong.
        _check_same_ids(images, images_path, photographers, photographers_path, every_image=False)

    for record in split.values():
        if record.values[0] not in (0, 1):
            raise DataError(split_path, "split flag must be 1 (train) or 0 (test)",
                            line=record.line, value=record.values[0])
    n_train = sum(record.values[0] for record in split.values())
    if n_train == 0 or n_train == len(split):
        raise DataError(split_path, f"the {'train' if n_train == 0 else 'test'} split is empty")

    class_names = {class_id: record.values[0] for class_id, record in
                   _read_keyed(classes_path, _int64, [("name", _text)],
                               rest_is_text=True).items()}
    for record in labels.values():
        if record.values[0] not in class_names:
            raise DataError(labels_path, "class id is not in classes.txt", line=record.line,
                            value=record.values[0])
    parents = _read_hierarchy(hierarchy_path, class_names) if hierarchy_path else {}

    leaf_ids = sorted({record.values[0] for record in labels.values()})
    label_of = {class_id: label for label, class_id in enumerate(leaf_ids)}
    classes, taxonomy = _build_class_tables(spec, class_names, leaf_ids, parents, hierarchy_path)

    columns = defaultdict(list)
    skipped = []
    for image_id, record in images.items():
        if image_id in bad_boxes:
            error = bad_boxes[image_id]
            skipped.append({"image_id": image_id, "path": f"{IMAGES_DIR}/{record.values[0]}",
                            "reason": f"{error.reason} ({Path(error.path).name} line "
                                      f"{error.line}: {error.value})"})
            continue
        class_id = labels[image_id].values[0]
        size = sizes[image_id].values if image_id in sizes else (None, None)
        if image_id in boxes:
            box = boxes[image_id].values
        elif size[0] is not None:
            box = (0.0, 0.0, size[0], size[1])      # no box: the whole image is the crop
        else:
            box = (None, None, None, None)          # whole image, size read at crop time
        columns["image_id"].append(image_id)
        columns["path"].append(f"{IMAGES_DIR}/{record.values[0]}")
        columns["class_id"].append(class_id)
        columns["label"].append(label_of[class_id])
        columns["is_train"].append(split[image_id].values[0] == 1)
        for name, value in zip(("bbox_x", "bbox_y", "bbox_w", "bbox_h"), box):
            columns[name].append(None if value is None else float(value))
        columns["width"].append(size[0])
        columns["height"].append(size[1])
        photographer = photographers.get(image_id)
        columns["photographer"].append(photographer.values[0] or None if photographer else None)
        columns["images_line"].append(record.line)
    table = pa.table({name: columns[name] for name in IMAGES_SCHEMA.names}, schema=IMAGES_SCHEMA)
    return Dataset(format=spec.name, root=root, images=table, classes=classes, taxonomy=taxonomy,
                   skipped=tuple(skipped))


def _check_choice(on_bad_image: str) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")


# --------------------------------------------------------------------------- image files

def _check_listing(images: dict, listing: Path) -> None:
    """Every images.txt path names a file under the root, and a file no other line names:
    one photo under two ids, one in train and one in test, would be tested on after being
    trained on."""
    first: dict[str, tuple[str, int]] = {}
    for image_id, record in images.items():
        rel = record.values[0]
        check_relative_path(rel, listing, record.line)
        seen = first.setdefault(posixpath.normpath(rel), (image_id, record.line))
        if seen[1] != record.line:
            raise DataError(listing, f"image {image_id!r} names the file of image {seen[0]!r} "
                                     f"(line {seen[1]}): one photo under two ids, which in two "
                                     f"splits would put a test photo in training; delete one "
                                     f"of the lines", line=record.line, value=rel)


def check_relative_path(rel: str, listing: Path, line: int) -> None:
    """An images.txt path must name a file under the dataset root by its letters alone: no
    absolute path, no ``..`` that climbs out (a dataset-level fault, never skipped)."""
    if _climbs_out(f"{IMAGES_DIR}/{rel}"):
        raise DataError(listing, "image path leaves the dataset root", line=line, value=rel)


def _climbs_out(rel: str) -> bool:
    lexical = os.path.normpath(rel)
    return os.path.isabs(rel) or lexical == ".." or lexical.startswith(".." + os.sep)


@functools.lru_cache(maxsize=64)
def _real(path: str) -> str:
    return os.path.realpath(path)


def _outside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    real, real_root = os.path.realpath(path), _real(os.fspath(root))
    return os.path.commonpath([real, real_root]) != real_root


def image_file(root: str | os.PathLike, rel: str, *, follow_symlinks: bool = False) -> Path:
    """The regular file a manifest path (``images/...``, relative to ``root``) names.

    Raises :class:`DataError` naming the path when it leads outside ``root`` (a ``..``, or,
    unless ``follow_symlinks``, a symbolic link inside the root that points elsewhere), is
    missing, or is not a regular file (a FIFO would block the reader forever).
    """
    path = Path(root) / rel
    if _climbs_out(rel):
        raise DataError(path, "image path leaves the dataset root through '..'")
    if not follow_symlinks and _outside(path, root):
        raise DataError(path, f"image path leads outside the dataset root {root} through a "
                              f"symbolic link (to {os.path.realpath(path)}); set "
                              f"dataset.follow_symlinks: true to read such files")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except OSError as exc:      # a name too long, a folder that cannot be listed, ...
        raise DataError(path, f"cannot open image file: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise DataError(path, "not a regular file (a folder, FIFO or device): not a photo")
    return path


def _folder_entries(directory: Path) -> dict[str, str] | None:
    """``name -> 'file' | 'link' | 'other'`` for the entries of ``directory`` (empty if it
    does not exist), from one listing: a regular file, a symbolic link (checked one by one),
    anything else. None when it cannot be listed (no permission, a name too long): its
    images are then looked at one by one, so each gets the operating system's reason."""
    try:
        with os.scandir(directory) as entries:
            return {entry.name: ("link" if entry.is_symlink() else
                                 "file" if entry.is_file(follow_symlinks=False) else "other")
                    for entry in entries}
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError:
        return None


def _image_problem(root: Path, rel: str, kind: str | None, folder_outside: bool,
                   follow_symlinks: bool) -> str | None:
    """Why a listed image cannot be read (None: it can), from its folder's listing."""
    if kind is None:
        return "image file not found"
    if kind == "file" and not (folder_outside and not follow_symlinks):
        return None
    try:
        image_file(root, rel, follow_symlinks=follow_symlinks)
    except DataError as error:
        return error.reason
    return None


def check_image_files(dataset: Dataset, root: str | os.PathLike | None = None, *,
                      on_bad_image: str = "error",
                      follow_symlinks: bool = False) -> tuple[Dataset, list[dict]]:
    """Confirm every listed image is a regular file under ``root`` (default: the dataset
    root); a symbolic link that leads outside it counts only with ``follow_symlinks``.

    Returns the dataset (minus the bad images when ``on_bad_image='skip'``, which are added
    to its ``skipped``) and a list of ``{image_id, path, reason}`` for each image dropped
    here. With ``'error'`` the first bad image raises a :class:`DataError` naming its
    images.txt line, path and reason.

    Each image folder is listed once instead of calling ``stat`` per image: 48k images live
    in a few hundred folders, and on network file systems one listing is far cheaper than
    hundreds of metadata round trips. Only symbolic links and odd entries are looked at one
    by one.
    """
    _check_choice(on_bad_image)
    root = Path(root) if root is not None else dataset.root
    paths = dataset.images.column("path").to_pylist()
    listings: dict[str, tuple[dict[str, str], bool]] = {}
    problems: dict[int, str] = {}
    for i, rel in enumerate(paths):
        folder, _, name = rel.rpartition("/")
        if folder not in listings:
            listings[folder] = (_folder_entries(root / folder), _outside(root / folder, root))
        entries, folder_outside = listings[folder]
        kind = "unlisted" if entries is None else entries.get(name)
        problem = _image_problem(root, rel, kind, folder_outside, follow_symlinks)
        if problem is not None:
            problems[i] = problem
    if not problems:
        return dataset, []

    image_ids = dataset.images.column("image_id").to_pylist()
    if on_bad_image == "error":
        first = min(problems)
        line = dataset.images.column("images_line")[first].as_py()
        raise DataError(dataset.images_file,
                        f"{problems[first]}: {root / paths[first]} "
                        f"({len(problems)} bad image file(s) in all)", line=line,
                        value=paths[first])
    skipped = [{"image_id": image_ids[i], "path": paths[i], "reason": reason}
               for i, reason in problems.items()]
    keep = np.ones(len(paths), dtype=bool)
    keep[list(problems)] = False
    return replace(dataset, images=dataset.images.filter(pa.array(keep)),
                   skipped=dataset.skipped + tuple(skipped)), skipped
