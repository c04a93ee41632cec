"""Regime x view table of finished runs, from their eval metrics and benchmark files.

    python scripts/results_table.py --run "iNat birds=results/cub50_inat" \
        --run "ImageNet=results/cub50_imagenet" [--levels leaf] \
        [--update docs/results-cub50.md]

Prints the Markdown table (and one of the jobs' wall times), or with --update writes it between the markers
``<!-- results-table:begin -->`` and ``<!-- results-table:end -->`` of that file (another
pair with ``--marker NAME``). ``--replicates LABEL=RESULTS_DIR`` adds a run's table over its
seeds (mean ± std [95 % interval], from its report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finegrained import job_runner
from finegrained.report.runs_table import (collect_rows, markdown_job_times,
                                           markdown_replicates, markdown_table,
                                           replace_between)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=RESULTS_DIR",
                   help="a run folder (results/<run_name>) and its label; repeat, in row order")
    p.add_argument("--replicates", action="append", default=[], metavar="LABEL=RESULTS_DIR",
                   help="a run with seeds: add its table over the seeds; repeat")
    p.add_argument("--marker", default="results-table",
                   help="with --update: the markers <!-- NAME:begin --> / <!-- NAME:end -->")
    p.add_argument("--levels", nargs="*", default=[], help="taxonomy levels to show (top-1)")
    p.add_argument("--update", type=Path, help="write the table between the markers of this file")
    args = p.parse_args(argv)

    def labelled(specs, option):
        out = []
        for spec in specs:
            label, sep, run_dir = spec.partition("=")
            if not sep:
                p.error(f"{option} {spec!r}: expected LABEL=RESULTS_DIR")
            out.append((label, run_dir))
        return out

    args.run = labelled(args.run, "--run")
    args.replicates = labelled(args.replicates, "--replicates")
    return args


@job_runner.runs(parse_args)      # a bad result file: one line naming it and the key
def main(args: argparse.Namespace) -> None:
    runs, replicates = args.run, args.replicates
    table = (markdown_table(collect_rows(runs), levels=args.levels)
             + "\nWall time of every job (Snakemake benchmark files, `s` column):\n\n"
             + markdown_job_times(runs + [r for r in replicates
                                          if r[1] not in {d for _, d in runs}]))
    if replicates:
        table += "\n" + markdown_replicates(replicates)
    if args.update:
        begin, end = f"<!-- {args.marker}:begin -->", f"<!-- {args.marker}:end -->"
        args.update.write_text(replace_between(args.update.read_text(), table, begin, end))
    else:
        print(table, end="")


if __name__ == "__main__":
    sys.exit(main())
