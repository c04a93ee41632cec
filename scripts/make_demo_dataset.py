"""Generate a synthetic NABirds-format bird dataset for the embedded demo.

Example (the workflow's `demo_dataset` rule passes the config's `demo` block):
    python scripts/make_demo_dataset.py --out results/demo/demo_data/target --variant target \
        --settings '{"num_classes": 10, "train_per_class": 40, "test_per_class": 20,
                     "min_side": 96, "max_side": 192, "seed": 0}'
"""

from __future__ import annotations

import argparse
import json
import sys

from finegrained import job_runner
from finegrained.errors import ConfigError
from finegrained.demo import VARIANTS, generate_demo_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="{}",
                        help="JSON (or @file): num_classes, train_per_class, test_per_class, "
                             "min_side, max_side, seed (missing: the variant's defaults)")
    parser.add_argument("--out", required=True,
                        help="dataset folder to create (replaced if present)")
    parser.add_argument("--variant", choices=VARIANTS, default="target",
                        help="target = the demo task; source = other species for pretraining")
    return parser.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    try:
        summary = generate_demo_dataset(args.out, variant=args.variant,
                                        **job_runner.read_settings(args.settings))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
