"""Print what a finished run found: its top-1 table per regime and test-time view, where the
figures are, and the report command (`make demo` ends with it).

    python scripts/show_results.py results/demo [--report-command "make report"]
"""

from __future__ import annotations

import argparse
import sys

from finegrained import job_runner
from finegrained.report.tables import run_answer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="results/<run_name>")
    p.add_argument("--report-command", default=None, help="how to build the HTML report")
    return p.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    print(run_answer(args.run_dir, args.report_command))


if __name__ == "__main__":
    sys.exit(main())
