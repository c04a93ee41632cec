"""The variant codec: the overrides of one job written into its path, and read back.

A job is a regime plus a *variant*, ``+key=value`` joined in ``VARIANT_KEYS`` order
(``train/full_finetune+seed=1+lr=0.003/``): replicate seeds (``seeds:``), the systems
comparison (``systems:``) and sweeps (``sweep:``) all expand through it, and one set of
overrides has exactly one path.
"""

from __future__ import annotations

import re
from typing import Mapping

from finegrained.errors import ConfigError
from finegrained.plan.schema import SCHEMA

#: Keys a variant may override: the replicate seed, a system, and what a sweep may vary.
VARIANT_KEYS = ("seed", "system",
                *SCHEMA["properties"]["sweep"]["additionalProperties"]["properties"])
#: Variant keys whose value is a name (of ``systems:``), not a number.
NAMED_VARIANT_KEYS = ("system",)
VARIANT_PATTERN = r"(\+[a-z_]+=[A-Za-z0-9._\-]+)*"


def format_variant(overrides: Mapping) -> str:
    """``{'lr': 0.003, 'seed': 1}`` -> ``'+seed=1+lr=0.003'``."""
    unknown = set(overrides) - set(VARIANT_KEYS)
    if unknown:
        raise ConfigError(f"variant keys {sorted(unknown)} are not among {VARIANT_KEYS}")
    return "".join(f"+{key}={_format_value(overrides[key], key)}"
                   for key in VARIANT_KEYS if key in overrides)


def parse_variant(variant: str) -> dict:
    """``'+seed=1+lr=0.003'`` -> ``{'seed': 1, 'lr': 0.003}``."""
    if not variant:
        return {}
    if not re.fullmatch(VARIANT_PATTERN, variant):
        raise ConfigError(f"variant {variant!r} is not of the form +key=value[+key=value...]")
    out = {}
    for part in variant[1:].split("+"):
        key, value = part.split("=", 1)
        if key not in VARIANT_KEYS:
            raise ConfigError(f"variant key {key!r} is not one of {VARIANT_KEYS}")
        out[key] = value if key in NAMED_VARIANT_KEYS else _parse_value(value)
    return out


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


def _format_value(value, key: str) -> str:
    if key in NAMED_VARIANT_KEYS:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"variant value {value!r} is not a number")
    return str(value) if isinstance(value, int) else repr(float(value))


def _parse_value(text: str):
    """A variant value as a number: ``'3'`` -> 3, ``'0.003'`` and ``'1e-05'`` -> float
    (YAML 1.1 would read ``1e-05`` as a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ConfigError(f"variant value {text!r} is not a number")
