"""Crop-phase throughput on one core: bare decode vs a naive crop loop vs ``load_crop``.

Builds stand-in JPEGs with real NABirds geometry (image sizes and boxes sampled from the
shared annotation files; textured random content, quality 90) in a temporary folder, then
times each path over all of them on a single CPU core and writes
``benchmarks/results/crop_throughput.json``.

If ``simplejpeg`` is importable, it is timed too (libjpeg-turbo DCT scaling without
Pillow), to show whether a second decoder would pay off. Region-only decoding
(``jpeg_crop_scanline``) needs the system ``libturbojpeg`` (PyTurboJPEG) and is not timed.

It also counts, on the geometry of all 48,562 NABirds images (no photos needed), how many
crops are letterboxed and what fraction of crop pixels is padding, with the square rule from
before issue #9 (clamp, then pad) and today's (shrink the context first; ``pad`` or
``squeeze`` for boxes longer than the photo's short side), and how many square windows the
old rounded draft mapping turned into (n+1) x n regions.

    python benchmarks/crop_throughput.py [--images 400] [--shared ../shared] [--geometry-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

from finegrained.data.crop import (crop_window, jpeg_draft_factor, letterbox_geometry,
                                   padded_pixels)
from finegrained.data.imageio import load_crop

REPO = Path(__file__).resolve().parents[1]
SIZE, MARGIN, ASPECT = 256, 0.15, "square"


def all_geometry(annotations: Path) -> list[tuple]:
    """(width, height, box) of every NABirds image, in id order."""
    sizes = dict(_read(annotations / "sizes.txt"))
    boxes = dict(_read(annotations / "bounding_boxes.txt"))
    return [(*sizes[i], boxes[i]) for i in sorted(sizes)]


def sample_geometry(annotations: Path, count: int, seed: int) -> list[tuple]:
    """``count`` random (width, height, box) triples from NABirds sizes/bounding_boxes."""
    geometry = all_geometry(annotations)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(geometry), size=count, replace=False)
    return [geometry[i] for i in picked]


# --------------------------------------------------------------------------- geometry only
# Padding and draft-stripe counts need no photos: the windows follow from sizes + boxes.

def window_before_issue_9(box, image_wh):
    """The square rule before issue #9: a square longer than the photo was clamped to it
    (and letterboxed), never shrunk."""
    x, y, w, h = box
    side = max(1, int(round(max(w, h) * (1 + 2 * MARGIN))))
    spans = []
    for centre, limit in ((x + w / 2, image_wh[0]), (y + h / 2, image_wh[1])):
        if side >= limit:
            spans.append((0, limit))
        else:
            start = min(max(int(round(centre - side / 2)), 0), limit - side)
            spans.append((start, start + side))
    return spans[0][0], spans[1][0], spans[0][1], spans[1][1]


def rounded_draft_region(window, image_wh):
    """Size of the scaled region before issue #9, which rounded left/top down and right/bottom
    up independently (today the window maps exactly: a square stays square)."""
    left, top, right, bottom = window
    f = jpeg_draft_factor(image_wh, (right - left, bottom - top), SIZE)
    w, h = -(-image_wh[0] // f), -(-image_wh[1] // f)
    new_left, new_top = min(left // f, w - 1), min(top // f, h - 1)
    return (max(min(-(-right // f), w), new_left + 1) - new_left,
            max(min(-(-bottom // f), h), new_top + 1) - new_top)


def padding_on_real_geometry(geometry) -> dict:
    """Letterboxed crops and padded pixels over every image, before and after issue #9."""
    rules = {
        "before_clamp_square": (window_before_issue_9, 1.0),
        "after_pad": (lambda b, wh: crop_window(b, wh, MARGIN, ASPECT), 1.0),
        "after_squeeze_1.333": (lambda b, wh: crop_window(b, wh, MARGIN, ASPECT), 1.333),
    }
    report = {"images": len(geometry)}
    for name, (rule, squeeze) in rules.items():
        crops = pixels = 0
        for w, h, box in geometry:
            left, top, right, bottom = rule(box, (w, h))
            pad = padded_pixels(letterbox_geometry((right - left, bottom - top), SIZE, squeeze),
                                SIZE)
            crops += pad > 0
            pixels += pad
        report[name] = {"padded_crops": int(crops),
                        "padded_crops_percent": round(100 * crops / len(geometry), 2),
                        "padded_pixels_percent": round(100 * pixels / (len(geometry) * SIZE ** 2), 2)}
    stripes = 0
    for w, h, box in geometry:
        left, top, right, bottom = window_before_issue_9(box, (w, h))
        if right - left == bottom - top:
            region_w, region_h = rounded_draft_region((left, top, right, bottom), (w, h))
            stripes += region_w != region_h
    report["draft_stripe_crops"] = {"before": stripes, "after": 0,
                                    "note": "square windows decoded at reduced scale that "
                                            "became (n+1) x n; the exact mapping has none"}
    return report


def _read(path: Path):
    for line in path.read_text().splitlines():
        parts = line.split()
        yield parts[0], tuple(int(v) for v in parts[1:])


def make_jpegs(folder: Path, geometry: list[tuple], seed: int) -> list[tuple[Path, tuple]]:
    """Write textured JPEGs (smooth colour fields + fine grain, like foliage) of each size."""
    rng = np.random.default_rng(seed)
    items = []
    for k, (w, h, box) in enumerate(geometry):
        coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC),
                           dtype=np.int16)
        image = image + rng.normal(0, 10, (h, w, 1)).astype(np.int16)
        path = folder / f"{k:04d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        items.append((path, box))
    return items


def bare_decode(path, box):
    with Image.open(path) as im:
        im.load()


def naive_crop(path, box):
    with Image.open(path) as im:
        im = im.convert("RGB")
        window = crop_window(box, im.size, MARGIN, ASPECT)
        return np.asarray(im.crop(window).resize((SIZE, SIZE), Image.Resampling.LANCZOS))


def our_crop(path, box):
    return load_crop(path, box, SIZE, MARGIN, ASPECT)


def simplejpeg_crop(path, box):
    import simplejpeg
    data = path.read_bytes()
    w, h = simplejpeg.decode_jpeg_header(data)[:2]
    left, top, right, bottom = crop_window(box, (w, h), MARGIN, ASPECT)
    shrink = max(right - left, bottom - top) / SIZE
    pixels = simplejpeg.decode_jpeg(data, min_width=int(np.ceil(w / shrink)),
                                    min_height=int(np.ceil(h / shrink)))
    sy, sx = h / pixels.shape[0], w / pixels.shape[1]
    region = Image.fromarray(pixels).crop((int(left / sx), int(top / sy),
                                           int(np.ceil(right / sx)), int(np.ceil(bottom / sy))))
    return np.asarray(region.resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=2.0))


def quality_drift(items) -> float:
    """Mean |load_crop - naive| (0..255) over images whose window is square.

    Windows clamped to a non-square shape are letterboxed by ``load_crop`` but stretched by
    the naive path, so only square ones compare like with like.
    """
    diffs = []
    for path, box in items:
        with Image.open(path) as im:
            left, top, right, bottom = crop_window(box, im.size, MARGIN, ASPECT)
        if right - left == bottom - top:
            diffs.append(np.abs(our_crop(path, box).astype(int) - naive_crop(path, box)).mean())
    return float(np.mean(diffs))


def time_path(fn, items, repeats: int) -> dict:
    fn(*items[0])  # warm-up: imports, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path, box in items:
            fn(path, box)
        best = min(best, time.perf_counter() - start)
    return {"images_per_s": round(len(items) / best, 1), "ms_per_image": round(1e3 * best / len(items), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2, help="best of N passes")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--geometry-only", action="store_true",
                        help="only the padding figures on the real geometry (no photos, no "
                             "timing); merged into an existing results file")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                        "crop_throughput.json")
    args = parser.parse_args(argv)
    annotations = args.shared / "data" / "nabirds_annotations"
    if not annotations.exists():
        print(f"skipping: {annotations} not found", file=sys.stderr)
        return 0
    padding = padding_on_real_geometry(all_geometry(annotations))
    print(json.dumps(padding, indent=2))
    if args.geometry_only:
        if args.out.exists():
            report = json.loads(args.out.read_text())
            report["padding_real_geometry"] = padding
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    paths = {"bare_decode": bare_decode, "naive_open_crop_resize": naive_crop,
             "load_crop": our_crop}
    try:
        import simplejpeg  # noqa: F401
        paths["simplejpeg_scaled_crop"] = simplejpeg_crop
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        items = make_jpegs(Path(tmp), sample_geometry(annotations, args.images, seed=0), seed=1)
        mean_kb = np.mean([p.stat().st_size for p, _ in items]) / 1024
        results = {name: time_path(fn, items, args.repeats) for name, fn in paths.items()}
        drift = quality_drift(items[:50])
    report = {
        "images": len(items), "output_size": SIZE, "margin": MARGIN, "aspect": ASPECT,
        "mean_file_kb": round(float(mean_kb), 1), "cores": 1,
        "load_crop_vs_naive_mean_abs_diff_square_windows": round(float(drift), 3),
        "speedup_load_crop_vs_naive": round(results["load_crop"]["images_per_s"]
                                            / results["naive_open_crop_resize"]["images_per_s"], 2),
        "results": results,
        "padding_real_geometry": padding,
        "environment": {"python": platform.python_version(), "pillow": PIL.__version__,
                        "libjpeg_turbo": features.version("jpg"), "cpu": platform.processor()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
