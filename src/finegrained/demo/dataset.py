"""Writing a synthetic dataset in exact NABirds format, for the embedded demo.

The demo must run anywhere in minutes, without downloading photos, and still show what the
real pipeline shows: that a backbone pretrained on *other* birds transfers to a
fine-grained target task. :func:`generate_demo_dataset` designs the species
(:mod:`~finegrained.demo.taxonomy`), draws their photos (:mod:`~finegrained.demo.draw`) and
writes them with the NABirds annotation files (UUID image ids,
``images/<4-digit class>/<uuid hex>.jpg``, integer ``x y w h`` boxes, a class hierarchy with
non-contiguous ids). Everything is seeded: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from finegrained.demo.draw import render_image, sample_scene
from finegrained.demo.taxonomy import (DEFAULTS, FEATURES, VARIANT_CODE, Taxonomy,
                                       check_variant, design_taxonomy)
from finegrained.fileio import remove_stale_directories

JPEG_QUALITY = 90
#: Fictional photographers' names, for photographers.txt.
_FIRST = ["Ada", "Ben", "Chloe", "Dario", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas",
          "Kavya", "Luis", "Mara", "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Sami", "Tove"]
_LAST = ["Alder", "Birch", "Crane", "Dunlin", "Egret", "Fernsby", "Gull", "Heron", "Ibis",
         "Jay", "Kestrel", "Linnet", "Merlin", "Nightly", "Osprey", "Plover", "Rook", "Swift"]


def _photographers(seed: int, variant: str) -> list[str]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, VARIANT_CODE[variant], 2]))
    pairs = rng.choice(len(_FIRST) * len(_LAST), size=24, replace=False)
    return [f"{_FIRST[p // len(_LAST)]} {_LAST[p % len(_LAST)]}" for p in pairs]


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(c)


def _species_json(tax: Taxonomy, variant: str, seed: int) -> dict:
    genus_fields = ("body", "belly", "wing", "bill_colour", "legs")
    return {
        "variant": variant, "seed": seed,
        "feature_values": {f: list(v) for f, v in FEATURES.items()},
        "species": [{
            "class_id": s.class_id, "name": s.name,
            "genus": tax.names[tax.lineage[s.class_id]["genus"]],
            "family": tax.names[tax.lineage[s.class_id]["family"]],
            "order": tax.names[tax.lineage[s.class_id]["order"]],
            "lineage_ids": tax.lineage[s.class_id],
            "features": s.features, "distinguishing": list(s.varying),
            "genus_colours": {k: _hex(getattr(s.genus, k)) for k in genus_fields},
        } for s in tax.species],
    }


_README = """\
SYNTHETIC demo dataset ({variant}) -- not real birds.

Made by finegrained.demo.generate_demo_dataset(variant={variant!r}, num_classes={num_classes},
train_per_class={train_per_class}, test_per_class={test_per_class}, min_side={min_side},
max_side={max_side}, seed={seed}). The same arguments give byte-identical files.

Layout and file formats are exactly those of NABirds: images.txt, image_class_labels.txt,
train_test_split.txt (1 = train), bounding_boxes.txt (integer x y w h), sizes.txt (w h),
classes.txt, hierarchy.txt (child parent), photographers.txt (fictional names), and JPEG
photos under images/<4-digit class id>/<image uuid without dashes>.jpg.

Each photo is a procedurally drawn songbird on a random background (blurred gradient, blobs,
leaves, twigs, berries), with random size ({min_side}..{max_side} px per side), scale,
position, mirror, rotation, lighting and noise; the box is the exact extent of the drawn bird.
Taxonomy: 0 Birds -> orders -> families -> genera -> species; only species label images.
Species of one genus share colours and shape and differ only in one or two details: wing-bar
colour, eye ring, bill length, tail shape or crown colour. species.json lists every species'
details ("distinguishing" = the details that separate it from its congeners).
{num_images} images: {num_train} train, {num_test} test, {num_classes} species.
"""


def generate_demo_dataset(out_dir: str | os.PathLike, *, variant: str = "target",
                          num_classes: int | None = None, train_per_class: int | None = None,
                          test_per_class: int | None = None, min_side: int = 96,
                          max_side: int = 192, seed: int = 0) -> dict:
    """Write a synthetic NABirds-format dataset to ``out_dir``; return a summary dict.

    ``None`` counts take the variant's defaults (:data:`DEFAULTS`). The dataset is built in a
    temporary folder beside ``out_dir`` and renamed into place at the end, replacing any
    previous ``out_dir``, so a failure never leaves a partial dataset.
    """
    check_variant(variant)
    args = {"num_classes": num_classes, "train_per_class": train_per_class,
            "test_per_class": test_per_class}
    args = {k: DEFAULTS[variant][k] if v is None else int(v) for k, v in args.items()}
    if args["train_per_class"] < 1 or args["test_per_class"] < 0:
        raise ValueError(f"need train_per_class >= 1 and test_per_class >= 0, got {args}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    start = time.perf_counter()
    tax = design_taxonomy(variant, args["num_classes"], seed)
    photographers = _photographers(seed, variant)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_directories(out_dir)       # of a generator killed before it could clean up
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        rows = []
        per_class = args["train_per_class"] + args["test_per_class"]
        for sp in tax.species:
            folder = tmp / "images" / f"{sp.class_id:04d}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                # One seed per (class, index): a photo does not change when counts change.
                rng = np.random.default_rng(np.random.SeedSequence(
                    [seed, VARIANT_CODE[variant], 1, sp.class_id, k]))
                image_id = uuid.UUID(bytes=rng.bytes(16), version=4)
                photographer = photographers[rng.integers(len(photographers))]
                scene = sample_scene(rng, min_side, max_side)
                pixels, box = render_image(sp, scene)
                Image.fromarray(pixels).save(folder / f"{image_id.hex}.jpg", quality=JPEG_QUALITY,
                                             subsampling=0)
                rows.append((str(image_id), sp.class_id, int(k < args["train_per_class"]), box,
                             (scene.width, scene.height), photographer))
        rows.sort()     # NABirds lists images in UUID order
        _write_annotations(tmp, rows, tax)
        species_info = _species_json(tax, variant, seed)
        (tmp / "species.json").write_text(json.dumps(species_info, indent=2) + "\n")
        summary = {
            "variant": variant, "seed": seed, "min_side": min_side, "max_side": max_side, **args,
            "num_images": len(rows), "num_train": sum(r[2] for r in rows),
            "num_test": sum(1 - r[2] for r in rows),
            "leaf_class_ids": [s.class_id for s in tax.species],
            "num_class_ids": len(tax.names),
        }
        (tmp / "README.txt").write_text(_README.format(**summary))
        os.chmod(tmp, 0o755)    # mkdtemp makes it private; a dataset should be readable
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out_dir"] = str(out_dir)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _write_annotations(root: Path, rows: list, tax: Taxonomy) -> None:
    def write(name, lines):
        (root / name).write_text("".join(line + "\n" for line in lines))

    write("images.txt", (f"{i} {c:04d}/{i.replace('-', '')}.jpg" for i, c, *_ in rows))
    write("image_class_labels.txt", (f"{i} {c}" for i, c, *_ in rows))
    write("train_test_split.txt", (f"{i} {t}" for i, _, t, *_ in rows))
    write("bounding_boxes.txt", (f"{r[0]} {' '.join(map(str, r[3]))}" for r in rows))
    write("sizes.txt", (f"{r[0]} {r[4][0]} {r[4][1]}" for r in rows))
    write("photographers.txt", (f"{r[0]} {r[5]}" for r in rows))
    write("classes.txt", (f"{c} {n}" for c, n in tax.names.items()))
    write("hierarchy.txt", (f"{c} {p}" for c, p in tax.parents.items()))


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest``; an old ``dest`` is moved aside first and deleted after."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
