"""One resolver per rule: the settings each job is given, from the validated config.

Every job gets its settings as one JSON object (``--settings``); a rule's params hold
``jobs.<rule>(config, <wildcards>)``. A value that does not change a job's output is left
out (or None), so changing it reruns nothing. The regime jobs' settings are resolved by
:mod:`finegrained.plan.regimes`, the protocol's by :mod:`finegrained.plan.protocol`.
"""

from __future__ import annotations

from typing import Mapping

from finegrained.plan import protocol, regimes
from finegrained.plan.archs import model_settings
from finegrained.plan.variants import parse_variant

#: The test-time views, in reading order (see ``finegrained.evaluate.views``).
VIEWS = ("center", "ten_crop", "multi_scale")
#: How the scores of a view's windows are averaged.
AVERAGES = ("softmax", "logits")


def dataset_block(config: Mapping, dataset: str) -> Mapping:
    """The config block of the ``target`` dataset or of the pretraining ``source``."""
    return config["dataset"] if dataset == "target" else config["pretrain"]["dataset"]


# ---------------------------------------------------------------------------- data


def manifests(config: Mapping, dataset: str) -> dict:
    """The `manifests` job of one dataset: the reader, the validation split, bad images."""
    block = dataset_block(config, dataset)
    return {key: block[key] for key in ("format", "val_fraction", "split_seed", "on_bad_image",
                                        "check_files", "follow_symlinks", "duplicate_photos",
                                        "test_only_classes")}


def crop_shard(config: Mapping, dataset: str, split: str) -> dict:
    """A `crop_shard` job of ``split``: the crop geometry, the storage, the bad-image rule."""
    crop, shards, block = config["crop"], config["shards"], dataset_block(config, dataset)
    square = crop["aspect"] == "square"
    return {"size": crop["size"], "margin": crop["margin"], "aspect": crop["aspect"],
            "overflow": crop["overflow"] if square else None,
            "max_squeeze": (crop["max_squeeze"] if square and crop["overflow"] == "squeeze"
                            else None),
            "format": shards["format"],
            "codec": shards["codec"] if shards["format"] == "parquet" else None,
            "num_shards": shards["num_shards"][split],
            "on_bad_image": block["on_bad_image"], "follow_symlinks": block["follow_symlinks"]}


# ---------------------------------------------------------------------------- weights


def fetch_weights(config: Mapping) -> dict:
    """The `fetch_weights` job: the URL, its pinned sha256 (or None) and the download's
    bounds."""
    backbone = config["backbone"]
    return {"url": backbone["weights"], "sha256": backbone["weights_sha256"],
            "allow_http": backbone["weights_allow_http"],
            "max_bytes": backbone["weights_max_bytes"],
            "timeout_s": backbone["weights_download_timeout"]}


def init_target_model(config: Mapping) -> dict:
    """The `init_target_model` job: the architecture and the new head's initialisation."""
    model = model_settings(config["backbone"])
    del model["runtime"]        # the weights are the same however the model runs
    return {"model": model, "init_from_source_names": config["head"]["init_from_source_names"],
            "seed": config["head"]["seed"]}


def pretrain(config: Mapping) -> dict:
    """The `pretrain` job (see :func:`finegrained.plan.regimes.pretrain_settings`)."""
    return regimes.pretrain_settings(config)


# ---------------------------------------------------------------------------- training


def features(config: Mapping, split: str, layer: str | None = None) -> dict:
    """A feature-cache job for ``split``: the pooled layers (``layer`` None, the `features`
    rule) or the one boundary map ``layer`` (`feature_map`). Neither depends on which
    regimes are listed, so changing `regimes:` reruns no cache."""
    feats, run = config["features"], config["train"]
    return {"model": model_settings(config["backbone"]),
            "layers": regimes.pooled_layers(config) if layer is None else [layer],
            "views": feats["train_views"] if split == "train" else 0,
            "augment": feats["augment"], "image_size": run["image_size"],
            "eval_crop_fraction": run["eval_crop_fraction"], "seed": run["seed"],
            "batch_size": feats["batch_size"], "dtype": feats["dtype"],
            "verify_shards": config["shards"].get("verify", True)}


def train_regime(config: Mapping, regime: str, variant: str = "") -> dict:
    """A `train_regime` job (see :func:`finegrained.plan.regimes.job_settings`)."""
    return regimes.job_settings(config, regime, variant)


def select_sweep(config: Mapping) -> dict:
    """A `select_sweep` job: the rule that compares the grid points."""
    return protocol.selection_settings(config)


def refit_regime(config: Mapping, regime: str, variant: str = "") -> dict:
    """A `refit_regime` job (see :func:`finegrained.plan.protocol.refit_request`)."""
    return protocol.refit_request(config, regime, variant)


# ---------------------------------------------------------------------------- evaluation


def evaluate_regime(config: Mapping, regime: str, variant: str = "") -> dict:
    """An `evaluate_regime` job: the view geometry of the run (the same ``image_size`` and
    ``eval_crop_fraction`` as validation), the ``evaluation`` block, and the protocol the
    model it reads was chosen and trained under."""
    parse_variant(variant)      # a malformed variant fails here, before any job runs
    run, block = config["train"], config["evaluation"]
    return {"regime": regime, "variant": variant, "image_size": run["image_size"],
            "eval_crop_fraction": run["eval_crop_fraction"],
            "multi_scale_fractions": list(block["multi_scale_fractions"]),
            "average": block["average"], "batch_size": block["batch_size"],
            "verify_shards": config["shards"].get("verify", True),
            "protocol": {"select_by": config["protocol"]["select_by"],
                         "refit": protocol.uses_refit(config, regime, variant)}}
