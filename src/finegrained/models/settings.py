"""The resolved settings of the weights jobs, from the validated config (no JAX: the
Snakefile imports it)."""

from __future__ import annotations

from typing import Mapping


def fetch_settings(backbone: Mapping) -> dict:
    """The `fetch_weights` job: the URL, its pinned sha256 (or None) and the download's
    bounds."""
    return {"url": backbone["weights"], "sha256": backbone["weights_sha256"],
            "allow_http": backbone["weights_allow_http"],
            "max_bytes": backbone["weights_max_bytes"],
            "timeout_s": backbone["weights_download_timeout"]}


def init_settings(config: Mapping) -> dict:
    """The `init_target_model` job: the architecture and the new head's initialisation."""
    backbone, head = config["backbone"], config["head"]
    return {"arch": backbone["arch"], "width": backbone["width"],
            "stage_depths": backbone["stage_depths"],
            "init_from_source_names": head["init_from_source_names"], "seed": head["seed"]}
