"""Print what a finished run found: its top-1 table per regime and test-time view, where the
figures are, and the report command (`make demo` ends with it).

    python scripts/show_results.py results/demo [--report-command "make report"]
"""

from __future__ import annotations

import argparse
import sys

from finegrained import cli
from finegrained.report.tables import run_answer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="results/<run_name>")
    p.add_argument("--report-command", default=None, help="how to build the HTML report")
    args = p.parse_args(argv)
    return cli.run(lambda: print(run_answer(args.run_dir, args.report_command)))


if __name__ == "__main__":
    sys.exit(main())
