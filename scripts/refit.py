#!/usr/bin/env python
"""Refit the chosen recipe of one regime on train + validation (protocol.refit): the train
job chosen on validation (the sweep's choice for this replicate, or the one train job) is
repeated on both splits for the epochs it chose; weights, history and summary under
refit/<regime><replicate>/."""

from __future__ import annotations

import argparse
import sys

from finegrained import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settings", required=True,
                   help="JSON (or @file): regime, replicate variant, select_by and the config "
                        "hash of every train job it may repeat (finegrained.protocol.refit_request)")
    p.add_argument("--train-summary", help="train/<regime><variant>/summary.json (no sweep)")
    p.add_argument("--selection", help="select/<regime>.json of a swept regime")
    p.add_argument("--train-root", help="results/<run>/train, with --selection")
    p.add_argument("--train-index", required=True, help="shard index of the training split")
    p.add_argument("--val-index", required=True, help="shard index of the validation split")
    p.add_argument("--stats", required=True, help="colour statistics JSON of the training crops")
    p.add_argument("--classes", required=True, help="classes.parquet of the target manifests")
    p.add_argument("--init-weights", default=None, help="weights/init.safetensors (pretrained regimes)")
    p.add_argument("--features-dir", default=None, help="the feature cache (cached regimes)")
    p.add_argument("--probe-weights", default=None,
                   help="refit/linear_probe<seed>/weights.safetensors (head_from: linear_probe)")
    p.add_argument("--probe-summary", default=None, help="the refit probe's summary.json")
    p.add_argument("--checkpoint-dir", required=True, help="where checkpoints go (kept on failure)")
    p.add_argument("--out-dir", required=True, help="results/<run>/refit/<regime><variant>")
    args = p.parse_args(argv)
    if (args.selection is None) == (args.train_summary is None):
        p.error("give --train-summary, or --selection and --train-root")
    if args.selection is not None and args.train_root is None:
        p.error("--selection needs --train-root")
    if (args.probe_weights is None) != (args.probe_summary is None):
        p.error("give --probe-weights and --probe-summary together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job():
        from finegrained.fileio import read_json
        from finegrained.protocol import chosen_train_files, refit_settings
        from finegrained.train.job import run_job   # after argparse: --help stays fast
        request = cli.read_settings(args.settings)
        summary = args.train_summary
        if args.selection is not None:
            _, summary = chosen_train_files(args.selection, args.train_root,
                                            request["regime"], request["variant"])
        settings = refit_settings(request, read_json(summary, "train summary"))
        probe = (None if args.probe_weights is None else
                 {"weights": args.probe_weights, "summary": args.probe_summary})
        run_job(settings, train_index=args.train_index, val_index=args.val_index,
                stats=args.stats, classes=args.classes, out_dir=args.out_dir,
                checkpoint_dir=args.checkpoint_dir, init_weights=args.init_weights,
                features_dir=args.features_dir, probe=probe, log_fn=cli.log)

    return cli.run_on_devices(job)


if __name__ == "__main__":
    sys.exit(main())
