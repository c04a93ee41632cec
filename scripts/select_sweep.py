#!/usr/bin/env python
"""Choose one grid point of a regime's sweep on validation: select/<regime>.json."""

from __future__ import annotations

import argparse
import json
import sys

from finegrained import job_runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--regime", required=True)
    p.add_argument("--candidates", required=True,
                   help='JSON: {"<grid point variant>": ["train/<job>/summary.json", ...]}, '
                        "one summary per replicate")
    p.add_argument("--settings", required=True,
                   help='JSON (or @file): {"select_by": "val_top1" | "val_loss"} '
                        "(protocol.selection_settings)")
    p.add_argument("--out", required=True, help="select/<regime>.json")
    return p.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    from finegrained.sweeps import write_selection
    settings = job_runner.read_settings(args.settings)
    selection = write_selection(args.regime, json.loads(args.candidates), args.out,
                                settings["select_by"])
    job_runner.log(f"{args.regime}: chose {selection['chosen']} of "
            f"{len(selection['candidates'])} grid points ({selection['rule']})")


if __name__ == "__main__":
    sys.exit(main())
