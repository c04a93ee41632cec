"""Crop one shard of a split's manifest into shard files (see finegrained.data.shards)."""

from __future__ import annotations

import argparse
import sys

from finegrained import job_runner
from finegrained.data.shards import write_shard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", required=True,
                        help="JSON (or @file): size, margin, aspect, overflow, max_squeeze, "
                             "format, codec, num_shards, on_bad_image, follow_symlinks "
                             "(finegrained.plan.jobs.crop_shard)")
    parser.add_argument("--manifest", required=True, help="split manifest (Parquet)")
    parser.add_argument("--root", required=True, help="dataset root the manifest paths are under")
    parser.add_argument("--shard", type=int, required=True, help="0-based shard index")
    parser.add_argument("--out-meta", required=True)
    parser.add_argument("--out-images", help="uint8 .npy output (required for format npy)")
    parser.add_argument("--out-skipped", required=True)
    return parser.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    s = job_runner.read_settings(args.settings)
    summary = write_shard(
        args.manifest, args.root, args.shard, s["num_shards"], size=s["size"],
        margin=s["margin"], aspect=s["aspect"], overflow=s["overflow"] or "pad",
        max_squeeze=s["max_squeeze"] or 1.0, fmt=s["format"], codec=s["codec"] or "png",
        on_bad_image=s["on_bad_image"], follow_symlinks=s["follow_symlinks"],
        out_images=args.out_images, out_meta=args.out_meta, out_skipped=args.out_skipped)
    print(f"shard {args.shard}/{s['num_shards']}: {summary['count']} crops, "
          f"{summary['skipped']} skipped")


if __name__ == "__main__":
    sys.exit(main())
