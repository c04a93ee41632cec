"""The target model at the start of transfer: a backbone with pretrained weights and a new
classifier for the target classes, whose rows may be initialised from the source
classifier where the class names match ("lucky break").

Every weights source goes through the same path: ``weights.read_tensors`` ->
``convert.to_flat`` -> ``weights.merge_params`` (via ``load_pretrained``), whether the file
came from the pretrain rule, a download, or a user's torchvision/timm checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from flax import nnx

from finegrained.data.manifest import class_names

from finegrained.errors import WeightsError
from finegrained.fileio import sha256_file, write_json
from finegrained.models.download import verify_recorded_sha256
from finegrained.plan.paths import sha256_record
from finegrained.models import head_init
from finegrained.models.params import assign_state, flatten_state
from finegrained.models.registry import build_model
from finegrained.models.weights import (load_pretrained, read_metadata, read_tensors,
                                        save_weights, weights_metadata)
from finegrained.models.convert import fit_problems, to_flat
from finegrained.models.loading import weight_options

log = logging.getLogger(__name__)


def source_class_names(weights: str | os.PathLike,
                       names_file: str | os.PathLike | None) -> list[tuple[str, ...]]:
    """Names of the source classifier's outputs: from the label file if given (iNat
    'Scientific (Common)' lines are split into both names), else from the weights' metadata."""
    if names_file is not None:
        return head_init.read_inat_labels(names_file)
    meta = read_metadata(weights) if Path(weights).suffix == ".safetensors" else {}
    if "class_names" not in meta:
        raise WeightsError(f"{weights}: no class names in the weights' metadata; give "
                           f"backbone.source_class_names to match classes by name")
    return [(name,) for name in json.loads(meta["class_names"])]


def weights_sha256(weights: str | os.PathLike) -> str:
    """The sha256 of a weights file, for the run's provenance. A downloaded file is checked
    against the hash recorded beside it (``<file>.sha256``) first: trusted on first use, it
    must not change afterwards."""
    if not os.fspath(weights):
        raise WeightsError("the weights file named is an empty path (backbone.weights: none "
                           "starts from random weights and names no file)")
    if not Path(weights).is_file():
        raise WeightsError(f"{weights}: weights file not found")
    if sha256_record(weights).is_file():
        return verify_recorded_sha256(weights)
    return sha256_file(weights)


def init_target_model(*, arch: str, class_names: Sequence[str], width: int = 64,
                      stage_depths: Sequence[int] | None = None, options: Mapping | None = None,
                      weights: str | os.PathLike | None = None,
                      source_names_file: str | os.PathLike | None = None,
                      init_from_source_names: bool = False, seed: int = 0):
    """Build the target model and load ``weights`` into it. Returns ``(model, report)``.
    ``options``: the weight options the config chose (``plan.archs.model_settings``)."""
    model = build_model(arch, len(class_names), width=width, stage_depths=stage_depths,
                        rngs=nnx.Rngs(seed), **weight_options(arch, weights, options))
    report: dict = {"arch": arch, "width": width, "num_classes": len(class_names),
                    "weights": None if weights is None else os.fspath(weights)}
    if weights is None:
        if init_from_source_names:
            raise WeightsError("init_from_source_names needs source weights")
        return model, report

    report["weights_sha256"] = weights_sha256(weights)
    log.info("weights %s, sha256 %s", weights, report["weights_sha256"])

    raw = read_tensors(weights)
    problems = fit_problems(raw, model)
    if problems:
        raise WeightsError(f"{weights}: the weights do not fit {arch} as configured: "
                           + "; ".join(problems))
    tensors = to_flat(raw, arch)
    report["load"] = load_pretrained(model, tensors, arch=arch, replace_head=True)
    if init_from_source_names:
        if "head/kernel" not in tensors or "head/bias" not in tensors:
            raise WeightsError(f"{weights}: no classifier (head/kernel, head/bias) to "
                               f"initialise rows from")
        names = source_class_names(weights, source_names_file)
        if len(names) != tensors["head/bias"].shape[0]:
            raise WeightsError(f"{len(names)} source class names for a source classifier "
                               f"with {tensors['head/bias'].shape[0]} outputs")
        mapping = head_init.match_classes(list(class_names), names)
        flat = flatten_state(model)
        flat["head/kernel"], flat["head/bias"] = head_init.init_head_from_source(
            flat["head/kernel"], flat["head/bias"], tensors["head/kernel"],
            tensors["head/bias"], mapping)
        assign_state(model, flat)
        report["head_init"] = head_init.head_init_report(list(class_names), names, mapping)
        log.info("head rows initialised from source names: %d of %d target classes",
                 len(mapping), len(class_names))
    return model, report


def write_target_init(classes_path: str | os.PathLike, out_weights: str | os.PathLike,
                      out_report: str | os.PathLike, **kwargs) -> dict:
    """``init_target_model`` for the classes of the manifests' classes.parquet; writes the
    initial weights (safetensors, with class names in the metadata) and a JSON report."""
    names = class_names(classes_path)
    model, report = init_target_model(class_names=names, **kwargs)
    options = weight_options(kwargs["arch"], kwargs.get("weights"), kwargs.get("options"))
    save_weights(out_weights, flatten_state(model), metadata=weights_metadata(
        arch=kwargs["arch"], num_classes=len(names), class_names=names,
        input_recipe=model.input_recipe.name, source=report["weights"] or "random init",
        **({"source_sha256": report["weights_sha256"]} if "weights_sha256" in report else {}),
        width=kwargs.get("width", 64), stage_depths=kwargs.get("stage_depths"),
        **{key: json.dumps(value) for key, value in options.items()}))
    write_json(out_report, report)
    return report
