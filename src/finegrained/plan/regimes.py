"""Transfer regimes: from the validated config to the resolved settings of one job.

Every regime is the same mechanism with other values (``regime_settings.<name>`` in the
config schema, which holds every default): parameter groups by regex with learning-rate
multipliers, a recipe, an augmentation, and whether the frozen part's output is read from
the feature cache. This module turns a regime's preset into *phases*, each a complete
``TrainSettings`` dict (or an L-BFGS solve), with nothing left to defaults; a job receives
that JSON and does what it says. A regime gets no code path of its own beyond caching:

- ``freeze_up_to`` (``stem``, ``strideK``, a ViT's ``blockK``: see
  :mod:`finegrained.plan.archs`) freezes the lower stages and is also the forward cut
  point: the cache holds the activation after the last frozen stage (:func:`cut_stage`),
  pooled when that is the whole backbone.
- ``head_from: linear_probe`` starts with the linear probe job's converged head (a phase
  that reads the probe's weights: LP-FT); ``head_from: sgd`` with ``head_epochs > 0`` adds a
  head-only SGD phase with its own lr and patience. Either way the regime's own phase
  follows, with fresh data-order and augmentation streams.
- ``solver: lbfgs`` (whole backbone frozen, no augmentation) solves the probe on the
  cached pooled features instead of running SGD.

A *variant* (``+seed=1``, ``+lr=0.003``, joined) overrides keys of one job: replicates and
sweeps expand through it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Mapping

import numpy as np

from finegrained.errors import ConfigError
from finegrained.plan.archs import architecture, model_settings
from finegrained.plan.augment import is_augmented
from finegrained.plan.paths import MAP_SUFFIX
from finegrained.plan.schema import SCHEMA
from finegrained.plan.variants import parse_variant

#: The transfer regimes, in the schema's order (`regimes:`).
REGIMES = tuple(SCHEMA["properties"]["regimes"]["items"]["enum"])

#: Recipe keys (``$defs/recipe``; ``param_groups`` is resolved per regime) and run keys
#: (``$defs/run``; ``keep_checkpoints`` is the job's): with the parameter groups and the input
#: placement, the fields of ``TrainSettings``, under the same names.
RECIPE_KEYS = tuple(k for k in SCHEMA["$defs"]["recipe"]["properties"] if k != "param_groups")
RUN_KEYS = tuple(k for k in SCHEMA["$defs"]["run"]["properties"] if k != "keep_checkpoints")


def body_stages(backbone: Mapping) -> list[str]:
    """The backbone's stages in order (everything but the head)."""
    return architecture(backbone["arch"]).body_stages(backbone["stage_depths"])


def frozen_stages(backbone: Mapping, freeze_up_to: str | None) -> list[str]:
    """The stages ``freeze_up_to`` freezes (:meth:`Architecture.frozen_stages`)."""
    return architecture(backbone["arch"]).frozen_stages(freeze_up_to, backbone["stage_depths"])


def cut_stage(backbone: Mapping, freeze_up_to: str | None) -> str | None:
    """The last frozen stage: the forward cut point and the cached boundary."""
    stages = frozen_stages(backbone, freeze_up_to)
    return stages[-1] if stages else None


def freezes_all(backbone: Mapping, freeze_up_to: str | None) -> bool:
    """Whether ``freeze_up_to`` freezes the whole backbone (only the head trains)."""
    return frozen_stages(backbone, freeze_up_to) == body_stages(backbone)


def param_groups(backbone: Mapping, regime: Mapping[str, Any]) -> list[list]:
    """``[regex, lr_mult]`` pairs of a regime: the user's first, then the frozen stages,
    the stem (``freeze_stem``), then the trained body stages at ``backbone_lr_mult`` (each
    decayed from the top by ``layer_decay``), the head at x1."""
    groups = [list(g) for g in regime["param_groups"]]
    frozen = frozen_stages(backbone, regime["freeze_up_to"])
    if regime["freeze_stem"] and "stem" not in frozen:
        frozen = ["stem", *frozen]
    if frozen:
        groups.append([f"({'|'.join(frozen)})/.*", 0.0])
    stages = body_stages(backbone)
    mult = regime["backbone_lr_mult"]
    if len(frozen) < len(stages) and regime["layer_decay"] is not None and mult:
        # from the top: the last body stage at lr x mult, each one below at layer_decay more
        groups += [[f"{stage}/.*", float(mult) * regime["layer_decay"] ** (len(stages) - 1 - k)]
                   for k, stage in enumerate(stages) if stage not in frozen]
    elif len(frozen) < len(stages) and (mult is None or float(mult) != 1.0):
        groups.append(["head/.*", 1.0])
        groups.append([".*", mult])
    return groups


def _train_settings(recipe: Mapping, run: Mapping, **fields) -> dict:
    """A complete ``TrainSettings`` dict: the recipe's keys, the run's, then ``fields``."""
    d = {key: copy.deepcopy(recipe[key]) for key in RECIPE_KEYS}
    d.update({key: run[key] for key in RUN_KEYS})
    d.update(fields)
    return d


def phase_seed(seed: int, phase: int) -> int:
    """Phase 0 uses the run seed; later phases fresh streams derived from it."""
    if phase == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), phase]).generate_state(1)[0] % (2 ** 31))


def _input(backbone: Mapping, regime: Mapping, augment: Mapping, freeze_up_to) -> dict:
    """Where a phase's inputs come from: pixels, or the cache after the cut stage."""
    cut = cut_stage(backbone, freeze_up_to)
    if cut is None:
        return {"kind": "pixels", "start": None, "cut": None}
    augmented = is_augmented(augment)
    if regime["use_cache"] and not augmented:
        pooled = cut == body_stages(backbone)[-1]
        return {"kind": "cache", "layer": cut if pooled else cut + MAP_SUFFIX,
                "start": cut, "cut": None}
    return {"kind": "pixels", "start": None, "cut": cut}


PROBE = "linear_probe"


def _check_recipe(where: str, recipe: Mapping, init: str) -> None:
    if recipe["regularizer"] == "l2_sp" and init != "pretrained":
        raise ConfigError(f"{where}: regularizer l2_sp pulls the weights toward the pretrained "
                          f"ones, but this job starts from a random initialisation; use "
                          f"regularizer: weight_decay")


def probe_source(config: Mapping, seed: int) -> dict:
    """The linear probe job whose head a ``head_from: linear_probe`` job starts from: the
    replicate at ``seed``, with the config hash its summary must carry."""
    probe = config["regime_settings"][PROBE]
    if not freezes_all(config["backbone"], probe["freeze_up_to"]) or probe["init"] != "pretrained":
        raise ConfigError(f"head_from: linear_probe needs regime_settings.{PROBE} to train the "
                          f"head alone on the pretrained backbone (init: pretrained, "
                          f"freeze_up_to: stride32)")
    variant = "" if int(seed) == int(config["train"]["seed"]) else f"+seed={int(seed)}"
    return {"regime": PROBE, "variant": variant,
            "config_hash": job_settings(config, PROBE, variant)["config_hash"]}


def job_settings(config: Mapping, regime_name: str, variant: str = "") -> dict:
    """The resolved settings of one train job (JSON-serialisable, no defaults left)."""
    if regime_name not in config["regime_settings"]:
        raise ConfigError(f"regime {regime_name!r} has no regime_settings entry")
    overrides = parse_variant(variant)
    regime = copy.deepcopy(dict(config["regime_settings"][regime_name]))
    run = dict(config["train"])
    for key, value in overrides.items():
        if key == "system":
            systems = config.get("systems") or {}
            if value not in systems:
                raise ConfigError(f"system {value!r} is not among systems: {sorted(systems)}")
            for block, keys in systems[value].items():          # parallel / precision
                run[block] = {**run[block], **keys}
        else:
            (run if key == "seed" else regime)[key] = value
    backbone = config["backbone"]
    select_by = config["protocol"]["select_by"]
    _check_recipe(f"regime_settings.{regime_name}", regime, regime["init"])
    phases = []
    if regime["solver"] == "lbfgs":
        if not freezes_all(backbone, regime["freeze_up_to"]) or is_augmented(regime["augment"]):
            raise ConfigError(f"regime_settings.{regime_name}: solver lbfgs needs the whole "
                              f"backbone frozen (freeze_up_to: stride32) and no augmentation")
        layer = body_stages(backbone)[-1]
        phases.append({"name": "probe", "kind": "lbfgs", "l2_grid": list(regime["l2_grid"]),
                       "max_iter": regime["lbfgs_max_iter"], "select_by": select_by,
                       "input": {"kind": "cache", "layer": layer, "start": layer, "cut": None}})
    else:
        if regime["head_from"] == PROBE:
            if regime_name == PROBE or regime["init"] != "pretrained":
                raise ConfigError(f"regime_settings.{regime_name}: head_from linear_probe needs "
                                  f"a pretrained regime other than the probe itself")
            phases.append({"name": "head", "kind": "probe_head",
                           "input": {"kind": "probe", "start": None, "cut": None},
                           "probe": probe_source(config, run["seed"])})
        elif regime["head_epochs"] > 0:
            head = dict(regime, freeze_up_to="stride32", freeze_stem=False, param_groups=[])
            inp = _input(backbone, regime, regime["augment"], "stride32")
            phases.append({"name": "head", "kind": "sgd", "input": inp,
                           "train_settings": _train_settings(
                               dict(regime, epochs=regime["head_epochs"], lr=regime["head_lr"],
                                    patience=regime["head_patience"]),
                               run, param_groups=param_groups(backbone, head),
                               start=inp["start"], cut=inp["cut"], select_by=select_by)})
        inp = _input(backbone, regime, regime["augment"], regime["freeze_up_to"])
        phases.append({"name": "main", "kind": "sgd", "input": inp,
                       "train_settings": _train_settings(
                           regime, run, param_groups=param_groups(backbone, regime),
                           start=inp["start"], cut=inp["cut"], select_by=select_by)})
    for i, phase in enumerate(phases):
        if "train_settings" in phase:
            phase["train_settings"]["seed"] = phase_seed(run["seed"], i)
    settings = {
        "regime": regime_name, "variant": variant, "model": model_settings(backbone),
        "init": regime["init"], "seed": run["seed"], "keep_checkpoints": run["keep_checkpoints"],
        "verify_shards": config["shards"].get("verify", True), "select_by": select_by,
        "phases": phases,
    }
    settings["config_hash"] = settings_hash(settings)
    return settings


def pretrain_settings(config: Mapping) -> dict:
    """The resolved settings of the pretrain rule: architecture and one TrainSettings dict
    (the ``pretrain`` block holds every recipe and run key)."""
    block = config["pretrain"]
    backbone = config["backbone"]
    _check_recipe("pretrain", block, "random")
    return {"model": model_settings(backbone),
            "verify_shards": config["shards"].get("verify", True),
            "keep_checkpoints": block["keep_checkpoints"],
            "train_settings": _train_settings(
                block, block, param_groups=list(block["param_groups"]), start=None, cut=None,
                select_by=config["protocol"]["select_by"])}


def pooled_layers(config: Mapping) -> list[str]:
    """The pooled layers the features rule caches: ``features.layers`` (default: the last
    two stages), the last stage always."""
    backbone = config["backbone"]
    arch = architecture(backbone["arch"])
    layers = list(config["features"]["layers"]
                  or arch.default_feature_layers(backbone["stage_depths"]))
    stages = body_stages(backbone)
    for layer in layers:
        if layer.split(":")[0] not in stages:
            raise ConfigError(f"features.layers: {layer!r} is not a stage of {arch.name}; "
                              f"stages are {stages}")
    if stages[-1] not in layers:
        layers.append(stages[-1])
    return layers


def cached_layers(config: Mapping, regime_name: str, variant: str = "") -> list[str]:
    """The cached layers one training job reads (pooled features or boundary maps)."""
    layers = []
    for phase in job_settings(config, regime_name, variant)["phases"]:
        if phase["input"]["kind"] == "cache" and phase["input"]["layer"] not in layers:
            layers.append(phase["input"]["layer"])
    return layers


def settings_hash(settings: Mapping) -> str:
    """sha256 of the settings JSON (sorted keys), without the hash itself."""
    clean = {k: v for k, v in settings.items() if k != "config_hash"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()
