"""Fetch a weights file by URL, verified by sha256: pinned, or trusted on first use.

After ``fetch`` returns, ``dest`` holds the downloaded bytes and ``<dest>.sha256`` (the
``sha256sum`` format) records their hash; when it raises, nothing new is left at ``dest``
(nor a temporary file beside it). The download streams into a temporary file in ``dest``'s
folder, hashing as it goes, and is renamed into place only once the length and hash check
out.

Two ways to trust the bytes:

* **pinned** (``sha256`` given; ``backbone.weights_require_sha256: true`` makes it required):
  the download must have that hash.
* **trust on first use** (``sha256=None``): the hash is computed on download, logged with the
  config line that pins it, written beside the file and into the run's provenance
  (``init_report.json``), and every later use checks the file against it
  (:func:`verify_recorded_sha256`), so a file that changes on disk afterwards is refused.
  Pin the logged hash to make the run strict.

What a URL can do is bounded: it names one file under ``resources/weights/``
(:func:`finegrained.plan.paths.download_path`: no ``..``, no odd characters, port and query hashed into the folder
name); plain ``http://`` and a redirect from https to http are refused unless allowed; the
transfer stops at ``max_bytes`` and after ``timeout_s`` seconds in all (a server that
trickles bytes defeats a per-read timeout, not this one).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from finegrained.errors import WeightsError
from finegrained.fileio import atomic_output, sha256_file
from finegrained.plan.paths import sha256_record

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and from https only to https unless allowed."""

    def __init__(self, allow_http: bool):
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (new == "http" and not self.allow_http):
            raise WeightsError(f"{req.full_url}: redirected to {newurl}: refused ({old} -> "
                               f"{new}; plain http only with backbone.weights_allow_http)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _as_url(url: str | os.PathLike) -> str:
    """``url`` itself if it has a scheme, else a ``file://`` URL of the local path."""
    text = os.fspath(url)
    scheme = urllib.parse.urlsplit(text).scheme
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        return text
    return Path(text).resolve().as_uri()


def read_recorded_sha256(path: str | os.PathLike) -> str:
    """The hash recorded for ``path`` (first field of its ``.sha256`` file)."""
    record = sha256_record(path)
    try:
        digest = record.read_text().split(maxsplit=1)[0].lower()
    except (FileNotFoundError, IndexError):
        raise WeightsError(f"{path}: no sha256 recorded at {record}") from None
    if not _SHA256.match(digest):
        raise WeightsError(f"{record}: not a sha256 record (64 hex digits first)")
    return digest


def verify_recorded_sha256(path: str | os.PathLike) -> str:
    """Check ``path`` against its ``.sha256`` record and return the hash."""
    expected = read_recorded_sha256(path)
    got = sha256_file(path)
    if got != expected:
        raise WeightsError(f"{path}: sha256 {got} differs from {expected} recorded at "
                           f"{sha256_record(path)} when it was downloaded: the file changed "
                           f"since; delete both files to download it again")
    return got


def _normalise(sha256: str | None, url) -> str | None:
    if sha256 is None:
        return None
    expected = sha256.strip().lower()
    if not _SHA256.match(expected):
        raise WeightsError(f"expected sha256 for {url} must be 64 hex digits, got {sha256!r}")
    return expected


def fetch(url: str | os.PathLike, sha256: str | None, dest: str | os.PathLike, *,
          timeout: float = 60, timeout_s: float = 3600, max_bytes: int = 4 * 10 ** 9,
          allow_http: bool = False, chunk_size: int = _CHUNK) -> Path:
    """Download ``url`` (https://, http:// with ``allow_http``, file:// or a local path) to
    ``dest``; raise ``WeightsError`` on any failure, leaving nothing at ``dest``.

    ``sha256`` pins the expected hash (``None``: trust on first use). A ``dest`` that is
    already there is kept if it matches the pinned hash, or, trusting on first use, the hash
    recorded when it was downloaded (a mismatch is then an error: the file changed).
    ``timeout`` bounds each read, ``timeout_s`` the whole transfer; more than ``max_bytes``
    (announced or received) is refused.
    """
    dest = Path(dest)
    expected = _normalise(sha256, url)
    if dest.is_file() and sha256_record(dest).is_file():
        if expected is None:
            got = verify_recorded_sha256(dest)
            log.info("%s already present, sha256 %s as recorded on first use", dest, got)
            return dest
        got = sha256_file(dest)
        if got == expected:
            _write_record(dest, got)
            log.info("%s already present with the expected sha256", dest)
            return dest
        log.warning("%s has sha256 %s, not %s: removing it and downloading again",
                    dest, got, expected)
    elif dest.is_file() and expected is not None and sha256_file(dest) == expected:
        _write_record(dest, expected)
        log.info("%s already present with the expected sha256", dest)
        return dest
    for stale in (dest, sha256_record(dest)):
        stale.unlink(missing_ok=True)

    full_url = _as_url(url)
    if urllib.parse.urlsplit(full_url).scheme == "http" and not allow_http:
        raise WeightsError(f"{full_url}: plain http is refused (the bytes could be changed on "
                           f"the way); use https, or set backbone.weights_allow_http: true")
    opener = urllib.request.build_opener(_RedirectPolicy(allow_http))
    digest = hashlib.sha256()
    received = 0
    deadline = time.monotonic() + timeout_s
    log.info("downloading %s -> %s", full_url, dest)
    try:
        with atomic_output(dest) as tmp:
            with opener.open(full_url, timeout=timeout) as response, open(tmp, "wb") as out:
                length = response.headers.get("Content-Length")
                length = int(length) if length is not None and length.isdigit() else None
                if length is not None and length > max_bytes:
                    raise WeightsError(f"{full_url}: {length} bytes announced, more than the "
                                       f"{max_bytes} of backbone.weights_max_bytes")
                # read1: whatever has arrived (up to chunk_size), so a trickling server
                # meets the deadline instead of a read that waits for a whole chunk.
                read = getattr(response, "read1", response.read)
                while chunk := read(chunk_size):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    if received > max_bytes:
                        raise WeightsError(f"{full_url}: more than the {max_bytes} bytes of "
                                           f"backbone.weights_max_bytes; stopped")
                    if time.monotonic() > deadline:
                        raise WeightsError(f"{full_url}: not done after {timeout_s:g} s "
                                           f"(backbone.weights_download_timeout), {received} "
                                           f"bytes in; stopped")
            if length is not None and received != length:
                raise WeightsError(f"{full_url}: transfer interrupted: received {received} "
                                   f"of {length} bytes")
            got = digest.hexdigest()
            if expected is not None and got != expected:
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
    _write_record(dest, got)
    if expected is None:
        log.info("downloaded %d bytes, sha256 %s (trusted on first use; recorded in %s and "
                 "checked on every later use). Pin it: add this line under `backbone:` in "
                 "your config file:\n    weights_sha256: %s", received, got,
                 sha256_record(dest), got)
    else:
        log.info("downloaded %d bytes, sha256 %s as pinned", received, got)
    return dest


def _write_record(dest: Path, digest: str) -> None:
    with atomic_output(sha256_record(dest)) as tmp:
        tmp.write_text(f"{digest}  {dest.name}\n")
