"""Configuration: validated against workflow/schemas/config.schema.yaml, defaults filled in.

The Snakefile and the tests use this one function, so a wrong key or value fails the same
way everywhere: before any job runs, with the dotted path of the offending key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from finegrained.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


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


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` in place (filling defaults) and return it; ConfigError names every problem."""
    schema = load_schema() if schema is None else schema
    given_source = isinstance(config.get("pretrain"), Mapping) and "dataset" in config["pretrain"]
    errors = sorted(_validator_with_defaults(schema).iter_errors(config),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"  {_dotted(e.absolute_path)}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    _check_cross_field(config, given_source=given_source)
    return config


def is_url(weights: str) -> bool:
    return weights.startswith(("http://", "https://"))


def _check_cross_field(config: Mapping[str, Any], *, given_source: bool = True) -> None:
    """Rules JSON Schema cannot say clearly."""
    backbone = config["backbone"]
    weights = backbone["weights"]
    if is_url(weights) and backbone["weights_require_sha256"] and not backbone["weights_sha256"]:
        raise ConfigError(f"backbone.weights_sha256 is required for a URL when "
                          f"backbone.weights_require_sha256 is true (backbone.weights: {weights!r})")
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
        raise ConfigError("head.init_from_source_names needs source weights (backbone.weights is 'none')")


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
