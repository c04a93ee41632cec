#!/usr/bin/env python
"""Evaluate one trained regime on the test split: metrics.json and predictions.parquet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finegrained import job_runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settings", required=True,
                   help="the job's resolved settings: JSON, or @file (see finegrained.plan.jobs.evaluate_regime)")
    p.add_argument("--test-index", required=True, help="shard index of the test split")
    p.add_argument("--weights", help="train/<regime>/weights.safetensors")
    p.add_argument("--train-summary", help="train/<regime>/summary.json")
    p.add_argument("--selection", help="select/<regime>.json of a swept regime: evaluate the "
                                       "chosen grid point (instead of --weights/--train-summary)")
    p.add_argument("--train-root", help="results/<run>/train, with --selection")
    p.add_argument("--classes", required=True, help="classes.parquet of the target manifests")
    p.add_argument("--out-dir", required=True, help="results/<run>/eval/<regime>")
    args = p.parse_args(argv)
    if args.selection is None and None in (args.weights, args.train_summary):
        p.error("give --weights and --train-summary, or --selection and --train-root")
    if args.selection is not None and args.train_root is None:
        p.error("--selection needs --train-root")
    return args


@job_runner.runs_on_devices(parse_args)
def main(args: argparse.Namespace) -> None:
    from finegrained.evaluate.job import run_evaluation
    from finegrained.sweeps import chosen_train_files
    settings = job_runner.read_settings(args.settings)
    weights, summary = args.weights, args.train_summary
    if args.selection is not None:
        weights, summary = chosen_train_files(args.selection, args.train_root,
                                              settings["regime"], settings.get("variant", ""))
    run_evaluation(settings, test_index=args.test_index, weights=weights,
                   classes=args.classes, train_summary=summary, out_dir=args.out_dir,
                   source_dir=Path(__file__).resolve().parents[1], log_fn=job_runner.log)


if __name__ == "__main__":
    sys.exit(main())
