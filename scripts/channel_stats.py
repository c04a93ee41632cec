#!/usr/bin/env python
"""Per-channel mean/std and RGB covariance (PCA lighting) of a split's crops."""

from __future__ import annotations

import argparse
import sys

from finegrained.data.stats import write_channel_stats
from finegrained.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", required=True, help="shard index of the training split")
    parser.add_argument("--out", required=True, help="statistics JSON to write")
    args = parser.parse_args(argv)
    try:
        stats = write_channel_stats(args.index, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{stats['num_images']} images: mean {[round(v, 2) for v in stats['mean']]}, "
          f"std {[round(v, 2) for v in stats['std']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
