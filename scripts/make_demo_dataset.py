"""Generate a synthetic NABirds-format bird dataset for the embedded demo.

Example:
    python scripts/make_demo_dataset.py --out results/demo/demo_data/target --variant target \
        --num-classes 10 --train-per-class 40 --test-per-class 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys

from finegrained.demo import VARIANTS, generate_demo_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="dataset folder to create (replaced if present)")
    parser.add_argument("--variant", choices=VARIANTS, default="target",
                        help="target = the demo task; source = other species for pretraining")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of species (default: 10 target, 20 source)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="train photos per species (default: 40)")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="test photos per species (default: 20 target, 10 source)")
    parser.add_argument("--min-side", type=int, default=96, help="smallest photo side, pixels")
    parser.add_argument("--max-side", type=int, default=192, help="largest photo side, pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of species design and photos")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = generate_demo_dataset(
            args.out, variant=args.variant, num_classes=args.num_classes,
            train_per_class=args.train_per_class, test_per_class=args.test_per_class,
            min_side=args.min_side, max_side=args.max_side, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
