"""Print the README's configuration reference (generated from the config schema), or
rewrite it in place with --update README.md."""

import argparse

from finegrained.config_reference import render_reference, update_readme

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--update", metavar="README", help="rewrite the generated block in this file")
    args = p.parse_args()
    if args.update:
        print("updated" if update_readme(args.update) else "up to date")
    else:
        print(render_reference())
