"""Render docs/configuration.md from the JSON Schema, so the two never drift.

Each shared block is rendered once: the dataset keys (``dataset`` and
``pretrain.dataset``), the augmentation keys (every ``augment``), the run keys (``train``
and the run half of ``pretrain``) and the regime keys (each ``regime_settings.<name>``,
followed by one table of what each regime's preset sets).
"""

from __future__ import annotations

import json
from pathlib import Path

from finegrained.plan.archs import ARCHITECTURES, STRIDE_CHOICES
from finegrained.plan.schema import SCHEMA

HEADER = """# Configuration reference

Generated from `workflow/schemas/config.schema.yaml` by `python scripts/config_reference.py
--update docs/configuration.md`; a test keeps the two identical. Every key is validated
before any job runs (a wrong key or value fails naming its path), and every default lives in
the schema. A config file sets only the keys it changes: Snakemake merges `--configfile`s
in order, then `--config` values (text inside a nested `--config` mapping is read as the
number, true/false or null the schema expects there). Where to start:
[config/README.md](../config/README.md).
"""
#: Shared blocks: ``$defs`` name -> (heading, the keys that use it).
SHARED = {
    "dataset": ("Dataset keys", "`dataset` (the target) and `pretrain.dataset` (the source)"),
    "augment": ("Augmentation keys", "every `augment` block: the regimes' and `pretrain`'s "
                "recipe, `features.augment`"),
    "run": ("Run keys", "`train` (every regime's job) and `pretrain`"),
}


def _resolve(schema: dict, node: dict) -> dict:
    if "$ref" in node:
        target = schema
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        merged = dict(_resolve(schema, target))
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    return node


def _ref_name(node: dict) -> str | None:
    ref = node.get("$ref", "")
    return ref.split("/")[-1] if ref.startswith("#/$defs/") and ref.count("/") == 2 else None


def _type_of(node: dict) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v) if v is None else v}`" for v in node["enum"])
    t = node.get("type", "")
    return " or ".join(t) if isinstance(t, list) else t


def _text(node: dict) -> str:
    return " ".join(str(node.get("description", "")).split())


def _value(value) -> str:
    return f"`{json.dumps(value)}`"


def _rows(schema: dict, node: dict, prefix: str, skip=()) -> list[str]:
    """One row per key under ``node``; a key whose value is a shared block links to it."""
    rows = []
    for name, raw in node.get("properties", {}).items():
        if name in skip:
            continue
        prop = _resolve(schema, raw)
        key = f"{prefix}{name}"
        shared = _ref_name(raw)
        if shared in SHARED:
            anchor = SHARED[shared][0].lower().replace(" ", "-")
            rows.append(f"| `{key}` | object | | {_text(prop)} See [{SHARED[shared][0]}]"
                        f"(#{anchor}). |")
        elif "properties" in prop:
            rows.append(f"| `{key}` | object | | {_text(prop)} |")
            rows += _rows(schema, prop, key + ".")
        else:
            rows.append(f"| `{key}` | {_type_of(prop)} | {_value(prop.get('default'))} | "
                        f"{_text(prop)} |")
    return rows


def _table(rows: list[str]) -> str:
    return "\n".join(["| key | type | default | meaning |", "|---|---|---|---|", *rows])


def render_reference() -> str:
    schema = SCHEMA
    top, defs = schema["properties"], schema["$defs"]
    parts = [HEADER]

    parts += ["## Top-level keys\n", _table(_rows(schema, {"properties": {
        k: v for k, v in top.items() if k not in ("pretrain", "regime_settings", "train")}}, "")),
        ""]
    parts += ["## `pretrain`\n", _text(top["pretrain"]) + " Its keys: the recipe keys of a "
              "regime (see [Regime keys](#regime-keys): `epochs`, `batch_size`, `lr`, ..., "
              "`augment`), the [Run keys](#run-keys), and `dataset` (see [Dataset keys]"
              "(#dataset-keys)), with the schema's defaults.\n"]
    parts += ["## `train`\n", _text(top["train"]) + " Its keys are the [Run keys](#run-keys).\n"]
    for name, (heading, used_by) in SHARED.items():
        parts += [f"## {heading}\n", f"Used by {used_by}.\n",
                  _table(_rows(schema, _resolve(schema, defs[name]), "")), ""]

    regime = _resolve(schema, defs["regime"])
    settings = top["regime_settings"]["properties"]
    parts += ["## Regime keys\n",
              f"{_text(top['regime_settings'])} Every regime, `regime_settings.<name>`, takes "
              f"these keys; the defaults below are the schema's, and each regime's preset "
              f"(next table) replaces some of them.\n",
              _table(_rows(schema, regime, "")), ""]
    parts += ["### Presets\n", "What each regime's preset sets (empty: the regime key's "
              "default). " + _presets(settings)]
    vit = defs["vit_presets"]
    parts += ["### ViT presets\n", f"{_text(vit)} " + _presets(vit["properties"])]
    parts += _architectures()
    return "\n".join(parts).rstrip() + "\n"


def _presets(settings: dict) -> str:
    """Each preset's description, then one table of what each sets."""
    names = list(settings)
    keys = list(dict.fromkeys(k for n in names for k in settings[n].get("default", {})))
    rows = [f"| `{k}` | " + " | ".join(
        _preset(settings[n].get("default", {}).get(k)) for n in names) + " |" for k in keys]
    return "\n".join([" ".join(f"`{n}`: {_text(settings[n])}" for n in names) + "\n",
                      "| key | " + " | ".join(f"`{n}`" for n in names) + " |",
                      "|---|" + "---|" * len(names), *rows, ""])


def _architectures() -> list[str]:
    """The table of architectures (``backbone.arch``), at their standard depths."""
    rows = []
    for arch in ARCHITECTURES.values():
        stages = ", ".join(f"`{name}` /{stride}" for name, stride in arch.stages(None).items())
        choices = ", ".join(f"`{c}`" for c in arch.freeze_choices(None)
                            if c in ("stem", *STRIDE_CHOICES)) + (
            ", `block0`..`blockN`" if arch.block_freezing else "")
        rows.append(f"| `{arch.name}` | {stages} | {choices} | {arch.input_recipe} | "
                    f"{', '.join(arch.weight_layouts) or '-'} | "
                    f"{', '.join(f'`{o}`' for o in arch.runtime_options) or '-'} |")
    return ["## Architectures\n",
            "`backbone.arch` names an entry of the table of architectures "
            "(`finegrained.plan.archs`); a stage's output stride is the input side over its "
            "output side (`freeze_up_to: strideK` freezes the stages at K or less).\n",
            "| arch | stages (output stride) | `freeze_up_to` | input recipe | weight layouts "
            "| runtime options |", "|---|---|---|---|---|---|", *rows, ""]


def _preset(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {json.dumps(v)}" for k, v in value.items())
    return _value(value)


def update_reference(path) -> bool:
    """Rewrite ``path`` with the rendered reference; True if it changed."""
    path = Path(path)
    new = render_reference()
    old = path.read_text() if path.exists() else None
    if new != old:
        path.write_text(new)
    return new != old
