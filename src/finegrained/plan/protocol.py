"""The protocol around the regimes: replicate seeds, sweeps, and the choice on validation.

No JAX here: the Snakefile imports it. A job is a regime plus a *variant*
(:mod:`finegrained.plan.variants`), and both expand through variants:

- ``seeds: [0, 1, 2]`` trains and evaluates every regime once per seed. The replicate at
  ``train.seed`` keeps the plain paths (``train/<regime>/``, ``eval/<regime>/``); the others
  are ``<regime>+seed=N``.
- ``sweep: {full_finetune: {lr: [0.003, 0.01]}}`` trains every grid point of every replicate
  (``full_finetune+lr=0.003``, ``full_finetune+seed=1+lr=0.003``, ...). :func:`select` picks
  one grid point from the validation results of all replicates, and the evaluation of each
  replicate reads that point's training job (:func:`chosen_train_variant`): the test split
  sees only the chosen one.
- ``protocol.select_by`` is the one comparison every choice uses (:mod:`finegrained.plan.selection`).
- ``protocol.refit: true`` trains the chosen recipe once more on train + validation for the
  chosen epochs (:func:`refit_settings`), under ``refit/<regime><replicate>/``; the
  evaluation reads that model.
"""

from __future__ import annotations

import copy
import itertools
from typing import Mapping, Sequence

from finegrained.errors import ConfigError, DataError
from finegrained.plan.regimes import job_settings, settings_hash
from finegrained.plan.selection import RULES, selection_key
from finegrained.plan.variants import format_variant, join_variants, parse_variant


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


def system_variants(config: Mapping, regime: str) -> list[str]:
    """The train jobs of the ``systems:`` comparison for ``regime`` (an SGD regime, with its
    preset recipe): one per system and replicate; none for the L-BFGS probe."""
    systems = config.get("systems") or {}
    if not systems or config["regime_settings"][regime]["solver"] == "lbfgs":
        return []
    return [join_variants(format_variant({"system": name}), replicate)
            for name in systems for replicate in replicate_variants(config)]


def selection_settings(config: Mapping) -> dict:
    """The settings of a sweep's selection job (``select_sweep``)."""
    return {"select_by": config["protocol"]["select_by"]}


def systems_comparison(config: Mapping) -> dict:
    """What the systems report compares: the regimes with ``systems:`` jobs, the system
    names and the replicate variants (the notebook's parameters besides its paths)."""
    return {"regimes": [r for r in config["regimes"] if system_variants(config, r)],
            "systems": list(config.get("systems") or {}),
            "variants": replicate_variants(config)}


def is_sweep_point(config: Mapping, regime: str, variant: str) -> bool:
    """Whether ``variant`` names a grid point itself (an explicit request, evaluated as is)."""
    grid = (config.get("sweep") or {}).get(regime) or {}
    return bool(set(parse_variant(variant)) & set(grid))


def uses_refit(config: Mapping, regime: str, variant: str) -> bool:
    """Whether ``eval/<regime><variant>/`` reads a refit: with ``protocol.refit``, unless the
    variant names a grid point itself (evaluated as trained)."""
    return bool(config["protocol"]["refit"]) and not is_sweep_point(config, regime, variant)


def chosen_train_variant(selection: Mapping, variant: str) -> str:
    """The train job that ``eval/<regime><variant>/`` of a swept regime evaluates: replicate
    ``variant`` at the grid point ``selection`` chose (a select/<regime>.json)."""
    return join_variants(selection["chosen"], variant)


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


def select(regime: str, candidates: Mapping[str, Sequence[Mapping]],
           select_by: str = "val_top1") -> dict:
    """Choose one grid point of ``regime``'s sweep from its train summaries.

    ``candidates``: grid point variant -> the summary.json of each of its replicates. The
    rule (``select_by``) compares the means over the replicates of each one's best epoch.
    Returns what the report states: the rule, every candidate's validation figures, the
    choice. A summary chosen by another rule is refused (its epochs were picked by it).
    """
    rows = []
    for order, (variant, summaries) in enumerate(candidates.items()):
        if not summaries:
            raise ConfigError(f"{regime}{variant}: no train results to select from")
        for s in summaries:
            if s.get("select_by", "val_top1") != select_by:
                raise DataError(f"{regime}{s.get('variant', '')}", f"its best epoch was chosen "
                                f"by {s.get('select_by')}, the run selects by {select_by}: "
                                f"retrain it")
        top1 = [float(s["best_val_top1"]) for s in summaries]
        loss = [float(s["best_val_loss"]) for s in summaries]
        rows.append({"variant": variant, "overrides": parse_variant(variant),
                     "replicates": [s.get("variant", "") for s in summaries],
                     "val_top1": top1, "val_top1_mean": sum(top1) / len(top1),
                     "val_loss": loss, "val_loss_mean": sum(loss) / len(loss), "order": order})
    best = min(rows, key=lambda r: (*selection_key(r["val_top1_mean"], r["val_loss_mean"],
                                                   select_by), r["order"]))
    for row in rows:
        del row["order"]
    return {"regime": regime, "select_by": select_by,
            "rule": f"{RULES[select_by]} in grid order; means over the replicates, each at its "
                    f"best epoch",
            "chosen": best["variant"], "chosen_overrides": best["overrides"],
            "candidates": rows}


# ---------------------------------------------------------------------------- refit


def refit_request(config: Mapping, regime: str, variant: str) -> dict:
    """What a refit job of ``regime`` for replicate ``variant`` is told at planning time:
    the config hash of every train job it may repeat (the grid points of this replicate),
    so the summary it reads is checked against the current config."""
    points = sweep_variants(config, regime) if has_sweep(config, regime) else [""]
    return {"regime": regime, "variant": variant,
            "select_by": config["protocol"]["select_by"],
            "candidates": {join_variants(p, variant): job_settings(
                config, regime, join_variants(p, variant))["config_hash"] for p in points}}


def refit_settings(request: Mapping, summary: Mapping) -> dict:
    """The settings of a refit: the phases of the chosen train job (its ``summary``), each
    trained on train + validation for the epochs that job ran, the best phase for its best
    epoch (on the schedule planned for all its epochs), later phases dropped; the L-BFGS
    probe with its chosen L2 strength; a probe head from the refit probe."""
    want = request["candidates"].get(summary.get("variant"))
    if want is None or summary["config_hash"] != want:
        raise DataError(f"train/{summary.get('regime')}{summary.get('variant', '')}",
                        f"this summary is not of a train job the current config asks for "
                        f"(config hash {summary['config_hash'][:12]}; expected one of "
                        f"{sorted(h[:12] for h in request['candidates'].values())}): rerun it")
    if summary.get("select_by") != request["select_by"]:
        raise DataError(f"train/{summary['regime']}{summary['variant']}",
                        f"its epoch was chosen by {summary.get('select_by')}, the run selects "
                        f"by {request['select_by']}: rerun it")
    settings = copy.deepcopy(summary["settings"])
    phases = []
    for phase in settings["phases"]:
        if phase["kind"] == "lbfgs":
            phase["l2_grid"] = [summary["best"]["l2"]]
        elif phase["kind"] == "sgd":
            phase["stop_after_epochs"] = (summary["best_epoch"]
                                          if phase["name"] == summary["best_phase"]
                                          else summary["phase_epochs"][phase["name"]])
        elif phase["kind"] == "probe_head":
            phase["probe"]["refit"] = True
        phases.append(phase)
        if phase["name"] == summary["best_phase"]:
            break
    settings.update(phases=phases, variant=request["variant"], refit={
        "train_config_hash": summary["config_hash"], "train_variant": summary["variant"],
        "select_by": summary["select_by"], "best_phase": summary["best_phase"],
        "best_epoch": summary["best_epoch"], "best_val_top1": summary["best_val_top1"],
        "trained_on": "train+val"})
    settings["config_hash"] = settings_hash(settings)
    return settings
