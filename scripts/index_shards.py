#!/usr/bin/env python
"""Write the JSON index of a split's shards (files, sha256, counts, skipped images)."""

from __future__ import annotations

import argparse
import sys

from finegrained.data.shards import write_split_index
from finegrained.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", required=True, help="split name recorded in the index")
    parser.add_argument("--out", required=True, help="index JSON to write")
    parser.add_argument("meta", nargs="+", help="shard metadata files (shard-NNNNN.parquet)")
    args = parser.parse_args(argv)
    try:
        index = write_split_index(args.meta, args.out, args.split)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.split}: {index['count']} images in {index['num_shards']} shards, "
          f"{index['num_skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
