"""The resolved settings of the data jobs, from the validated config (no JAX: the Snakefile
imports it). Each job gets its settings as one JSON object (``--settings``), like every
other job of the workflow; a value that does not change a job's output is left out (None),
so changing it reruns nothing."""

from __future__ import annotations

from typing import Mapping


def manifest_settings(dataset: Mapping) -> dict:
    """The `manifests` job of one dataset block (``dataset`` or ``pretrain.dataset``)."""
    return {key: dataset[key] for key in ("format", "val_fraction", "split_seed", "on_bad_image",
                                          "check_files", "follow_symlinks", "duplicate_photos",
                                          "test_only_classes")}


def crop_settings(config: Mapping, dataset: Mapping, split: str) -> dict:
    """A `crop_shard` job of ``split``: the crop geometry, the storage, the bad-image rule."""
    crop, shards = config["crop"], config["shards"]
    square = crop["aspect"] == "square"
    return {"size": crop["size"], "margin": crop["margin"], "aspect": crop["aspect"],
            "overflow": crop["overflow"] if square else None,
            "max_squeeze": (crop["max_squeeze"] if square and crop["overflow"] == "squeeze"
                            else None),
            "format": shards["format"],
            "codec": shards["codec"] if shards["format"] == "parquet" else None,
            "num_shards": shards["num_shards"][split],
            "on_bad_image": dataset["on_bad_image"], "follow_symlinks": dataset["follow_symlinks"]}
