"""Download a pretrained weights file and verify its sha256 (pinned, or trusted on first use).

    python scripts/fetch_weights.py --out PATH --settings '{"url": URL, "sha256": null,
        "allow_http": false, "max_bytes": 4000000000, "timeout_s": 3600}'

URL may be https://, http:// (with allow_http), file:// or a local path. Without a sha256
the hash is computed on download, logged with the config line that pins it and recorded in
PATH.sha256, and checked on every later use. Exits non-zero, leaving nothing at PATH, when
the transfer fails, is too large or too slow, or the hash differs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from finegrained import job_runner
from finegrained.models.download import fetch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True,
                        help="JSON (or @file): url, sha256 (or null), allow_http, max_bytes, "
                             "timeout_s")
    parser.add_argument("--out", required=True, help="destination file")
    return parser.parse_args(argv)


@job_runner.runs(parse_args)
def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    s = job_runner.read_settings(args.settings)
    fetch(s["url"], s["sha256"], args.out, allow_http=s["allow_http"],
          max_bytes=s["max_bytes"], timeout_s=s["timeout_s"])


if __name__ == "__main__":
    sys.exit(main())
