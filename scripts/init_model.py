"""Initialise the target model from pretrained weights (new head; optional name-matched rows)."""

import argparse
import logging
import sys

from finegrained.errors import ConfigError, DataError, WeightsError
from finegrained.models.registry import ARCHITECTURES
from finegrained.models.transfer import write_target_init


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stage-depths", type=int, nargs="+", default=None)
    p.add_argument("--classes", required=True, help="target classes.parquet from the manifests rule")
    p.add_argument("--weights", default=None, help="weights file; omit for random init")
    p.add_argument("--source-class-names", default=None, help="label file of the source classifier")
    p.add_argument("--init-from-source-names", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-weights", required=True)
    p.add_argument("--out-report", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = write_target_init(
            args.classes, args.out_weights, args.out_report, arch=args.arch, width=args.width,
            stage_depths=args.stage_depths, weights=args.weights,
            source_names_file=args.source_class_names,
            init_from_source_names=args.init_from_source_names, seed=args.seed)
    except (WeightsError, DataError, ConfigError) as exc:
        sys.exit(f"error: {exc}")
    matched = report.get("head_init", {}).get("num_matched")
    print(f"initialised {args.arch} for {report['num_classes']} classes from "
          f"{report['weights'] or 'random init'}"
          + (f"; {matched} head rows from source names" if matched is not None else ""))


if __name__ == "__main__":
    main()
