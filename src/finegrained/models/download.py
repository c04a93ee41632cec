"""Fetch a weights file by URL and verify its sha256.

After ``fetch`` returns, ``dest`` holds exactly the bytes with the expected hash; when it
raises, nothing is left at ``dest`` (nor a temporary file beside it). The download streams
into a temporary file in ``dest``'s folder, hashing as it goes, and is renamed into place
only once the length and hash check out.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from finegrained.errors import WeightsError
from finegrained.fileio import atomic_output, sha256_file

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _as_url(url: str | os.PathLike) -> str:
    """``url`` itself if it has a scheme, else a ``file://`` URL of the local path."""
    text = os.fspath(url)
    scheme = urllib.parse.urlsplit(text).scheme
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        return text
    return Path(text).resolve().as_uri()


def fetch(url: str | os.PathLike, sha256: str, dest: str | os.PathLike, *,
          timeout: float = 60, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` (http(s)://, file:// or a local path) to ``dest`` unless ``dest``
    already has the sha256 ``sha256``; raise ``WeightsError`` on any failure."""
    dest = Path(dest)
    expected = sha256.strip().lower()
    if not _SHA256.match(expected):
        raise WeightsError(f"expected sha256 for {url} must be 64 hex digits, got {sha256!r}")
    if dest.is_file():
        got = sha256_file(dest)
        if got == expected:
            log.info("%s already present with the expected sha256", dest)
            return dest
        log.warning("%s has sha256 %s, not %s: removing it and downloading again",
                    dest, got, expected)
        dest.unlink()

    full_url = _as_url(url)
    digest = hashlib.sha256()
    received = 0
    log.info("downloading %s -> %s", full_url, dest)
    try:
        with atomic_output(dest) as tmp:
            with urllib.request.urlopen(full_url, timeout=timeout) as response, \
                    open(tmp, "wb") as out:
                length = response.headers.get("Content-Length")
                length = int(length) if length is not None and length.isdigit() else None
                while chunk := response.read(chunk_size):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
            if length is not None and received != length:
                raise WeightsError(f"{full_url}: transfer interrupted: received {received} "
                                   f"of {length} bytes")
            got = digest.hexdigest()
            if got != expected:
                raise WeightsError(f"{full_url}: sha256 mismatch: expected {expected}, "
                                   f"got {got} ({received} bytes); nothing written to {dest}")
    except WeightsError:
        raise
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"{full_url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise WeightsError(f"{full_url}: cannot open: {exc.reason}") from exc
    except (http.client.HTTPException, OSError) as exc:  # timeouts are OSErrors
        raise WeightsError(f"{full_url}: transfer failed after {received} bytes: "
                           f"{type(exc).__name__}: {exc}") from exc
    log.info("downloaded %d bytes, sha256 %s", received, expected)
    return dest
