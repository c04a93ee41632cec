"""A NABirds stand-in for the benchmarks: real geometry, synthetic photos.

``sample_geometry`` draws (width, height, box) triples from the real annotation files in
``../shared/data/nabirds_annotations`` (no photos there); ``write_standin`` writes a
NABirds-format folder for such a sample (the real ids, labels, boxes, sizes and class
files; textured random JPEGs at quality 90 in place of the photos) and its manifest, so the
crop phase, the loaders and the pipeline read it exactly as they read the real dataset.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

#: Files copied whole (class names and taxonomy); the per-image files are subset.
CLASS_FILES = ("classes.txt", "hierarchy.txt")
IMAGE_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt",
               "bounding_boxes.txt", "sizes.txt")


def _read(path: Path) -> dict[str, list[str]]:
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts:
            out[parts[0]] = parts[1:]
    return out


def all_geometry(annotations: Path) -> list[tuple]:
    """(width, height, box) of every NABirds image, in id order."""
    sizes, boxes = _read(annotations / "sizes.txt"), _read(annotations / "bounding_boxes.txt")
    return [(*map(int, sizes[i]), tuple(map(int, boxes[i]))) for i in sorted(sizes)]


def sample_ids(annotations: Path, count: int, seed: int) -> list[str]:
    """``count`` random image ids (sorted id order, then a seeded choice)."""
    ids = sorted(_read(annotations / "sizes.txt"))
    picked = np.random.default_rng(seed).choice(len(ids), size=count, replace=False)
    return [ids[i] for i in picked]


def sample_geometry(annotations: Path, count: int, seed: int) -> list[tuple]:
    """``count`` random (width, height, box) triples from NABirds sizes/bounding_boxes."""
    geometry = all_geometry(annotations)
    picked = np.random.default_rng(seed).choice(len(geometry), size=count, replace=False)
    return [geometry[i] for i in picked]


def textured_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus fine grain (like foliage): compresses like a photo, unlike
    flat colour or white noise."""
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.int16)
    image = image + rng.normal(0, 10, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_jpegs(folder: Path, geometry: list[tuple], seed: int) -> list[tuple[Path, tuple]]:
    """One quality-90 JPEG per (width, height, box); returns ``[(path, box)]``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for k, (w, h, box) in enumerate(geometry):
        path = folder / f"{k:05d}.jpg"
        textured_image(rng, w, h).save(path, quality=90)
        items.append((path, box))
    return items


def write_standin(annotations: Path, root: Path, count: int, seed: int = 0) -> Path:
    """A NABirds-format dataset of ``count`` real annotation rows with synthetic photos at
    ``root``; returns the path of a manifest listing every image (``root/manifest/all.parquet``,
    train and test rows together, in the pipeline's shuffled order)."""
    from finegrained.data.manifest import write_manifests
    from finegrained.data.readers import read_dataset

    root.mkdir(parents=True, exist_ok=True)
    ids = set(sample_ids(annotations, count, seed))
    for name in CLASS_FILES:
        shutil.copy(annotations / name, root / name)
    for name in IMAGE_FILES:
        lines = [line for line in (annotations / name).read_text().splitlines()
                 if line.split(" ", 1)[0] in ids]
        (root / name).write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(seed + 1)
    sizes = _read(root / "sizes.txt")
    for image_id, (rel,) in _read(root / "images.txt").items():
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        textured_image(rng, *map(int, sizes[image_id])).save(path, quality=90)
    out = root / "manifest"
    write_manifests(read_dataset("nabirds", root), out, val_fraction=0.0, check_files=False)
    both = pa.concat_tables([pq.read_table(out / f"{s}.parquet") for s in ("train", "test")])
    pq.write_table(both, out / "all.parquet")
    return out / "all.parquet"


def write_shards(manifest: Path, root: Path, out_dir: Path, num_shards: int, *,
                 fmt: str = "npy", codec: str = "png", size: int = 256,
                 margin: float = 0.15, workers: int = 1) -> Path:
    """The crop phase over ``manifest`` into ``num_shards`` shards (``workers`` processes,
    one shard per job as Snakemake runs them) and the split index; returns the index."""
    from concurrent.futures import ProcessPoolExecutor

    from finegrained.data.shards import write_split_index

    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [dict(manifest_path=manifest, dataset_root=root, shard_index=i,
                 num_shards=num_shards, size=size, margin=margin, aspect="square", fmt=fmt,
                 codec=codec, out_images=out_dir / f"shard-{i:05d}.npy" if fmt == "npy" else None,
                 out_meta=out_dir / f"shard-{i:05d}.parquet",
                 out_skipped=out_dir / f"shard-{i:05d}.skipped.json") for i in range(num_shards)]
    if workers == 1:
        for job in jobs:
            _crop_job(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_crop_job, jobs))
    return _index(out_dir, num_shards, write_split_index)


def _crop_job(job: dict) -> dict:
    from finegrained.data.shards import write_shard
    return write_shard(**job)


def _index(out_dir: Path, num_shards: int, write_split_index) -> Path:
    index = out_dir / "index.json"
    write_split_index([out_dir / f"shard-{i:05d}.parquet" for i in range(num_shards)], index,
                      "train")
    return index


def write_random_split(root: Path, count: int, size: int = 256, num_classes: int = 555,
                       shards: int = 4, seed: int = 0) -> Path:
    """A split of random uint8 pixels as NPY shards with labels (the content does not
    change what reading or a forward pass costs); returns its ``index.json``."""
    import json

    import pyarrow as pa
    from finegrained.fileio import sha256_file

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for s in range(shards):
        n = count // shards + (s < count % shards)
        meta, npy = root / f"shard-{s:05d}.parquet", root / f"shard-{s:05d}.npy"
        pq.write_table(pa.table({"label": rng.integers(0, num_classes, n).astype(np.int32)}),
                       meta)
        np.save(npy, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
        entries.append({"meta": meta.name, "meta_sha256": sha256_file(meta),
                        "images": npy.name, "images_sha256": sha256_file(npy), "count": n})
    index = root / "index.json"
    index.write_text(json.dumps({"split": "train", "image_size": size, "format": "npy",
                                 "count": count, "shards": entries}))
    return index
