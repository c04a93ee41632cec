"""Initialise the target model from pretrained weights (new head; optional name-matched rows).

    python scripts/init_model.py --classes classes.parquet --out-weights init.safetensors \
        --out-report init_report.json [--weights FILE] [--source-class-names FILE] \
        --settings '{"model": {"arch": "resnet50", "width": 64, "stage_depths": null,
                               "options": {}}, "init_from_source_names": false, "seed": 0}'
"""

from __future__ import annotations

import argparse
import logging
import sys

from finegrained import job_runner
from finegrained.models.transfer import write_target_init


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", required=True,
                   help="JSON (or @file): model (arch, width, stage_depths, options), "
                        "init_from_source_names, seed (finegrained.plan.jobs.init_target_model)")
    p.add_argument("--classes", required=True, help="target classes.parquet from the manifests rule")
    p.add_argument("--weights", default=None, help="weights file; omit for random init")
    p.add_argument("--source-class-names", default=None, help="label file of the source classifier")
    p.add_argument("--out-weights", required=True)
    p.add_argument("--out-report", required=True)
    return p.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    s = job_runner.read_settings(args.settings)
    model = s["model"]
    report = write_target_init(
        args.classes, args.out_weights, args.out_report, arch=model["arch"],
        width=model["width"], stage_depths=model["stage_depths"], options=model["options"],
        weights=args.weights,
        source_names_file=args.source_class_names,
        init_from_source_names=s["init_from_source_names"], seed=s["seed"])
    matched = report.get("head_init", {}).get("num_matched")
    print(f"initialised {model['arch']} for {report['num_classes']} classes from "
          f"{report['weights'] or 'random init'}"
          + (f"; {matched} head rows from source names" if matched is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
