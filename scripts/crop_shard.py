#!/usr/bin/env python
"""Crop one shard of a split's manifest into shard files (see finegrained.data.shards)."""

from __future__ import annotations

import argparse
import sys

from finegrained.data.crop import ASPECTS, OVERFLOWS
from finegrained.data.shards import CODECS, SHARD_FORMATS, write_shard
from finegrained.errors import ON_BAD_IMAGE, DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True, help="split manifest (Parquet)")
    parser.add_argument("--root", required=True, help="dataset root the manifest paths are under")
    parser.add_argument("--shard", type=int, required=True, help="0-based shard index")
    parser.add_argument("--num-shards", type=int, required=True)
    parser.add_argument("--size", type=int, required=True, help="output side S (pixels)")
    parser.add_argument("--margin", type=float, required=True,
                        help="context added on each side, as a fraction of the box size")
    parser.add_argument("--aspect", choices=ASPECTS, required=True)
    parser.add_argument("--overflow", choices=OVERFLOWS, default="pad",
                        help="square crop of a box longer than the photo's short side: "
                             "pad it, or squeeze its long side by up to --max-squeeze")
    parser.add_argument("--max-squeeze", type=float, default=1.0)
    parser.add_argument("--format", choices=SHARD_FORMATS, default="npy")
    parser.add_argument("--codec", choices=CODECS, default="png",
                        help="image encoding for --format parquet")
    parser.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default="error")
    parser.add_argument("--out-meta", required=True)
    parser.add_argument("--out-images", help="uint8 .npy output (required for --format npy)")
    parser.add_argument("--out-skipped", required=True)
    args = parser.parse_args(argv)
    if (args.format == "npy") != (args.out_images is not None):
        parser.error("--out-images is required with --format npy and not allowed otherwise")
    try:
        summary = write_shard(args.manifest, args.root, args.shard, args.num_shards,
                              size=args.size, margin=args.margin, aspect=args.aspect,
                              overflow=args.overflow, max_squeeze=args.max_squeeze,
                              fmt=args.format, codec=args.codec, on_bad_image=args.on_bad_image,
                              out_images=args.out_images, out_meta=args.out_meta,
                              out_skipped=args.out_skipped)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"shard {args.shard}/{args.num_shards}: {summary['count']} crops, "
          f"{summary['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
