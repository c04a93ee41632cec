"""Which jobs a run has and what each reads: the targets of the workflow's aggregate rules
and the input functions of its rules, from the validated config (paths as laid out by
:mod:`finegrained.plan.paths`).
"""

from __future__ import annotations

from typing import Mapping

from finegrained.plan import protocol
from finegrained.plan.paths import cache_index, results
from finegrained.plan.regimes import cached_layers, job_settings
from finegrained.plan.variants import join_variants


def feature_indexes(config: Mapping, regime: str, variant: str) -> dict[str, dict[str, str]]:
    """``{layer: {split: index.json}}`` of the caches one training job reads."""
    return {layer: {split: results(config, f"features/{cache_index(split, layer)}")
                    for split in ("train", "val")}
            for layer in cached_layers(config, regime, variant)}


# ---------------------------------------------------------------------------- training


def train_inputs(config: Mapping, regime: str, variant: str, folder: str = "train") -> dict:
    """Init weights for pretrained regimes; the feature cache indexes for cached ones; the
    linear probe job's weights and summary (under ``folder``: train, or refit) for a
    probe head."""
    settings = job_settings(config, regime, variant)
    inputs = {}
    if settings["init"] == "pretrained":
        inputs["init"] = results(config, "weights/init.safetensors")
    indexes = feature_indexes(config, regime, variant)
    if indexes:
        inputs["features"] = [path for by_split in indexes.values() for path in by_split.values()]
    for phase in settings["phases"]:
        if phase["kind"] == "probe_head":
            probe_dir = results(config, f"{folder}/{phase['probe']['regime']}"
                                        f"{phase['probe']['variant']}")
            inputs["probe_weights"] = f"{probe_dir}/weights.safetensors"
            inputs["probe_summary"] = f"{probe_dir}/summary.json"
    return inputs


def train_targets(config: Mapping) -> list[str]:
    """Every train job: each regime's grid points (if swept) times the replicate seeds, and
    the ``systems:`` comparison's jobs."""
    return [results(config, f"train/{regime}{variant}/summary.json")
            for regime in config["regimes"]
            for variant in (protocol.train_variants(config, regime)
                            + protocol.system_variants(config, regime))]


def systems_histories(config: Mapping) -> list[str]:
    return [results(config, f"train/{regime}{variant}/history.parquet")
            for regime in protocol.systems_comparison(config)["regimes"]
            for variant in protocol.system_variants(config, regime)]


def selection_targets(config: Mapping) -> list[str]:
    return [results(config, f"select/{regime}.json")
            for regime in config["regimes"] if protocol.has_sweep(config, regime)]


def sweep_candidates(config: Mapping, regime: str) -> dict[str, list[str]]:
    """Grid point -> the summary.json of each replicate, for select_sweep."""
    return {point: [results(config, f"train/{regime}{join_variants(point, rep)}/summary.json")
                    for rep in protocol.replicate_variants(config)]
            for point in protocol.sweep_variants(config, regime)}


def chosen_train_inputs(config: Mapping, regime: str, variant: str) -> dict:
    """The train job chosen on validation. For a swept regime (unless the variant names a
    grid point itself): the sweep's choice and every grid point of this replicate (the job
    opens the chosen one), so the DAG needs no checkpoint and `snakemake -n` shows the run."""
    if not protocol.has_sweep(config, regime) or protocol.is_sweep_point(config, regime, variant):
        train_dir = results(config, f"train/{regime}{variant}")
        return {"weights": f"{train_dir}/weights.safetensors",
                "summary": f"{train_dir}/summary.json"}
    points = [results(config, f"train/{regime}{join_variants(p, variant)}")
              for p in protocol.sweep_variants(config, regime)]
    return {"selection": results(config, f"select/{regime}.json"),
            "weights": [f"{p}/weights.safetensors" for p in points],
            "summary": [f"{p}/summary.json" for p in points]}


# ---------------------------------------------------------------------------- refit, evaluation


def refit_targets(config: Mapping) -> list[str]:
    """One refit per regime and replicate with ``protocol.refit``."""
    if not config["protocol"]["refit"]:
        return []
    return [results(config, f"refit/{regime}{variant}/summary.json")
            for regime in config["regimes"] for variant in protocol.replicate_variants(config)]


def refit_inputs(config: Mapping, regime: str, variant: str) -> dict:
    """A refit reads the chosen train job's summary (see :func:`chosen_train_inputs`), the
    inputs of that job, and the refit probe for a probe head."""
    chosen = {k: v for k, v in chosen_train_inputs(config, regime, variant).items()
              if k != "weights"}
    return {**train_inputs(config, regime, variant, folder="refit"), **chosen}


def eval_targets(config: Mapping) -> list[str]:
    """One evaluation per regime and replicate (of the chosen grid point, if swept)."""
    return [results(config, f"eval/{regime}{variant}/metrics.json")
            for regime in config["regimes"] for variant in protocol.replicate_variants(config)]


def evaluate_inputs(config: Mapping, regime: str, variant: str) -> dict:
    """The model an evaluation reads: the chosen train job, or with ``protocol.refit`` its
    refit on train + validation (an explicitly requested grid point: its train job)."""
    if protocol.uses_refit(config, regime, variant):
        refit_dir = results(config, f"refit/{regime}{variant}")
        return {"weights": f"{refit_dir}/weights.safetensors",
                "summary": f"{refit_dir}/summary.json"}
    return chosen_train_inputs(config, regime, variant)


def systems_report_targets(config: Mapping) -> list[str]:
    """The systems figure, when the config lists ``systems:`` for an SGD regime."""
    return ([results(config, "report/figures/systems.png")]
            if protocol.systems_comparison(config)["regimes"] else [])
