#!/usr/bin/env python
"""Train a backbone from scratch on the source dataset's shards; write weights + metrics."""

from __future__ import annotations

import argparse
import sys

from finegrained import job_runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settings", required=True,
                   help="resolved settings (arch, width, stage_depths, train_settings): JSON or @file")
    p.add_argument("--train-index", required=True, help="shard index of the training split")
    p.add_argument("--val-index", required=True, help="shard index of the validation split")
    p.add_argument("--stats", required=True, help="colour statistics JSON of the training crops")
    p.add_argument("--classes", required=True, help="classes.parquet of the source manifests")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoints (resume after a kill)")
    p.add_argument("--out-weights", required=True, help=".safetensors to write")
    p.add_argument("--out-metrics", required=True, help="metrics JSON to write")
    return p.parse_args(argv)


@job_runner.runs_on_devices(parse_args)
def main(args: argparse.Namespace) -> None:
    from finegrained.train.settings import TrainSettings
    from finegrained.train.pretrain import pretrain
    settings = job_runner.read_settings(args.settings)
    pretrain(args.train_index, args.val_index, args.stats, args.classes,
             arch=settings["arch"], width=settings["width"],
             stage_depths=settings["stage_depths"],
             settings=TrainSettings.from_dict(settings["train_settings"]),
             out_weights=args.out_weights, out_metrics=args.out_metrics,
             checkpoint_dir=args.checkpoint_dir,
             keep_checkpoints=settings.get("keep_checkpoints", False),
             depthwise_impl=settings.get("depthwise_impl", "auto"),
             verify=settings.get("verify_shards", True), log_fn=job_runner.log)


if __name__ == "__main__":
    sys.exit(main())
