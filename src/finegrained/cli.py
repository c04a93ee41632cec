"""What every script shares: resolved settings from the command line, and errors printed
as one line naming the file/value at fault (no traceback) with a non-zero exit; for JAX
jobs, the device check before any data is read (:func:`run_on_devices`)."""

from __future__ import annotations

import json
import sys
from typing import Callable

from finegrained.errors import ConfigError, DataError, WeightsError
from finegrained.fileio import read_json

__all__ = ["ConfigError", "expected_errors", "log", "read_settings", "run", "run_on_devices"]


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
        return (ConfigError, DataError, WeightsError)
    return (ConfigError, DataError, WeightsError, NonFinite, Preempted)


def run(main: Callable[[], object]) -> int:
    """Call ``main``; an expected error becomes ``error: ...`` on stderr and exit code 1."""
    try:
        main()
    except expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def run_on_devices(main: Callable[[], object]) -> int:
    """:func:`run` for a JAX job: join the run's processes (several under ``srun``), check
    that the devices JAX found are those the rule asked for, then call ``main``."""
    def job():
        from finegrained import devices, distributed
        distributed.initialize()
        devices.check_job_devices(log=log)
        return main()

    return run(job)


def log(message: str) -> None:
    print(message, flush=True)
