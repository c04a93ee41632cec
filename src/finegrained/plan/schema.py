"""The config schema and its loader: validated against workflow/schemas/config.schema.yaml,
defaults filled in.

The Snakefile and the tests use this one function, so a wrong key or value fails the same
way everywhere: before any job runs, with the dotted path of the offending key.

Values given on Snakemake's command line inside a nested mapping arrive as text
(``--config 'resources={train: {gpu: 1}}'`` gives ``'1'``): where the schema expects a
number, a boolean or null, such text is read as one first (:func:`coerce_types`).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from finegrained.errors import ConfigError, WeightsError, shorten
from finegrained.plan.archs import ARCHITECTURES, architecture
from finegrained.plan.paths import download_path, is_url

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


#: The workflow's schema, read once (the planning code reads its key lists from it).
SCHEMA = load_schema()


def _validator_with_defaults(schema: dict):
    """A Draft 2020-12 validator that fills in `default`s while it validates (jsonschema FAQ)."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" not in prop:
                    continue
                if name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])
                elif isinstance(instance[name], dict) and isinstance(prop["default"], dict):
                    # An object default is a preset: keys the user left out keep its values.
                    _fill_missing(instance[name], prop["default"])
        yield from validate_properties(validator, properties, instance, subschema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def _fill_missing(instance: dict, preset: Mapping) -> None:
    for key, value in preset.items():
        if key not in instance:
            instance[key] = copy.deepcopy(value)
        elif isinstance(instance[key], dict) and isinstance(value, Mapping):
            _fill_missing(instance[key], value)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _resolve(schema: Mapping, root: Mapping) -> Mapping:
    """``schema`` with a local ``$ref`` (``#/$defs/...``) merged in."""
    ref = schema.get("$ref")
    if not ref:
        return schema
    target = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return {**_resolve(target, root), **{k: v for k, v in schema.items() if k != "$ref"}}


_NULL_TEXT = ("null", "~", "None")
_BOOL_TEXT = {"true": True, "false": False}


def _coerce_scalar(value, schema: Mapping):
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    if "enum" in schema and not types:
        types = ["null"] if None in schema["enum"] else []
    if isinstance(value, str) and "string" not in types:
        text = value.strip()
        if "null" in types and text in _NULL_TEXT:
            return None
        if "boolean" in types and text.lower() in _BOOL_TEXT:
            return _BOOL_TEXT[text.lower()]
        if "integer" in types and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if "number" in types:
            try:
                return float(text)
            except ValueError:
                return value
    if (isinstance(value, float) and value.is_integer() and "integer" in types
            and "number" not in types):
        return int(value)        # 32.0 where an integer is meant (a batch size in a sweep)
    return value


def coerce_types(instance, schema: Mapping, root: Mapping | None = None):
    """Read text as the number, boolean or null the schema expects there (in place for
    mappings and lists; returns the value). Text that is no such value is left for the
    validator to name."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = properties.get(key, extra if isinstance(extra, Mapping) else None)
            if sub is not None:
                instance[key] = coerce_types(value, sub, root)
        return instance
    if isinstance(instance, list):
        prefix = schema.get("prefixItems", [])
        items = schema.get("items")
        for i, value in enumerate(instance):
            sub = prefix[i] if i < len(prefix) else items if isinstance(items, Mapping) else None
            if sub is not None:
                instance[i] = coerce_types(value, sub, root)
        return instance
    return _coerce_scalar(instance, schema)


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` in place (text read as numbers where the schema says so, defaults
    filled in) and return it; ConfigError names every problem once."""
    schema = SCHEMA if schema is None else schema
    _check_size(config)
    given_source = isinstance(config.get("pretrain"), Mapping) and "dataset" in config["pretrain"]
    coerce_types(config, schema)
    _check_finite(config)
    _apply_family_presets(config, schema)
    errors = sorted(_validator_with_defaults(schema).iter_errors(config),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = list(dict.fromkeys(f"  {_dotted(e.absolute_path)}: {shorten(e.message)}"
                                   for e in errors))
        if any(e.validator == "type" and isinstance(e.instance, str) for e in errors):
            lines.append("  (text where the schema wants a number, true/false or null: write "
                         "the value itself, e.g. --config 'resources={train: {gpu: 1}}')")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    _check_cross_field(config, given_source=given_source)
    return config


#: The most values a config may hold, counted as if every YAML alias were written out: a
#: few aliases nested in each other ("billion laughs") expand a 1 KB file to millions.
MAX_CONFIG_VALUES = 100_000


def _check_size(config: Mapping) -> None:
    """Refuse a config that expands past :data:`MAX_CONFIG_VALUES` values, naming the
    top-level key where the count ran out (before anything walks it whole)."""
    budget = MAX_CONFIG_VALUES

    def count(value) -> None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise OverflowError
        children = (value.values() if isinstance(value, Mapping)
                    else value if isinstance(value, (list, tuple)) else ())
        for child in children:
            count(child)

    for key, value in config.items():
        try:
            count(value)
        except (OverflowError, RecursionError):
            raise ConfigError(f"{key}: holds more than {MAX_CONFIG_VALUES:,} values once its "
                              f"YAML aliases (&name / *name) are expanded; write the values "
                              f"out, or fewer") from None


def _check_finite(value, path=()) -> None:
    """Every number in the config is finite: YAML's ``.nan`` and ``.inf`` (or ``nan`` given
    on the command line) pass a schema's bounds, and fail later or write a NaN model."""
    if isinstance(value, Mapping):
        for key, child in value.items():
            _check_finite(child, (*path, key))
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            _check_finite(child, (*path, i))
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{_dotted(path)}: {value!r} is not a finite number")


def _apply_family_presets(config: dict, schema: Mapping) -> None:
    """For an architecture with presets of its own (a ViT: ``$defs/vit_presets``), put them
    under each regime's config block: a key the config sets wins over them, and they win
    over the regime's preset."""
    backbone = config.get("backbone")
    arch = backbone.get("arch") if isinstance(backbone, Mapping) else None
    arch = arch or schema["properties"]["backbone"]["properties"]["arch"]["default"]
    family = ARCHITECTURES[arch].presets if arch in ARCHITECTURES else None
    if family is None:
        return
    settings = config.setdefault("regime_settings", {})
    if not isinstance(settings, dict):
        return                          # the validator names it
    for regime, preset in schema["$defs"][f"{family}_presets"]["properties"].items():
        given = settings.get(regime, {})
        if isinstance(given, Mapping):
            settings[regime] = merge(preset["default"], given)


def _check_regexes(config: Mapping[str, Any]) -> None:
    """Every ``param_groups`` regex compiles (a typo fails now, not inside a job)."""
    blocks = {f"regime_settings.{name}": block for name, block in config["regime_settings"].items()}
    blocks["pretrain"] = config["pretrain"]
    for where, block in blocks.items():
        for i, (pattern, _) in enumerate(block["param_groups"]):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{where}.param_groups.{i}: {pattern!r} is not a regular "
                                  f"expression: {err}") from None


def _check_views(config: Mapping[str, Any]) -> None:
    """No view larger than the stored crops (the target's; the source's when the backbone
    is pretrained here), unless ``crop.allow_upsampling``."""
    crop = config["crop"]
    if crop["allow_upsampling"]:
        return
    pretrains = config["backbone"]["weights"] == "pretrain"
    for key in ("train", "pretrain") if pretrains else ("train",):
        size = config[key]["image_size"]
        if size > crop["size"]:
            raise ConfigError(
                f"{key}.image_size {size} is larger than crop.size {crop['size']}: every view "
                f"would be the stored crop upsampled {size / crop['size']:.2g}x (no detail "
                f"gained); raise crop.size (the crop phase reruns) or lower {key}.image_size, "
                f"or set crop.allow_upsampling: true")


def _check_architecture(config: Mapping[str, Any]) -> None:
    """``backbone.arch`` is in the table of architectures, and every ``freeze_up_to`` is one
    of its choices."""
    backbone = config["backbone"]
    try:
        arch = architecture(backbone["arch"])
    except ConfigError as exc:
        raise ConfigError(f"backbone.arch: {exc}") from None
    depths = backbone["stage_depths"]
    if depths is not None and len(depths) != arch.depth_count:
        raise ConfigError(f"backbone.stage_depths: {arch.name} takes {arch.depth_count} "
                          f"number(s), got {list(depths)}")
    choices = arch.freeze_choices(depths)
    for name, block in config["regime_settings"].items():
        if block["freeze_up_to"] is not None and block["freeze_up_to"] not in choices:
            raise ConfigError(f"regime_settings.{name}.freeze_up_to: {block['freeze_up_to']!r} "
                              f"is not a choice of {arch.name}: {choices} or null")


def _check_tasks(config: Mapping[str, Any]) -> None:
    """A training job of several tasks (``resources.train.nodes`` x ``tasks_per_node``) can
    run: each task leases a whole share of its node's GPUs, and the mesh spans every device
    of every task (no ``num_devices`` picks the first few)."""
    train = config["resources"]["train"]
    per_node, gpu = train["tasks_per_node"], train["gpu"]
    if gpu and gpu % per_node:
        raise ConfigError(f"resources.train.tasks_per_node {per_node} does not divide "
                          f"resources.train.gpu {gpu} (the GPUs of a node): each task leases "
                          f"gpu / tasks_per_node of them; on GPUs run one task per GPU "
                          f"(tasks_per_node: {gpu})")
    tasks = train["nodes"] * per_node
    if tasks == 1:
        return
    for where in ("train", "pretrain"):
        if config[where]["num_devices"] is not None:
            raise ConfigError(f"{where}.num_devices is {config[where]['num_devices']}, but a "
                              f"training job runs as {tasks} tasks (resources.train.nodes "
                              f"{train['nodes']} x tasks_per_node {per_node}), whose mesh spans "
                              f"every device of every task: set {where}.num_devices to null")


def _check_cross_field(config: Mapping[str, Any], *, given_source: bool = True) -> None:
    """Rules JSON Schema cannot say clearly."""
    _check_architecture(config)
    _check_tasks(config)
    backbone = config["backbone"]
    weights = backbone["weights"]
    if is_url(weights):
        if backbone["weights_require_sha256"] and not backbone["weights_sha256"]:
            raise ConfigError(f"backbone.weights_sha256 is required for a URL when "
                              f"backbone.weights_require_sha256 is true (backbone.weights: "
                              f"{weights!r})")
        if weights.startswith("http://") and not backbone["weights_allow_http"]:
            raise ConfigError(f"backbone.weights: {weights!r} is plain http (the bytes could be "
                              f"changed on the way): use https, or set "
                              f"backbone.weights_allow_http: true")
        try:
            download_path(weights)
        except WeightsError as exc:
            raise ConfigError(str(exc)) from None
    _check_regexes(config)
    _check_views(config)
    if config["regimes"] and config["dataset"]["val_fraction"] == 0:
        raise ConfigError(
            f"dataset.val_fraction is 0, so the validation split is empty, but every regime "
            f"chooses on it (the epoch to keep, the probe's L2 strength, a sweep's grid point): "
            f"regimes {list(config['regimes'])}; set dataset.val_fraction above 0 (e.g. 0.1)")
    if weights == "pretrain":
        source, target = config["pretrain"]["dataset"], config["dataset"]
        if not given_source:
            raise ConfigError("backbone.weights is 'pretrain' but pretrain.dataset is not set: "
                              "name the source dataset to pretrain on (its root would default "
                              f"to {source['root']!r}, the target dataset's default)")
        if (source["demo"] is None and target["demo"] is None
                and Path(source["root"]) == Path(target["root"])):
            raise ConfigError(f"pretrain.dataset.root is the target dataset ({target['root']!r}): "
                              f"pretraining on it would show the backbone the target's test "
                              f"images; name another dataset")
    if config["head"]["init_from_source_names"] and weights == "none":
        raise ConfigError("head.init_from_source_names needs source weights "
                          "(backbone.weights is 'none')")


def merge(base: dict, override: Mapping) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` (as Snakemake merges --configfile)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(*paths: str | Path, overrides: Mapping | None = None) -> dict:
    """Read YAML files in order (later ones override), apply overrides, validate."""
    config: dict = {}
    for path in paths:
        with open(path) as f:
            config = merge(config, yaml.safe_load(f) or {})
    if overrides:
        config = merge(config, overrides)
    return validate_config(config)
