#!/usr/bin/env python
"""A run's summary: summary.json and the regime x view tables (mean, std, 95 % CI over seeds)."""

from __future__ import annotations

import argparse
import sys

from finegrained import job_runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-name", required=True)
    p.add_argument("--results-dir", required=True, help="results/<run>")
    p.add_argument("--metrics", nargs="+", required=True, help="eval/<regime>[+seed=N]/metrics.json")
    p.add_argument("--selections", nargs="*", default=[], help="select/<regime>.json of swept regimes")
    p.add_argument("--out-dir", required=True, help="results/<run>/report")
    return p.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    from finegrained.report.tables import write_summary
    summary = write_summary(run_name=args.run_name, results_dir=args.results_dir,
                            metrics_paths=args.metrics, selection_paths=args.selections,
                            out_dir=args.out_dir)
    job_runner.log(f"summary: {sum(len(r['runs']) for r in summary['regimes'].values())} evaluated "
            f"runs of {len(summary['regimes'])} regimes")


if __name__ == "__main__":
    sys.exit(main())
