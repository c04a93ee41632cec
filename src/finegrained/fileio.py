"""Small file helpers: atomic writes (temp file + fsync + rename), content hashes, and the
one JSON reader (:func:`read_json`: a missing or torn file is an error naming it).

Every output of the pipeline is written through :func:`atomic_output`, so a failed or
interrupted job never leaves a partial file behind under the final name, and a power loss
right after a job finished cannot leave an empty file there either (the bytes reach the disk
before the rename, the rename before the job reports success). A job killed with ``-9`` (as
SLURM does at a time limit or on preemption) cannot remove its temporary files; the next
attempt at the same output removes them before it starts (:func:`remove_stale_temporaries`),
so they do not pile up (a NABirds crop shard's is ~265 MB).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from finegrained.errors import DataError, StorageError

_UMASK = os.umask(0)
os.umask(_UMASK)


#: Temporary names: ``.<name>.<8 random characters from mkstemp>.tmp`` beside the output
#: (:func:`temporary_path`).
_TMP_SUFFIX = ".tmp"
_TMP_TOKEN = r"[a-z0-9_]{8}"


def _stale_pattern(name: str) -> re.Pattern:
    """Temporary names of output ``name``: ``.<name>.<token>.tmp``, and the nested
    ``..<name>.<token>.tmp.<token>.tmp`` that an atomic write *into* a temporary made before
    temporaries were named after their final output."""
    return re.compile(rf"(\.{{1,2}}){re.escape(name)}\.{_TMP_TOKEN}\.tmp(\.{_TMP_TOKEN}\.tmp)?")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that earlier, killed attempts at writing ``path`` left
    beside it, and return them. Only names :func:`atomic_output` makes for exactly this
    output match (``.<name>.<token>.tmp``), so other outputs' files are never touched; one
    output is written by one job at a time, so none of these can still be in use."""
    path = Path(path)
    pattern = _stale_pattern(path.name)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        # One leading dot per level: a nested name must carry the nested suffix, and back.
        if (match and (len(match.group(1)) == 2) == (match.group(2) is not None)
                and entry.is_file(follow_symlinks=False)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted earlier attempt "
              f"at {path}: {', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


def remove_stale_directories(path: str | os.PathLike, suffixes=(".tmp", ".old")) -> list[Path]:
    """The folder counterpart of :func:`remove_stale_temporaries`: delete the folders
    ``.<name>.<token><suffix>`` that killed attempts at building the folder ``path`` (in a
    temporary beside it, then renamed) left behind."""
    path = Path(path)
    ends = "|".join(re.escape(s) for s in suffixes)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TMP_TOKEN}({ends})")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    if removed:
        print(f"removed {len(removed)} folder(s) left by an interrupted earlier attempt at "
              f"{path}: {', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


def temporary_path(path: str | os.PathLike) -> Path:
    """A new empty temporary file beside ``path``, named so that the next attempt at ``path``
    removes it if this one is killed (:func:`remove_stale_temporaries`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file onto ``path`` durably: its bytes are on the disk before
    the rename, and the rename is on the disk (the folder synced) before this returns."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` (:func:`commit`) only if
    the block succeeds.

    Leftovers of earlier attempts that were killed outright are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; give outputs the usual umask permissions
            os.chmod(tmp, 0o666 & ~_UMASK)
        commit(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed in ``chunk_size`` blocks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: What a write that does not fit fails with: no space left, over quota, over the file-size
#: limit (``ulimit -f``; Python ignores SIGXFSZ, so the write fails instead of the process).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def room_for(path: str | os.PathLike, needed: int) -> Iterator[None]:
    """Turn a write in the block that fails for want of room (:data:`NO_ROOM`) into a
    one-line :class:`StorageError` naming ``path``, the ``needed`` bytes and the bytes free
    on its file system."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_ROOM or isinstance(exc, StorageError):
            raise
        free = shutil.disk_usage(Path(path).parent).free
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        cap = ("" if limit == resource.RLIM_INFINITY
               else f"; files may not grow past {limit:,} bytes here (ulimit -f)")
        raise StorageError(exc.errno, f"{path}: cannot write it ({os.strerror(exc.errno)}): "
                                      f"it needs {needed:,} bytes, {free:,} are free on its "
                                      f"file system{cap}") from None


def reserve(file, nbytes: int, path: str | os.PathLike) -> None:
    """Allocate ``nbytes`` of disk for the open ``file`` (named ``path`` in errors) before
    anything is written, so a full disk stops the job at once with a :class:`StorageError`
    and every later write lands on blocks it owns. Where the file system cannot reserve
    (no ``posix_fallocate``), writes still go through ``file`` and fail cleanly."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    with room_for(path, nbytes):
        try:
            os.posix_fallocate(file.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def write_reserved(tmp: str | os.PathLike, final: str | os.PathLike, data) -> None:
    """Write ``data`` (bytes, or any buffer) into ``tmp``, the temporary of ``final``, its
    size reserved first (:func:`reserve`): no room is a :class:`StorageError` naming
    ``final`` and the exact bytes it needs, before a byte is written."""
    size = memoryview(data).nbytes
    with open(tmp, "wb") as f:
        reserve(f, size, final)
        with room_for(final, size):
            f.write(data)


def parquet_bytes(table):
    """A pyarrow Table as the bytes of a Parquet file (for :func:`write_reserved`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue()


class HashingWriter:
    """A binary file's ``write`` that also feeds every byte to a sha256: the hash of a file
    as it is written, with no second read (a cached feature map can be tens of GB)."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The JSON value in ``path``. A missing, unreadable or torn file (a job killed while
    writing it by hand, a copy cut short) is a :class:`DataError` naming the file, what it
    is and where the parse stopped, never a bare ``JSONDecodeError``."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read this {what}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not a valid {what} ({exc.msg} at line {exc.lineno}, "
                              f"column {exc.colno}; truncated or edited?)") from None


def check_sha256(path: str | os.PathLike, recorded: str | None, record: str | os.PathLike,
                 remedy: str) -> None:
    """Refuse ``path`` unless its sha256 is ``recorded``, the hash the job that wrote it put
    in ``record``: the error names the file, both hashes, the record and ``remedy``."""
    if not Path(path).is_file():
        raise DataError(path, f"not found (listed in {record}); {remedy}")
    if recorded is None:
        raise DataError(path, f"{record} records no sha256 of it (written by an older "
                              f"version?), so it cannot be checked; {remedy}")
    actual = sha256_file(path)
    if actual != recorded:
        raise DataError(path, f"changed since it was written: its sha256 is {actual}, "
                              f"{record} records {recorded}; {remedy}")
