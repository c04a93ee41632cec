#!/usr/bin/env python
"""Train one transfer regime from its resolved settings; write weights, history, summary."""

from __future__ import annotations

import argparse
import sys

from finegrained import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settings", required=True,
                   help="the job's resolved settings: JSON, or @file (see finegrained.train.regimes)")
    p.add_argument("--train-index", required=True, help="shard index of the training split")
    p.add_argument("--val-index", required=True, help="shard index of the validation split")
    p.add_argument("--stats", required=True, help="colour statistics JSON of the training crops")
    p.add_argument("--classes", required=True, help="classes.parquet of the target manifests")
    p.add_argument("--init-weights", default=None, help="weights/init.safetensors (pretrained regimes)")
    p.add_argument("--features-dir", default=None, help="the feature cache (cached regimes)")
    p.add_argument("--probe-weights", default=None,
                   help="train/linear_probe<seed>/weights.safetensors (head_from: linear_probe)")
    p.add_argument("--probe-summary", default=None, help="the probe job's summary.json")
    p.add_argument("--checkpoint-dir", required=True, help="where checkpoints go (kept on failure)")
    p.add_argument("--out-dir", required=True, help="results/<run>/train/<regime>")
    args = p.parse_args(argv)
    if (args.probe_weights is None) != (args.probe_summary is None):
        p.error("give --probe-weights and --probe-summary together")
    return args


def probe_files(args: argparse.Namespace) -> dict | None:
    if args.probe_weights is None:
        return None
    return {"weights": args.probe_weights, "summary": args.probe_summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job():
        from finegrained.train.job import run_job   # after argparse: --help stays fast
        run_job(cli.read_settings(args.settings), train_index=args.train_index,
                val_index=args.val_index, stats=args.stats, classes=args.classes,
                out_dir=args.out_dir, checkpoint_dir=args.checkpoint_dir,
                init_weights=args.init_weights, features_dir=args.features_dir,
                probe=probe_files(args), log_fn=cli.log)

    return cli.run_on_devices(job)


if __name__ == "__main__":
    sys.exit(main())
