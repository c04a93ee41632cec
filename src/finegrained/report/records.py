"""The result files the tables and figures read, each through one checked reader (no JAX).

A number a table prints must be what the job that wrote it computed. A value of the wrong
type or outside its range (a top-1 of 1.7, or written as the string ``"0.9"``, a negative
or fractional count, a NaN) is a :class:`~finegrained.errors.DataError` naming the file and
the key, never a cell of a table; a file a result records by hash (an evaluation's
predictions, a train job's history) must still have that hash.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from finegrained.errors import DataError
from finegrained.fileio import check_sha256, read_json

#: Keys of metrics.json that map names to a top-1 fraction (per taxonomy level, per class).
FRACTION_MAPS = ("per_level", "per_class")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fraction(value: Any, path: str | os.PathLike, key: str, *,
             optional: bool = False) -> float | None:
    """``value`` as a float in [0, 1] (an accuracy, a calibration error); None passes when
    ``optional``."""
    if value is None and optional:
        return None
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        kind = "" if _is_number(value) else f" ({type(value).__name__})"
        raise DataError(path, f"{key} is {value!r}{kind}, not a fraction in [0, 1]")
    return float(value)


def count(value: Any, path: str | os.PathLike, key: str, *, minimum: int = 0,
          optional: bool = False) -> int | None:
    """``value`` as an integer >= ``minimum`` (a number of images)."""
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(path, f"{key} is {value!r}, not a whole number >= {minimum}")
    return value


def seconds(value: Any, path: str | os.PathLike, key: str) -> float:
    """``value`` as a finite, non-negative number of seconds."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise DataError(path, f"{key} is {value!r}, not a number of seconds >= 0")
    return float(value)


def _mapping(value: Any, path, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise DataError(path, f"{key} is {value!r}, not a mapping")
    return value


def check_metrics(metrics: Any, path: str | os.PathLike) -> dict:
    """``metrics`` (a ``metrics.json``'s content) if every value the report reads has its
    type and range: ``regime`` a string, ``n_test`` >= 1, one view or more, each with
    ``top1`` <= ``top5`` in [0, 1], the
    per-level and per-class top-1 and ``ece`` in [0, 1] (or null), ``confused_pairs``
    counts and ``protocol.train_count`` whole numbers >= 0."""
    metrics = dict(_mapping(metrics, path, "the file"))
    if not isinstance(metrics.get("regime"), str):
        raise DataError(path, f"regime is {metrics.get('regime')!r}, not a regime name")
    count(metrics.get("n_test"), path, "n_test", minimum=1)
    views = _mapping(metrics.get("views"), path, "views")
    if not views:
        raise DataError(path, "views is empty: no test-time view was scored")
    for view in views:
        scores = _mapping(views[view], path, f"views.{view}")
        top1 = fraction(scores.get("top1"), path, f"views.{view}.top1")
        top5 = fraction(scores.get("top5"), path, f"views.{view}.top5")
        if top5 < top1:
            raise DataError(path, f"views.{view}.top5 is {top5}, below its top1 {top1}")
    for name in FRACTION_MAPS:
        for key, value in _mapping(metrics.get(name, {}), path, name).items():
            fraction(value, path, f"{name}.{key}", optional=name == "per_class")
    fraction(metrics.get("ece"), path, "ece", optional=True)
    for i, pair in enumerate(metrics.get("confused_pairs") or []):
        if not (isinstance(pair, list) and len(pair) == 3):
            raise DataError(path, f"confused_pairs.{i} is {pair!r}, not [true, predicted, count]")
        count(pair[2], path, f"confused_pairs.{i}.2", minimum=1)
    protocol = _mapping(metrics.get("protocol", {}), path, "protocol")
    count(protocol.get("train_count"), path, "protocol.train_count", optional=True)
    return metrics


def read_metrics(path: str | os.PathLike) -> dict:
    """An evaluation's ``metrics.json``, checked (:func:`check_metrics`)."""
    return check_metrics(read_json(path, "metrics file"), path)


def read_train_summary(path: str | os.PathLike) -> dict:
    """A train job's ``summary.json``, its validation figures checked: top-1 a fraction,
    loss a finite number >= 0 (null for a refit, which has no validation)."""
    summary = _mapping(read_json(path, "train summary"), path, "the file")
    fraction(summary.get("best_val_top1"), path, "best_val_top1", optional=True)
    loss = summary.get("best_val_loss")
    if loss is not None and not (_is_number(loss) and math.isfinite(loss) and loss >= 0):
        raise DataError(path, f"best_val_loss is {loss!r}, not a loss >= 0")
    return dict(summary)


def check_recorded(path: str | os.PathLike, record: Mapping, record_path, key: str) -> Path:
    """``path`` if it has the sha256 that ``record`` (read from ``record_path``) holds under
    ``key`` (a dotted path): the file the job that wrote the record wrote beside it."""
    recorded: Any = record
    for part in key.split("."):
        recorded = recorded.get(part) if isinstance(recorded, Mapping) else None
    check_sha256(path, recorded, f"{record_path} ({key})",
                 f"rerun the job that wrote both (delete {record_path} and rerun snakemake)")
    return Path(path)


def checked_history(path: str | os.PathLike) -> Path:
    """A train job's ``history.parquet`` if it has the sha256 that the ``summary.json``
    beside it records."""
    summary = Path(path).with_name("summary.json")
    return check_recorded(path, read_train_summary(summary), summary, "history_sha256")


def checked_predictions(path: str | os.PathLike, metrics: Mapping) -> Path:
    """An evaluation's ``predictions.parquet`` if it has the sha256 that its ``metrics``
    (the ``metrics.json`` beside it) record."""
    return check_recorded(path, metrics, Path(path).with_name("metrics.json"),
                          "provenance.predictions_sha256")
