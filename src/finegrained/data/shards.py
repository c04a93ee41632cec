"""Crop shards: write them once on CPU, index them per split, read them for training.

A split's manifest is cut into ``N`` contiguous shards; shard ``i`` holds manifest rows
``[i*n//N, (i+1)*n//N)``. Each shard is a set of files sharing one stem::

    shard-00003.parquet       metadata: the manifest columns of the kept rows, ``row``, and
                              the content rectangle ``content_{x,y,w,h}`` of each crop
                              (the pixels outside it are letterbox padding)
    shard-00003.npy           (format 'npy') uint8 [count, S, S, 3], memory-mappable
    shard-00003.skipped.json  images left out: [{image_id, path, reason}], always written
    shard-00003.record.json   what the crop job wrote: each file's bytes and sha256, the
                              images' shape and dtype, the count

In format ``'parquet'`` there is no ``.npy``: the metadata file carries an ``image`` column
of PNG (lossless, default) or JPEG (q=95) bytes, a compact archive that is decoded on read.
The crop settings travel in the Parquet schema metadata under :data:`SHARD_METADATA_KEY`,
so :func:`write_split_index` can check that a split's shards agree.

A shard is trusted by its content, never by its name or date: the crop job records the
sha256 of every file it writes, :func:`write_split_index` checks each file against that
record before it lists the shard (so a shard edited after cropping is refused, not hashed
into the index), and :class:`ShardReader`, the one reader the training code uses, checks
the images' header and size before it maps them, and every hash with ``verify``.

The ``.npy`` is written through a file object, its full size reserved on the disk first: a
memory map of a file with unallocated blocks dies of SIGBUS when the disk fills, without a
word; here a full disk stops the job at once with one line naming the file, the bytes it
needs and the bytes free.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from finegrained.data.crop import ASPECTS, OVERFLOWS, Layout
from finegrained.data.imageio import decode_crop
from finegrained.data.manifest import read_manifest
from finegrained.data.readers import image_file
from finegrained.errors import ON_BAD_IMAGE, DataError
from finegrained.fileio import (atomic_output, check_sha256, parquet_bytes, read_json, reserve,
                                room_for, sha256_file, write_json, write_reserved)

SHARD_METADATA_KEY = b"finegrained.shard"
#: Per-crop columns of the rectangle that holds image pixels (x, y, w, h in the S x S crop).
CONTENT_COLUMNS = ("content_x", "content_y", "content_w", "content_h")
SHARD_FORMATS = ("npy", "parquet")
CODECS = ("png", "jpeg")
#: PNG zlib level: crops of photos barely compress beyond level 1, and level 6 is ~3x slower.
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 95


def shard_rows(num_rows: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of shard ``shard_index`` out of ``num_shards``."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} out of range for {num_shards} shards")
    return shard_index * num_rows // num_shards, (shard_index + 1) * num_rows // num_shards


def sibling_paths(meta_path: str | os.PathLike) -> tuple[Path, Path]:
    """The ``.npy`` images file and ``.skipped.json`` report that belong to a shard's metadata."""
    meta_path = Path(meta_path)
    stem = meta_path.with_suffix("")
    return stem.with_suffix(".npy"), stem.with_name(stem.name + ".skipped.json")


def record_path(meta_path: str | os.PathLike) -> Path:
    """The ``.record.json`` in which the crop job lists the files of a shard it wrote."""
    stem = Path(meta_path).with_suffix("")
    return stem.with_name(stem.name + ".record.json")


# ---------------------------------------------------------------------------------------------
# Writing


def write_shard(manifest_path: str | os.PathLike, dataset_root: str | os.PathLike,
                shard_index: int, num_shards: int, *, size: int, margin: float, aspect: str,
                overflow: str = "pad", max_squeeze: float = 1.0,
                fmt: str = "npy", codec: str = "png", on_bad_image: str = "error",
                follow_symlinks: bool = False, out_images: str | os.PathLike | None,
                out_meta: str | os.PathLike, out_skipped: str | os.PathLike) -> dict:
    """Crop one shard of a manifest and write its files atomically; return a small summary.

    With ``on_bad_image='error'`` the first bad image raises :class:`DataError` and no output
    file is created; with ``'skip'`` bad images are listed in ``out_skipped`` and left out.
    ``out_images`` is required for ``fmt='npy'`` and must be ``None`` for ``fmt='parquet'``.
    An image path that leads outside ``dataset_root`` (a symbolic link, unless
    ``follow_symlinks``) or names no regular file is a bad image (see ``readers.image_file``).
    """
    if fmt not in SHARD_FORMATS or codec not in CODECS or on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"bad shard options: fmt={fmt!r} codec={codec!r} "
                         f"on_bad_image={on_bad_image!r}")
    if (fmt == "npy") != (out_images is not None):
        raise ValueError("out_images is required for fmt='npy' and not used for 'parquet'")
    manifest = read_manifest(manifest_path)
    start, stop = shard_rows(manifest.num_rows, shard_index, num_shards)
    rows = manifest.slice(start, stop - start)
    if aspect not in ASPECTS or overflow not in OVERFLOWS:
        raise ValueError(f"bad crop options: aspect={aspect!r} overflow={overflow!r}")
    crop_options = {"size": int(size), "margin": float(margin), "aspect": aspect,
                    "overflow": overflow, "max_squeeze": float(max_squeeze)}
    settings = {**crop_options, "format": fmt,
                "codec": codec if fmt == "parquet" else None, "shard_index": int(shard_index),
                "num_shards": int(num_shards), "manifest_rows": [int(start), int(stop)]}

    out_record = record_path(out_meta)
    with contextlib.ExitStack() as stack:
        # Every output goes to a temp file; all are renamed only after the last crop succeeds.
        tmp_meta = stack.enter_context(atomic_output(out_meta))
        tmp_skipped = stack.enter_context(atomic_output(out_skipped))
        tmp_record = stack.enter_context(atomic_output(out_record))
        images = None
        if fmt == "npy":
            tmp_images = stack.enter_context(atomic_output(out_images))
            images = stack.enter_context(_NpyWriter(tmp_images, out_images, rows.num_rows, size))
        kept, encoded, skipped, contents = [], [], [], []
        for i, row in enumerate(rows.to_pylist()):
            try:
                crop, content = _crop_row(row, dataset_root, crop_options, follow_symlinks)
            except DataError as exc:
                if on_bad_image == "error":
                    raise DataError(exc.path, f"{exc.reason} (listed on line {row['images_line']}"
                                              f" of {Path(dataset_root) / 'images.txt'})",
                                    value=exc.value) from exc
                skipped.append({"image_id": row["image_id"], "path": row["path"],
                                "reason": exc.reason})
                continue
            if images is not None:
                images.append(crop)
            else:
                encoded.append(encode_image(crop, codec))
            kept.append(i)
            contents.append(content)

        written = {}                # final path -> (temporary, what the record adds)
        if images is not None:
            written[out_images] = (tmp_images, images.finish())
        meta = rows.take(pa.array(kept, type=pa.int64()))
        meta = meta.append_column("row", pa.array(np.arange(len(kept), dtype=np.int32)))
        for k, name in enumerate(CONTENT_COLUMNS):
            meta = meta.append_column(name, pa.array([c[k] for c in contents], pa.int32()))
        if fmt == "parquet":
            meta = meta.append_column("image", pa.array(encoded, type=pa.binary()))
        schema_meta = dict(meta.schema.metadata or {})
        schema_meta[SHARD_METADATA_KEY] = json.dumps(settings).encode()
        meta = meta.replace_schema_metadata(schema_meta)
        write_reserved(tmp_meta, out_meta, parquet_bytes(meta))
        written[out_meta] = (tmp_meta, {})
        write_reserved(tmp_skipped, out_skipped, (json.dumps(skipped, indent=2) + "\n").encode())
        written[out_skipped] = (tmp_skipped, {})
        record = {"count": len(kept),
                  "files": {Path(final).name: {"bytes": tmp.stat().st_size,
                                               "sha256": sha256_file(tmp), **extra}
                            for final, (tmp, extra) in written.items()}}
        write_reserved(tmp_record, out_record, (json.dumps(record, indent=2) + "\n").encode())
    return {"count": len(kept), "skipped": len(skipped), **settings}


def _crop_row(row: dict, dataset_root, crop_options: dict,
              follow_symlinks: bool) -> tuple[np.ndarray, Layout]:
    box = tuple(row[k] for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    if any(v is None for v in box):
        box = None
    width, height = row.get("width"), row.get("height")
    image_wh = (width, height) if width is not None and height is not None else None
    path = image_file(dataset_root, row["path"], follow_symlinks=follow_symlinks)
    return decode_crop(path, box, image_wh=image_wh,
                       **crop_options)


class _NpyWriter:
    """A uint8 ``[n, S, S, 3]`` ``.npy`` of at most ``capacity`` images, written one crop at a
    time through a file object into the temporary ``tmp`` of ``final``, its full size reserved
    first (:func:`~finegrained.fileio.reserve`). :meth:`finish` writes the header of the
    images actually appended (fewer when some were skipped) and cuts the file there."""

    def __init__(self, tmp: Path, final: str | os.PathLike, capacity: int, size: int):
        self.final, self.item_shape = final, (size, size, 3)
        self.offset = len(npy_header((capacity, *self.item_shape)))
        self.needed = self.offset + capacity * size * size * 3
        self.count = 0
        self.file = open(tmp, "r+b")
        reserve(self.file, self.needed, final)
        self.file.seek(self.offset)

    def __enter__(self) -> "_NpyWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def append(self, crop: np.ndarray) -> None:
        if crop.shape != self.item_shape or crop.dtype != np.uint8:
            raise ValueError(f"crop of {crop.dtype} {crop.shape}, not uint8 {self.item_shape}")
        with room_for(self.final, self.needed):
            self.file.write(np.ascontiguousarray(crop).data)
        self.count += 1

    def finish(self) -> dict:
        """Write the header and flush; return the shape and dtype for the shard's record."""
        shape = (self.count, *self.item_shape)
        with room_for(self.final, self.needed):
            self.file.seek(0)
            self.file.write(npy_header(shape, self.offset))
            self.file.truncate(self.offset + self.count * int(np.prod(self.item_shape)))
            self.file.flush()
        return {"shape": list(shape), "dtype": "uint8"}


def npy_header(shape: Sequence[int], length: int | None = None) -> bytes:
    """The ``.npy`` (format 1.0) header of a C-order uint8 array of ``shape``, padded with
    spaces to ``length`` bytes, or to numpy's own multiple of 64: the header of fewer images
    then fits the room left for that of more, and the pixels stay where they are."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}).encode()
    prefix = 10                         # magic string, version, 2-byte header length
    if length is None:
        length = -(-(prefix + len(text) + 1) // 64) * 64
    return (np.lib.format.magic(1, 0) + struct.pack("<H", length - prefix)
            + text.ljust(length - prefix - 1) + b"\n")


def encode_image(pixels: np.ndarray, codec: str) -> bytes:
    """Encode an ``H x W x 3`` uint8 array as PNG (lossless) or JPEG (q=95, 4:4:4)."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB")
    if codec == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif codec == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decode bytes written by :func:`encode_image` back to an RGB uint8 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Indexing


def read_shard_settings(meta_path: str | os.PathLike) -> dict:
    """The crop settings stored in a shard's Parquet schema metadata."""
    try:
        schema = pq.read_schema(meta_path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(meta_path, f"cannot read shard metadata: {exc}") from exc
    raw = (schema.metadata or {}).get(SHARD_METADATA_KEY)
    if raw is None:
        raise DataError(meta_path, "not a shard: no finegrained.shard schema metadata")
    return json.loads(raw)


def read_shard_record(meta_path: str | os.PathLike) -> dict:
    """The crop job's record of a shard (:func:`record_path`), once every file it lists has
    been found with the recorded size and sha256: a shard edited, truncated or replaced
    after its crop job wrote it is a :class:`DataError` naming the file, never hashed anew."""
    path = record_path(meta_path)
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        checks = [(path.parent / name, int(entry["bytes"]), str(entry["sha256"]))
                  for name, entry in files.items()
                  if Path(name).name == name]       # a record names files beside it only
        count = int(record["count"])
    except FileNotFoundError:
        raise DataError(path, "shard record not found: its crop job writes it with the "
                              "shard; delete the shard's files and rerun the crop phase") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(path, f"not a shard record: {exc!r}") from None
    if len(checks) != len(files) or Path(meta_path).name not in files or count < 0:
        raise DataError(path, "not a shard record of this shard", value=sorted(files))
    for file, size, digest in checks:
        fix = "delete the shard's files and rerun the crop phase to rebuild it"
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise DataError(file, f"shard file listed in {path.name} not found; {fix}") from None
        if actual != size:
            raise DataError(file, f"is {actual:,} bytes, its crop job wrote {size:,} "
                                  f"({path.name}): truncated or replaced since; {fix}")
        check_sha256(file, digest, f"its crop job's record {path.name}", fix)
    return record


def write_split_index(shard_meta_paths: Sequence[str | os.PathLike],
                      out_index: str | os.PathLike, split: str) -> dict:
    """Write the JSON index of a split's shards and return it.

    Paths in the index are relative to the index file's folder, so a results tree can move.
    Each shard lists its files with their sha256, its image count and the skipped images
    read from its ``.skipped.json`` (see :func:`sibling_paths`). Every file is checked
    against the record its crop job wrote (:func:`read_shard_record`) before it is listed.
    """
    out_index = Path(out_index)
    base = out_index.parent.resolve()
    shards, skipped_all, common = [], [], None
    for number, meta_path in enumerate(shard_meta_paths):
        meta_path = Path(meta_path)
        files = read_shard_record(meta_path)["files"]
        settings = read_shard_settings(meta_path)
        key = {k: settings.get(k) for k in ("size", "margin", "aspect", "overflow",
                                            "max_squeeze", "format", "codec")}
        if common is None:
            common = key
        elif key != common:
            raise DataError(meta_path, f"shard settings {key} differ from the split's {common}")
        images_path, skipped_path = sibling_paths(meta_path)
        count = pq.read_metadata(meta_path).num_rows
        entry = {"meta": _relative(meta_path, base),
                 "meta_sha256": files[meta_path.name]["sha256"],
                 "images": None, "images_sha256": None, "count": count}
        if settings["format"] == "npy":
            if images_path.name not in files:
                raise DataError(record_path(meta_path), "the shard's record lists no images "
                                                        "file", value=images_path.name)
            check_npy(images_path, count, settings["size"], f"shard {number} of split {split!r}")
            entry["images"] = _relative(images_path, base)
            entry["images_sha256"] = files[images_path.name]["sha256"]
        if skipped_path.name not in files:
            raise DataError(record_path(meta_path), "the shard's record lists no skipped "
                                                    "report", value=skipped_path.name)
        skipped = read_json(skipped_path, "shard skipped report")
        entry["skipped"] = len(skipped)
        skipped_all.extend({**s, "shard": _relative(meta_path, base)} for s in skipped)
        shards.append(entry)
    if common is None:
        raise DataError(out_index, f"no shards given for split {split!r}")
    index = {"split": split, "image_size": common["size"], "margin": common["margin"],
             "aspect": common["aspect"], "overflow": common["overflow"],
             "max_squeeze": common["max_squeeze"], "format": common["format"],
             "codec": common["codec"],
             "count": sum(s["count"] for s in shards), "num_shards": len(shards),
             "shards": shards, "num_skipped": len(skipped_all), "skipped": skipped_all}
    write_json(out_index, index)
    return index


def check_npy(path: Path, count: int, size: int, shard: str) -> None:
    """Before any memory map: the header of a shard's ``.npy`` must describe ``count``
    C-order uint8 ``size x size x 3`` images and the file must hold exactly their bytes, or
    a :class:`DataError` names the file (``shard`` says which shard it is)."""
    expected = (count, size, size, 3)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise DataError(path, f"{shard}: not a readable .npy array ({exc}); delete it and "
                              f"rerun the crop phase") from None
    if tuple(shape) != expected or dtype != np.uint8 or fortran_order:
        raise DataError(path, f"{shard}: holds {dtype} {tuple(shape)}, not the uint8 "
                              f"{expected} its index lists; delete it and rerun the crop phase")
    need, actual = offset + int(np.prod(expected)), os.path.getsize(path)
    if actual != need:
        raise DataError(path, f"{shard}: is {actual:,} bytes, its header of {expected} needs "
                              f"{need:,}: truncated or extended; delete it and rerun the crop "
                              f"phase")


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base)


# ---------------------------------------------------------------------------------------------
# Reading


class ShardReader:
    """Read a split's shards through its index: labels, metadata, images and batches.

    Images of format 'npy' are memory-mapped (each shard opened once per reader), so opening
    a split costs nothing and batches read only the rows they need. Format 'parquet' shards
    keep their encoded column (the compact on-disk size) once read and decode only the rows
    a batch asks for, so decoded pixels of a whole split are never held in memory; the
    training loop calls :meth:`gather` on its input thread, so decoding overlaps the steps.
    """

    def __init__(self, index_path: str | os.PathLike, *, verify: bool = False):
        """Open a split through its ``index.json``.

        Every shard file must exist, each metadata file must hold its shard's count of rows
        and each ``.npy`` the header and size of its count of images (:func:`check_npy`):
        a truncated or reshaped shard is a :class:`DataError` naming it, before any memory
        map. With ``verify`` (config ``shards.verify``; training, feature and evaluation
        jobs pass it) each file's sha256 is checked against the index once, here, streamed
        (constant memory) and with up to 8 files hashed in parallel (about 2 s per GB per
        core on the development machine); a mismatch raises :class:`DataError` naming the
        shard file.
        """
        self.index_path = Path(index_path)
        try:
            self.index = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            raise DataError(self.index_path, "shard index not found") from None
        except json.JSONDecodeError as exc:
            raise DataError(self.index_path, f"shard index is not JSON: {exc}") from exc
        base = self.index_path.parent
        self.image_size = int(self.index["image_size"])
        self.format = self.index["format"]
        self._meta_paths, self._image_paths = [], []
        listed = []                      # (shard number, path, recorded sha256)
        for number, shard in enumerate(self.index["shards"]):
            meta_path = base / shard["meta"]
            image_path = base / shard["images"] if shard.get("images") else None
            listed.append((number, meta_path, shard["meta_sha256"]))
            if image_path is not None:
                listed.append((number, image_path, shard.get("images_sha256")))
            self._meta_paths.append(meta_path)
            self._image_paths.append(image_path)
        for _, path, _ in listed:
            if not path.exists():
                raise DataError(path, f"shard file listed in {self.index_path} not found")
        if verify:
            self._verify(listed)
        counts = [int(s["count"]) for s in self.index["shards"]]
        for number, (meta_path, image_path) in enumerate(zip(self._meta_paths,
                                                             self._image_paths)):
            shard = f"shard {number} of split {self.index.get('split')!r}"
            with _reading(meta_path):
                rows = pq.read_metadata(meta_path).num_rows
            if rows != counts[number]:
                raise DataError(meta_path, f"{shard}: holds {rows} rows, {self.index_path} "
                                           f"lists {counts[number]}; rerun the crop phase")
            if image_path is not None:
                check_npy(image_path, counts[number], self.image_size, shard)
        #: offsets[i] is the global index of shard i's first image; offsets[-1] == len(self).
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._mmaps: dict[int, np.ndarray] = {}
        self._encoded: dict[int, pa.Array] = {}

    def _verify(self, listed: list[tuple[int, Path, str]]) -> None:
        # hashlib releases the GIL on large blocks: threads hash the files side by side.
        workers = max(1, min(8, os.cpu_count() or 1, len(listed)))
        with ThreadPoolExecutor(workers) as pool:
            actual = list(pool.map(sha256_file, [path for _, path, _ in listed]))
        for (number, path, digest), got in zip(listed, actual):
            if got != digest:
                raise DataError(
                    path, f"shard {number} of split {self.index.get('split')!r} was changed "
                          f"after indexing: its sha256 is {got}, {self.index_path} records "
                          f"{digest}; delete it and rerun the crop phase to rebuild it (or set "
                          f"shards.verify: false to skip this check)")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self._meta_paths)

    @cached_property
    def meta(self) -> pa.Table:
        """All shards' metadata in order (without the encoded ``image`` column)."""
        tables = []
        for path in self._meta_paths:
            with _reading(path):
                names = [n for n in pq.read_schema(path).names if n != "image"]
                tables.append(pq.read_table(path, columns=names))
        return pa.concat_tables(tables)

    @cached_property
    def labels(self) -> np.ndarray:
        """int32 labels of all images, in shard order."""
        parts = []
        for path in self._meta_paths:
            with _reading(path):
                parts.append(pq.read_table(path, columns=["label"]).column("label")
                             .to_numpy(zero_copy_only=False))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def shard_content(self, i: int) -> np.ndarray:
        """int32 ``[count, 4]`` content rectangles ``(x, y, w, h)`` of shard ``i``'s crops:
        the pixels outside them are padding."""
        path = self._meta_paths[i]
        with _reading(path):
            names = pq.read_schema(path).names
        missing = [c for c in CONTENT_COLUMNS if c not in names]
        if missing:
            raise DataError(path, f"shard has no content columns ({', '.join(missing)}); "
                                  f"rerun the crop phase")
        with _reading(path):
            table = pq.read_table(path, columns=list(CONTENT_COLUMNS))
        return np.stack([table.column(c).to_numpy() for c in CONTENT_COLUMNS],
                        axis=1).astype(np.int32).reshape(-1, 4)

    def shard_arrays(self, i: int) -> np.ndarray:
        """uint8 ``[count, S, S, 3]`` images of shard ``i`` (memory-mapped for 'npy';
        decoded in full for 'parquet', which :meth:`gather` avoids)."""
        if self.format == "npy":
            return self._mmap(i)
        return self._decode_rows(i, np.arange(self.offsets[i + 1] - self.offsets[i]))

    def _mmap(self, i: int) -> np.ndarray:
        if i not in self._mmaps:
            count = int(self.offsets[i + 1] - self.offsets[i])
            self._mmaps[i] = (np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
                              if count == 0 else np.load(self._image_paths[i], mmap_mode="r"))
        return self._mmaps[i]

    def _decode_rows(self, i: int, rows: np.ndarray) -> np.ndarray:
        path = self._meta_paths[i]
        if i not in self._encoded:
            with _reading(path):
                table = pq.read_table(path, columns=["image"])
            self._encoded[i] = table.column("image").combine_chunks()
        column = self._encoded[i]
        out = np.empty((len(rows), self.image_size, self.image_size, 3), np.uint8)
        for j, row in enumerate(rows):
            try:
                out[j] = decode_image(column[int(row)].as_py())
            except (OSError, ValueError) as exc:      # undecodable, or not S x S x 3
                raise DataError(path, f"shard {i}, row {int(row)}: cannot decode the stored "
                                      f"crop ({exc}); rerun the crop phase") from None
        return out

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All images ``uint8 [N, S, S, 3]`` and labels ``int32 [N]`` in memory."""
        return self.gather(np.arange(len(self))), self.labels

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Images at global ``indices`` (any order), read shard by shard in ascending order."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        bounds = np.searchsorted(ordered, self.offsets)
        for shard in range(self.num_shards):
            lo, hi = bounds[shard], bounds[shard + 1]
            if lo == hi:
                continue
            local = ordered[lo:hi] - self.offsets[shard]
            if self.format != "npy":
                out[order[lo:hi]] = self._decode_rows(shard, local)
                continue
            images = self._mmap(shard)
            if np.all(np.diff(local) == 1):  # a contiguous run (no repeats): slice, no fancy index
                out[order[lo:hi]] = images[local[0]:local[-1] + 1]
            else:
                out[order[lo:hi]] = images[local]
        return out

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     drop_remainder: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(images uint8 [B, S, S, 3], labels int32 [B])`` covering the split once.

        With ``shuffle`` the order is a permutation drawn from ``seed`` (pass a new seed each
        epoch); the last partial batch is dropped when ``drop_remainder``.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        n = len(self)
        order = (np.random.default_rng(seed).permutation(n) if shuffle
                 else np.arange(n, dtype=np.int64))
        labels = self.labels
        stop = n - n % batch_size if drop_remainder else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield self.gather(idx), labels[idx]


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A failure to read a shard's Parquet file in the block is a :class:`DataError` naming it."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise DataError(path, f"cannot read shard metadata ({exc}); rerun the crop "
                              f"phase") from None
