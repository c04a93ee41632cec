"""Errors that name the file, line and value at fault, so bad input is fixed quickly."""

from __future__ import annotations

import os

#: What to do with an image that cannot be used (unreadable file, unusable box): stop with a
#: DataError, or drop it and list it with its reason. Dataset-level faults are always fatal.
ON_BAD_IMAGE = ("error", "skip")


class DataError(ValueError):
    """Bad input data: a file, optionally a 1-based line number, the offending value and why."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None,
                 value: object = None):
        self.path = os.fspath(path)
        self.line = line
        self.value = value
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        text = f"{where}: {message}"
        if value is not None:
            text += f" (value: {value!r})"
        super().__init__(text)


class WeightsError(ValueError):
    """Pretrained weights that cannot be used: bad file, hash mismatch, or tensors that do not fit."""


class ConfigError(ValueError):
    """A configuration value that the code cannot act on."""
