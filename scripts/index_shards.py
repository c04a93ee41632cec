#!/usr/bin/env python
"""Write the JSON index of a split's shards (files, sha256, counts, skipped images), each
shard checked against the record its crop job wrote."""

from __future__ import annotations

import argparse
import sys

from finegrained import job_runner
from finegrained.data.shards import write_split_index


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", required=True, help="split name recorded in the index")
    parser.add_argument("--out", required=True, help="index JSON to write")
    parser.add_argument("meta", nargs="+", help="shard metadata files (shard-NNNNN.parquet)")
    return parser.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    index = write_split_index(args.meta, args.out, args.split)
    print(f"{args.split}: {index['count']} images in {index['num_shards']} shards, "
          f"{index['num_skipped']} skipped")


if __name__ == "__main__":
    sys.exit(main())
