"""Download a pretrained weights file and verify its sha256 (pinned, or trusted on first use).

    python scripts/fetch_weights.py --url URL [--sha256 HEX] --out PATH

URL may be http(s)://, file:// or a local path. Without --sha256 the hash is computed on
download, logged and recorded in PATH.sha256, and checked on every later use. Exits
non-zero, leaving nothing at PATH, when the transfer fails or the hash differs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from finegrained.errors import WeightsError
from finegrained.models.download import fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http(s)://, file:// URL or local path")
    parser.add_argument("--sha256", default=None,
                        help="expected sha256, 64 hex digits (omit: trust on first use)")
    parser.add_argument("--out", required=True, help="destination file")
    parser.add_argument("--timeout", type=float, default=60, help="socket timeout, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fetch(args.url, args.sha256, args.out, timeout=args.timeout)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
