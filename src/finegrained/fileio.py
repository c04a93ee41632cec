"""Small file helpers: atomic writes (temp file + rename) and content hashes.

Every output of the pipeline is written through :func:`atomic_output`, so a failed or
interrupted job never leaves a partial file behind under the final name. A job killed with
``-9`` (as SLURM does at a time limit or on preemption) cannot remove its temporary files;
the next attempt at the same output removes them before it starts
(:func:`remove_stale_temporaries`), so they do not pile up (a NABirds crop shard's is ~265 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


#: Temporary names: ``.<name>.<8 random characters from mkstemp>.tmp`` beside the output.
_TMP_SUFFIX = ".tmp"
_TMP_TOKEN = re.compile(r"[a-z0-9_]{8}")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that earlier, killed attempts at writing ``path`` left
    beside it, and return them. Only names :func:`atomic_output` makes for exactly this
    output match (``.<name>.<token>.tmp``), so other outputs' files are never touched; one
    output is written by one job at a time, so none of these can still be in use."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        name = entry.name
        if (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)
                and _TMP_TOKEN.fullmatch(name[len(prefix):-len(_TMP_SUFFIX)])
                and entry.is_file(follow_symlinks=False)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted earlier attempt "
              f"at {path}: {', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Leftovers of earlier attempts that were killed outright are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; give outputs the usual umask permissions
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
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
