#!/usr/bin/env python
"""Train one regime's job from its resolved settings; write weights, history, summary.

A refit (``protocol.refit``: the `refit_regime` rule) runs the same way from a refit request
and the train job chosen on validation (``--train-summary``, or a sweep's ``--selection``):
that job's recipe, repeated on train + validation for the epochs it chose."""

from __future__ import annotations

import argparse
import json
import sys

from finegrained import job_runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settings", required=True,
                   help="the job's resolved settings (finegrained.plan.jobs.train_regime), or a "
                        "refit request (finegrained.plan.jobs.refit_regime): JSON, or @file")
    p.add_argument("--train-index", required=True, help="shard index of the training split")
    p.add_argument("--val-index", required=True, help="shard index of the validation split")
    p.add_argument("--stats", required=True, help="colour statistics JSON of the training crops")
    p.add_argument("--classes", required=True, help="classes.parquet of the target manifests")
    p.add_argument("--init-weights", default=None, help="weights/init.safetensors (pretrained regimes)")
    p.add_argument("--features", default=None, type=json.loads,
                   help="JSON {layer: {split: index.json}}: the feature caches (cached regimes)")
    p.add_argument("--probe-weights", default=None,
                   help="train/linear_probe<seed>/weights.safetensors (head_from: linear_probe)")
    p.add_argument("--probe-summary", default=None, help="the probe job's summary.json")
    p.add_argument("--train-summary", help="a refit: the chosen train job's summary.json")
    p.add_argument("--selection", help="a refit of a swept regime: its select/<regime>.json")
    p.add_argument("--train-root", help="results/<run>/train, with --selection")
    p.add_argument("--checkpoint-dir", required=True, help="where checkpoints go (kept on failure)")
    p.add_argument("--out-dir", required=True, help="results/<run>/train/<regime><variant>")
    args = p.parse_args(argv)
    if (args.probe_weights is None) != (args.probe_summary is None):
        p.error("give --probe-weights and --probe-summary together")
    if args.selection is not None and args.train_summary is not None:
        p.error("give --train-summary, or --selection and --train-root")
    if (args.selection is None) != (args.train_root is None):
        p.error("--selection and --train-root go together")
    return args


def job_settings(args: argparse.Namespace) -> dict:
    """The settings to run: as given, or for a refit, resolved from the chosen job."""
    from finegrained.fileio import read_json
    from finegrained.plan.protocol import refit_settings
    from finegrained.sweeps import chosen_train_files
    settings = job_runner.read_settings(args.settings)
    if args.train_summary is None and args.selection is None:
        return settings
    summary = args.train_summary
    if args.selection is not None:
        _, summary = chosen_train_files(args.selection, args.train_root, settings["regime"],
                                        settings["variant"])
    return refit_settings(settings, read_json(summary, "train summary"))


@job_runner.runs_on_devices(parse_args)
def main(args: argparse.Namespace) -> None:
    from finegrained.train.job import run_job
    probe = (None if args.probe_weights is None else
             {"weights": args.probe_weights, "summary": args.probe_summary})
    run_job(job_settings(args), train_index=args.train_index, val_index=args.val_index,
            stats=args.stats, classes=args.classes, out_dir=args.out_dir,
            checkpoint_dir=args.checkpoint_dir, init_weights=args.init_weights,
            feature_indexes=args.features, probe=probe, log_fn=job_runner.log)


if __name__ == "__main__":
    sys.exit(main())
