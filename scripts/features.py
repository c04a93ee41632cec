#!/usr/bin/env python
"""Run the frozen pretrained backbone once over a split and cache its features."""

from __future__ import annotations

import argparse
import sys

from finegrained import job_runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settings", required=True, help="resolved feature settings: JSON or @file")
    p.add_argument("--index", required=True, help="shard index of the split")
    p.add_argument("--init-weights", required=True, help="weights/init.safetensors")
    p.add_argument("--stats", required=True, help="colour statistics JSON (PCA lighting views)")
    p.add_argument("--classes", required=True, help="classes.parquet of the target manifests")
    p.add_argument("--out-dir", required=True, help="results/<run>/features/<split>")
    return p.parse_args(argv)


@job_runner.runs_on_devices(parse_args)
def main(args: argparse.Namespace) -> None:
    from finegrained.train.job import run_features_job
    index = run_features_job(job_runner.read_settings(args.settings), shard_index=args.index,
                             init_weights=args.init_weights, stats=args.stats,
                             classes=args.classes, out_dir=args.out_dir, log_fn=job_runner.log)
    job_runner.log(f"cached {sorted(index['layers'])} for {index['count']} images "
            f"x {index['views']} view(s)")


if __name__ == "__main__":
    sys.exit(main())
