"""A sweep's files: the `select_sweep` job's choice, written from the train summaries of
every grid point, and the train job such a choice points the evaluation (or a refit) to.
The rule that chooses is :func:`finegrained.plan.protocol.select`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from finegrained.errors import DataError
from finegrained.fileio import read_json, sha256_file, write_json
from finegrained.plan.protocol import chosen_train_variant, select
from finegrained.provenance import provenance
from finegrained.report.records import read_train_summary


def write_selection(regime: str, candidates: Mapping[str, Sequence[str | os.PathLike]],
                    out: str | os.PathLike, select_by: str = "val_top1") -> dict:
    """:func:`select` on the train summaries at ``candidates`` (grid point -> one summary.json
    path per replicate, each read checked: a validation figure out of range stops it),
    written to ``out`` with provenance (the summaries' sha256)."""
    summaries = {variant: [read_train_summary(p) for p in paths]
                 for variant, paths in candidates.items()}
    selection = select(regime, summaries, select_by)
    selection["provenance"] = {
        **provenance(device=False),
        "train_summaries_sha256": {str(p): sha256_file(p)
                                   for paths in candidates.values() for p in paths}}
    write_json(out, selection)
    return selection


def chosen_train_files(selection_path: str | os.PathLike, train_root: str | os.PathLike,
                       regime: str, variant: str) -> tuple[Path, Path]:
    """``(weights, summary.json)`` of the chosen train job under ``train_root``."""
    selection = read_json(selection_path, "sweep selection")
    if selection.get("regime") != regime:
        raise DataError(selection_path, f"a selection for {selection.get('regime')!r}, "
                                        f"not for {regime!r}")
    train_dir = Path(train_root) / f"{regime}{chosen_train_variant(selection, variant)}"
    return train_dir / "weights.safetensors", train_dir / "summary.json"
