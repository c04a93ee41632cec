"""Models from settings and weights files: the one place a job gets its model.

A job's settings name the model in one block (``plan.archs.model_settings``): the
architecture, its width and stage depths, and its runtime options (how it runs, not its
parameters: MobileNetV2's depthwise form, a ViT's drop path). A weights file records the
options that shape its parameters (``Architecture.weight_options``: MobileNetV2's batch
norm, a ViT's pooling), so a model loaded from one has that file's layout whatever the run
asks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from flax import nnx

from finegrained.errors import DataError
from finegrained.models.convert import to_flat
from finegrained.models.params import assign_state
from finegrained.models.registry import build_model
from finegrained.models.weights import read_metadata, read_tensors
from finegrained.plan.archs import architecture


def weight_options(arch: str, weights: str | os.PathLike | None,
                   chosen: Mapping | None = None) -> dict:
    """The parameter-shaping options of a model made from ``weights`` (None: from scratch):
    what the file records, else those the config ``chosen`` (``model["options"]``), else
    the architecture's value from scratch or for a file that records none."""
    table, chosen = architecture(arch).weight_options, chosen or {}
    if weights is None:
        return {key: chosen.get(key, scratch) for key, (scratch, _) in table.items()}
    meta = read_metadata(weights) if Path(weights).suffix == ".safetensors" else {}
    return {key: json.loads(meta[key]) if key in meta else chosen.get(key, unrecorded)
            for key, (_, unrecorded) in table.items()}


def build(model: Mapping, num_classes: int, *, seed: int, **options):
    """A freshly initialised model of the ``model`` settings block (eval mode)."""
    return build_model(model["arch"], num_classes, width=model["width"],
                       stage_depths=model["stage_depths"], rngs=nnx.Rngs(seed),
                       **model.get("runtime", {}), **options)


def load(weights: str | os.PathLike, model: Mapping, num_classes: int):
    """The model a weights file holds whole (the init rule's target model, a trained
    model): built abstractly, then every parameter and statistic set from the file (a
    missing or extra tensor is an error). No random initialisation runs, which on a CPU
    compiles one small program per tensor shape (ResNet-50: about 14 s of a job's start)."""
    options = weight_options(model["arch"], weights, model.get("options"))
    abstract = nnx.eval_shape(lambda: build(model, num_classes, seed=0, **options))
    assign_state(abstract, to_flat(read_tensors(weights), model["arch"]))
    return abstract


def start_model(model: Mapping, *, init: str, seed: int, num_classes: int,
                init_weights: str | os.PathLike | None):
    """The model a training job starts from: ``init_weights`` (the target init with its new
    head) for ``init: pretrained``, the architecture's random initialisation otherwise."""
    if init == "random":
        return build(model, num_classes, seed=seed,
                     **weight_options(model["arch"], None, model.get("options")))
    if init_weights is None:
        raise DataError("init weights", "the job starts pretrained but no init weights "
                                        "were given")
    return load(init_weights, model, num_classes)


def trained_model(weights: str | os.PathLike, class_names: Sequence[str]):
    """The model a train job wrote, built from its weights' metadata (architecture, width,
    stage depths, recorded options); its class names must be ``class_names``."""
    meta = read_metadata(weights)
    missing = [k for k in ("arch", "width", "class_names") if k not in meta]
    if missing:
        raise DataError(weights, f"not a trained model: no {', '.join(missing)} in its metadata")
    trained = json.loads(meta["class_names"])
    if trained != list(class_names):
        raise DataError(weights, f"the model's {len(trained)} classes are not those of the "
                                 f"class table ({len(class_names)} classes)")
    model = {"arch": meta["arch"], "width": int(meta["width"]),
             "stage_depths": json.loads(meta.get("stage_depths", "null"))}
    return load(weights, model, len(trained))


def model_metadata(model: Mapping, weights: str | os.PathLike | None) -> dict:
    """What a weights file of this model records to be loaded again: width, stage depths
    and the parameter-shaping options (for ``models.weights.weights_metadata``)."""
    options = weight_options(model["arch"], weights, model.get("options"))
    return {"width": str(model["width"]), "stage_depths": json.dumps(model["stage_depths"]),
            **{key: json.dumps(value) for key, value in options.items()}}
