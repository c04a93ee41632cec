"""One running copy per job: a job holds an exclusive lock on the folder it writes for its
whole run.

Snakemake killed with ``kill -9`` leaves its running jobs running; after ``--unlock`` a rerun
(or a restarted Snakemake on a cluster) starts the same job again, and two trainers on one
checkpoint folder delete each other's checkpoints. So every train, refit, pretrain, features
and evaluate job takes an exclusive ``flock`` on ``.<folder>.lock`` beside its checkpoint or
output folder before it reads or writes anything there (:func:`exclusive`), and a second
copy stops at once with the holder's host, PID and start time and what to do, or, with
``resources.train.wait_for_lock`` (``$FINEGRAINED_WAIT_FOR_LOCK=1``, exported to every job
so that changing it reruns nothing), waits until the holder ends.

The kernel releases a ``flock`` when its holder dies, however it dies, so the lock of a dead
process never blocks: its file (which only names the last holder, for the message) is taken
over. The lock file is removed when its holder ends normally; a new holder checks that the
file it locked is still the one on disk, so a removal never lets two copies in. On a file
system without locks the job runs unguarded and its log says so. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from finegrained.errors import DataError

WAIT_VAR = "FINEGRAINED_WAIT_FOR_LOCK"
#: Seconds between two tries while waiting for the holder to end.
POLL_SECONDS = 2.0


class JobRunning(DataError):
    """Another copy of the job holds the folder's lock."""


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it (inside, it would move with a
    folder set aside, and vanish with one removed)."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> dict:
    """What the holder wrote in the lock file (empty if it has not yet, or not JSON)."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not yet written its name"
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, running since "
            f"{holder.get('since')} ({holder.get('command')})")


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not removed or replaced meanwhile)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def hold(folder: str | os.PathLike, *, wait: bool | None = None,
         log: Callable[[str], None] | None = None,
         poll_s: float = POLL_SECONDS) -> Iterator[Path | None]:
    """Hold the lock of ``folder`` for the block; yield the lock file (None where the file
    system has no locks). Held by another process: :class:`JobRunning` at once, or with
    ``wait`` (default ``$FINEGRAINED_WAIT_FOR_LOCK``) wait until it is free."""
    wait = os.environ.get(WAIT_VAR) == "1" if wait is None else wait
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            locked = _try_lock(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log(f"{path}: this file system has no locks ({exc.strerror}): running without "
                f"the check that no other copy of this job runs")
            yield None
            return
        if locked and _is_current(fd, path):
            break
        if not locked:
            holder = _holder(fd)
            os.close(fd)
            if not wait:
                raise JobRunning(folder, f"another copy of this job is running: {path} is "
                                 f"held by {_describe(holder)}. Wait for it to end, or stop it "
                                 f"(kill {holder.get('pid', '<PID>')} on that host), then "
                                 f"rerun; or set resources.train.wait_for_lock: true to wait")
            if not waiting:
                log(f"waiting for {path}, held by {_describe(holder)}")
                waiting = True
            time.sleep(poll_s)
            continue
        os.close(fd)     # locked a file that its holder removed as it ended: try the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:300]}).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)      # still holding it: a waiter that locked this file retries
        os.close(fd)


def exclusive(*names: str):
    """Decorator of a job function: hold the lock (:func:`hold`) of the folder that the
    first of its arguments ``names`` given (not None) names, for the whole call.

    In a job of several processes (:mod:`finegrained.distributed`) one copy is all of them:
    process 0 (the one that writes) holds the lock, the others never touch it and start
    once it holds it; when process 0 refuses (another copy runs) they end too, quietly
    (:class:`finegrained.distributed.PeerFailed`), without waiting at a collective for a
    process that has gone."""
    def decorate(job):
        signature = inspect.signature(job)

        @functools.wraps(job)
        def locked(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            folder = next((arguments[n] for n in names if arguments.get(n) is not None), None)
            if folder is None:
                return job(*args, **kwargs)
            from finegrained import distributed   # JAX: only the jobs that use this import it
            with contextlib.ExitStack() as stack:
                distributed.on_main(f"lock/{lock_path(folder)}",
                                    lambda: stack.enter_context(hold(folder)))
                return job(*args, **kwargs)
        return locked
    return decorate
