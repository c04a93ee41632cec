"""Write the train/val/test manifests and class tables of a NABirds or CUB dataset folder.

Example (the workflow's `manifests` rule resolves the settings from the config):
    python scripts/prepare_manifests.py --root ../shared/data/cub50 --out-dir results/manifests \
        --settings '{"format": "cub", "val_fraction": 0.1, "split_seed": 0,
                     "on_bad_image": "error", "check_files": true, "follow_symlinks": false,
                     "duplicate_photos": "error", "test_only_classes": "error"}'
"""

from __future__ import annotations

import argparse
import sys

from finegrained import job_runner
from finegrained.data.manifest import prepare_manifests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True,
                        help="JSON (or @file): format, val_fraction, split_seed, on_bad_image, "
                             "check_files, follow_symlinks, duplicate_photos, test_only_classes "
                             "(finegrained.plan.jobs.manifests)")
    parser.add_argument("--root", required=True, help="dataset folder holding images.txt")
    parser.add_argument("--out-dir", required=True, help="where the manifests are written")
    return parser.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    s = job_runner.read_settings(args.settings)
    summary = prepare_manifests(s["format"], args.root, args.out_dir,
                                val_fraction=s["val_fraction"], seed=s["split_seed"],
                                on_bad_image=s["on_bad_image"], check_files=s["check_files"],
                                follow_symlinks=s["follow_symlinks"],
                                duplicate_photos=s["duplicate_photos"],
                                test_only_classes=s["test_only_classes"])
    print(f"{summary['format']}: {summary['images']} images, {summary['classes']} classes, "
          f"train {summary['train']} / val {summary['val']} / test {summary['test']}, "
          f"{summary['skipped']} skipped -> {args.out_dir}")
    if summary["photos_hashed"] is not None:
        print(f"hashed {summary['photos_hashed']} photos in {summary['hash_seconds']:.1f} s: "
              f"{summary['identical_photos_in_two_splits']} in two splits")
    if summary["excluded_classes"]:
        print(f"left out {summary['excluded_classes']} classes without a training photo "
              f"(report.json)")


if __name__ == "__main__":
    sys.exit(main())
