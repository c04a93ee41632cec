"""Runs a job script's ``main``: its command line parsed, for a JAX job its processes joined
and its devices checked, and an expected error printed as one line naming the file or value
at fault (no traceback) with exit code 1.

A script reads, top to bottom, its arguments and the one library call it makes::

    @job_runner.runs_on_devices(parse_args)
    def main(args):
        run_job(...)

``main(argv)`` then parses ``argv`` first (so ``--help`` and a wrong option stay fast, before
JAX loads), joins the run's processes (several under ``srun``, :mod:`finegrained.distributed`),
checks that the devices JAX found are those the rule asked for
(:func:`finegrained.devices.check_job_devices`), calls the body and returns the exit code.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Callable, Sequence

from finegrained.errors import ConfigError, DataError, Everywhere, StorageError, WeightsError
from finegrained.fileio import NO_ROOM, read_json

Main = Callable[[argparse.Namespace], object]
Script = Callable[[Sequence[str] | None], int]


def read_settings(value: str) -> dict:
    """Settings given as a JSON object, or ``@path`` of a JSON file."""
    if value.startswith("@"):
        settings = read_json(value[1:], "settings file")
    else:
        try:
            settings = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--settings is not a JSON object: {exc}") from exc
    if not isinstance(settings, dict):
        raise ConfigError("--settings must be a JSON object")
    return settings


def expected_errors() -> tuple[type[BaseException], ...]:
    try:    # JAX is not needed by the light scripts (their environment may lack it)
        from finegrained.train.loop import NonFinite, Preempted
    except ImportError:
        return (ConfigError, DataError, StorageError, WeightsError)
    return (ConfigError, DataError, StorageError, WeightsError, NonFinite, Preempted,
            _peer_failed())


def _peer_failed() -> type[BaseException]:
    try:
        from finegrained.distributed import PeerFailed
    except ImportError:
        return Everywhere
    return PeerFailed


def _process() -> tuple[int, int]:
    """This process's index and the count of the job's processes ((0, 1) without JAX, or
    before they are joined)."""
    if "jax" not in sys.modules:
        return 0, 1
    import jax
    from finegrained.distributed import is_initialized
    return (jax.process_index(), jax.process_count()) if is_initialized() else (0, 1)


def run(body: Callable[[], object]) -> int:
    """Call ``body``; an expected error becomes ``error: ...`` on stderr and exit code 1, as
    does a write that found no room where no writer named the file and sizes
    (:func:`finegrained.fileio.room_for` does).

    In a job of several processes, an error every process meets alike
    (:class:`finegrained.errors.Everywhere`: a preemption, a non-finite loss, a checkpoint of
    another layout), or the end of a step only process 0 took, is printed by process 0
    alone; another expected error names the process that met it."""
    try:
        body()
    except expected_errors() as exc:
        process, count = _process()
        if process == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif not isinstance(exc, (Everywhere, _peer_failed())):
            print(f"error: process {process} of {count}: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        if exc.errno not in NO_ROOM:
            raise
        print(f"error: cannot write {exc.filename or 'an output'}: {os.strerror(exc.errno)}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def runs(parse_args: Callable[[Sequence[str] | None], argparse.Namespace]):
    """Decorator of a script's ``main(args)`` that needs no devices (data, reports)."""
    def wrap(main: Main) -> Script:
        @functools.wraps(main)
        def script(argv: Sequence[str] | None = None) -> int:
            args = parse_args(argv)
            return run(lambda: main(args))
        return script
    return wrap


def runs_on_devices(parse_args: Callable[[Sequence[str] | None], argparse.Namespace]):
    """Decorator of a JAX job script's ``main(args)``: parse, join the processes, check the
    devices, run."""
    def wrap(main: Main) -> Script:
        @functools.wraps(main)
        def script(argv: Sequence[str] | None = None) -> int:
            args = parse_args(argv)

            def job():
                from finegrained import devices, distributed
                distributed.initialize()
                devices.check_job_devices(log=log if distributed.is_main_process() else None)
                main(args)

            return run(job)
        return script
    return wrap


def log(message: str) -> None:
    print(message, flush=True)
