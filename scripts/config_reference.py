"""Print the configuration reference (generated from the config schema), or rewrite
docs/configuration.md with --update docs/configuration.md."""

import argparse

from finegrained.plan.reference import render_reference, update_reference

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--update", metavar="FILE", help="rewrite this file (docs/configuration.md)")
    args = p.parse_args()
    if args.update:
        print("updated" if update_reference(args.update) else "up to date")
    else:
        print(render_reference())
