#!/usr/bin/env python
"""Evaluate one trained regime on the test split: metrics.json and predictions.parquet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finegrained import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settings", required=True,
                   help="the job's resolved settings: JSON, or @file (see finegrained.evaluate.settings)")
    p.add_argument("--test-index", required=True, help="shard index of the test split")
    p.add_argument("--weights", required=True, help="train/<regime>/weights.safetensors")
    p.add_argument("--train-summary", required=True, help="train/<regime>/summary.json")
    p.add_argument("--classes", required=True, help="classes.parquet of the target manifests")
    p.add_argument("--out-dir", required=True, help="results/<run>/eval/<regime>")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job():
        from finegrained.evaluate.job import run_evaluation   # after argparse: --help stays fast
        run_evaluation(cli.read_settings(args.settings), test_index=args.test_index,
                       weights=args.weights, classes=args.classes,
                       train_summary=args.train_summary, out_dir=args.out_dir,
                       source_dir=Path(__file__).resolve().parents[1], log_fn=cli.log)

    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
