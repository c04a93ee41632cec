"""The protocol around the regimes: replicate seeds, sweeps, and the choice on validation.

No JAX here: the Snakefile imports it. A job is a regime plus a *variant*
(:func:`finegrained.train.regimes.parse_variant`), and both expand through variants:

- ``seeds: [0, 1, 2]`` trains and evaluates every regime once per seed. The replicate at
  ``train.seed`` keeps the plain paths (``train/<regime>/``, ``eval/<regime>/``); the others
  are ``<regime>+seed=N``.
- ``sweep: {full_finetune: {lr: [0.003, 0.01]}}`` trains every grid point of every replicate
  (``full_finetune+lr=0.003``, ``full_finetune+seed=1+lr=0.003``, ...). :func:`select` picks
  one grid point from the validation results of all replicates, and the evaluation of each
  replicate reads that point's training job (:func:`chosen_train_variant`): the test split
  sees only the chosen one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from finegrained.errors import ConfigError, DataError
from finegrained.fileio import sha256_file, write_json
from finegrained.provenance import provenance
from finegrained.train.regimes import VARIANT_KEYS, parse_variant

#: What :func:`select` maximises, per candidate: the mean over replicates of this field of
#: the train job's summary.json (the best epoch's validation top-1).
SELECTION_METRIC = "best_val_top1"
SELECTION_RULE = ("highest mean validation top-1 over the replicates (each replicate at its "
                  "best epoch); ties: lower mean validation loss, then the first in grid order")


def format_variant(overrides: Mapping) -> str:
    """``{'lr': 0.003, 'seed': 1}`` -> ``'+seed=1+lr=0.003'`` (keys in ``VARIANT_KEYS`` order,
    so one set of overrides has one path)."""
    unknown = set(overrides) - set(VARIANT_KEYS)
    if unknown:
        raise ConfigError(f"variant keys {sorted(unknown)} are not among {VARIANT_KEYS}")
    return "".join(f"+{key}={_format_value(overrides[key])}"
                   for key in VARIANT_KEYS if key in overrides)


def _format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"variant value {value!r} is not a number")
    return str(value) if isinstance(value, int) else repr(float(value))


def join_variants(*variants: str) -> str:
    """The variant with the overrides of all of ``variants`` (which must not overlap)."""
    merged: dict = {}
    for variant in variants:
        overrides = parse_variant(variant)
        overlap = set(merged) & set(overrides)
        if overlap:
            raise ConfigError(f"variants {variants} both set {sorted(overlap)}")
        merged.update(overrides)
    return format_variant(merged)


def replicate_variants(config: Mapping) -> list[str]:
    """One variant per replicate seed: ``''`` for ``train.seed`` (or for no ``seeds``)."""
    base = config["train"]["seed"]
    seeds = config.get("seeds") or [base]
    return [format_variant({} if seed == base else {"seed": seed}) for seed in seeds]


def has_sweep(config: Mapping, regime: str) -> bool:
    return bool((config.get("sweep") or {}).get(regime))


def sweep_variants(config: Mapping, regime: str) -> list[str]:
    """The grid points of ``regime``'s sweep (``['']`` without one), in grid order: the
    product of the values, first key outermost."""
    grid = (config.get("sweep") or {}).get(regime) or {}
    keys = list(grid)
    return [format_variant(dict(zip(keys, values)))
            for values in itertools.product(*(grid[k] for k in keys))]


def train_variants(config: Mapping, regime: str) -> list[str]:
    """Every train job of ``regime``: each grid point of each replicate."""
    return [join_variants(point, replicate)
            for point in sweep_variants(config, regime) for replicate in replicate_variants(config)]


def is_sweep_point(config: Mapping, regime: str, variant: str) -> bool:
    """Whether ``variant`` names a grid point itself (an explicit request, evaluated as is)."""
    grid = (config.get("sweep") or {}).get(regime) or {}
    return bool(set(parse_variant(variant)) & set(grid))


def chosen_train_variant(selection: Mapping, variant: str) -> str:
    """The train job that ``eval/<regime><variant>/`` of a swept regime evaluates: replicate
    ``variant`` at the grid point ``selection`` chose (a select/<regime>.json)."""
    return join_variants(selection["chosen"], variant)


def chosen_train_files(selection_path: str | os.PathLike, train_root: str | os.PathLike,
                       regime: str, variant: str) -> tuple[Path, Path]:
    """``(weights, summary.json)`` of the chosen train job under ``train_root``."""
    selection = json.loads(Path(selection_path).read_text())
    if selection.get("regime") != regime:
        raise DataError(selection_path, f"a selection for {selection.get('regime')!r}, "
                                        f"not for {regime!r}")
    train_dir = Path(train_root) / f"{regime}{chosen_train_variant(selection, variant)}"
    return train_dir / "weights.safetensors", train_dir / "summary.json"


def check_protocol(config: Mapping) -> None:
    """What the schema cannot say: a sweep names trained regimes, and not the L-BFGS probe
    (it chooses its L2 strength on validation itself, from ``l2_grid``)."""
    for regime, grid in (config.get("sweep") or {}).items():
        if regime not in config["regimes"]:
            raise ConfigError(f"sweep.{regime}: {regime!r} is not in regimes {config['regimes']}")
        if config["regime_settings"][regime]["solver"] == "lbfgs":
            raise ConfigError(f"sweep.{regime}: the L-BFGS probe has no SGD settings to sweep; "
                              f"it chooses its L2 strength from regime_settings.{regime}.l2_grid")
        if "seed" in grid:
            raise ConfigError(f"sweep.{regime}.seed: replicate seeds go in `seeds:`")


def select(regime: str, candidates: Mapping[str, Sequence[Mapping]]) -> dict:
    """Choose one grid point of ``regime``'s sweep from its train summaries.

    ``candidates``: grid point variant -> the summary.json of each of its replicates. Returns
    what the report states: the rule, every candidate's validation figures, the choice.
    """
    rows = []
    for order, (variant, summaries) in enumerate(candidates.items()):
        if not summaries:
            raise ConfigError(f"{regime}{variant}: no train results to select from")
        top1 = [float(s[SELECTION_METRIC]) for s in summaries]
        loss = [float(s["best_val_loss"]) for s in summaries]
        rows.append({"variant": variant, "overrides": parse_variant(variant),
                     "replicates": [s.get("variant", "") for s in summaries],
                     "val_top1": top1, "val_top1_mean": sum(top1) / len(top1),
                     "val_loss_mean": sum(loss) / len(loss), "order": order})
    best = min(rows, key=lambda r: (-r["val_top1_mean"], _nan_last(r["val_loss_mean"]),
                                    r["order"]))
    for row in rows:
        del row["order"]
    return {"regime": regime, "metric": SELECTION_METRIC, "rule": SELECTION_RULE,
            "chosen": best["variant"], "chosen_overrides": best["overrides"],
            "candidates": rows}


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def write_selection(regime: str, candidates: Mapping[str, Sequence[str | os.PathLike]],
                    out: str | os.PathLike) -> dict:
    """:func:`select` on the train summaries at ``candidates`` (grid point -> one summary.json
    path per replicate), written to ``out`` with provenance (the summaries' sha256)."""
    summaries = {variant: [json.loads(Path(p).read_text()) for p in paths]
                 for variant, paths in candidates.items()}
    selection = select(regime, summaries)
    selection["provenance"] = {
        **provenance(device=False),
        "train_summaries_sha256": {str(p): sha256_file(p)
                                   for paths in candidates.values() for p in paths}}
    write_json(out, selection)
    return selection
