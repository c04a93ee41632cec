"""Write the train/val/test manifests and class tables of a NABirds or CUB dataset folder.

Example:
    python scripts/prepare_manifests.py --format cub --root ../shared/data/cub50 \
        --out-dir results/manifests
"""

from __future__ import annotations

import argparse
import sys

from finegrained.data.manifest import prepare_manifests
from finegrained.data.readers import DATASET_FORMATS
from finegrained.errors import ON_BAD_IMAGE, DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=sorted(DATASET_FORMATS),
                        help="annotation format of the dataset folder")
    parser.add_argument("--root", required=True, help="dataset folder holding images.txt")
    parser.add_argument("--out-dir", required=True, help="where the manifests are written")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class's train images held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and row order")
    parser.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default="error",
                        help="what to do with an image whose file is missing or whose box "
                             "cannot be cropped: stop, or skip it and list it")
    parser.add_argument("--no-check-files", dest="check_files", action="store_false",
                        help="do not look for the image files (annotations only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = prepare_manifests(args.format, args.root, args.out_dir,
                                    val_fraction=args.val_fraction, seed=args.seed,
                                    on_bad_image=args.on_bad_image, check_files=args.check_files)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{summary['format']}: {summary['images']} images, {summary['classes']} classes, "
          f"train {summary['train']} / val {summary['val']} / test {summary['test']}, "
          f"{summary['skipped']} skipped -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
