"""Errors that name the file, line and value at fault, so bad input is fixed quickly."""

from __future__ import annotations

import os

#: The most characters of a value (its repr) that an error message quotes, and of the file
#: name and the message around it: a 10 MB line in an annotation file gives a short message.
MAX_QUOTED = 300
MAX_MESSAGE = 1000

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
        where = shorten(self.path, MAX_MESSAGE)
        if line is not None:
            where += f":{line}"
        text = f"{where}: {shorten(message, MAX_MESSAGE)}"
        if value is not None:
            text += f" (value: {shorten(repr(value), MAX_QUOTED)})"
        super().__init__(text)


def shorten(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` itself, or its first ``limit`` characters and how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit:,} more characters]"


class WeightsError(ValueError):
    """Pretrained weights that cannot be used: bad file, hash mismatch, or tensors that do not fit."""


class ConfigError(ValueError):
    """A configuration value that the code cannot act on."""


class Everywhere:
    """Mixin of an error that every process of a job of several processes raises alike (a
    stop they agreed on, a value they all computed): only process 0 prints it."""


class StorageError(OSError):
    """An output that does not fit: the disk is full, the quota or the file-size limit
    reached. Names the file, the bytes it needs and the bytes free where it goes."""

    def __str__(self) -> str:
        return self.strerror
