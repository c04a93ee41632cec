"""Source pretraining: train a backbone from scratch on the source dataset's shards and
write its weights (safetensors, with class names and recipe in the metadata) and metrics.

The first user of the training foundation: ``TrainSettings`` with no ``param_groups`` (every
parameter trains at the base learning rate) is "from scratch"; the transfer regimes later
reuse ``fit`` with other groups.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np

from finegrained import distributed
from finegrained.data.manifest import class_names as manifest_class_names
from finegrained.data.shards import ShardReader
from finegrained.errors import DataError
from finegrained.fileio import read_json, write_json
from finegrained.locks import exclusive
from finegrained.models import flatten_state, loading
from finegrained.models.weights import save_weights, weights_metadata
from finegrained.train.augment import lighting_from_stats
from finegrained.train.checkpoint import claim, fingerprint
from finegrained.train.loop import fit
from finegrained.train.settings import TrainSettings


@exclusive("checkpoint_dir", "out_weights")
def pretrain(train_index: str | os.PathLike, val_index: str | os.PathLike,
             stats_json: str | os.PathLike, classes: str | os.PathLike, *, model: Mapping,
             settings: TrainSettings, out_weights: str | os.PathLike,
             out_metrics: str | os.PathLike, checkpoint_dir=None, keep_checkpoints: bool = False,
             verify: bool = False, log_fn: Callable[[str], None] | None = print) -> dict:
    """Train the ``model`` block's architecture (``plan.archs.model_settings``) from scratch
    on ``train_index``, validate on ``val_index``; write the weights (class names from the
    manifests' ``classes`` table, one output per class even if every image of a class was
    skipped) and a metrics JSON; return the metrics."""
    t0 = time.perf_counter()
    main = distributed.is_main_process()   # several processes: only process 0 writes
    log = (log_fn if main else None) or (lambda _: None)
    train = ShardReader(train_index, verify=verify)
    val = ShardReader(val_index, verify=verify)
    class_names = manifest_class_names(classes)
    num_classes = len(class_names)
    for reader in (train, val):
        if len(reader) and int(reader.labels.max()) >= num_classes:
            raise DataError(reader.index_path, f"label {int(reader.labels.max())} is not one "
                            f"of the {num_classes} classes of {classes}")
    stats = read_json(stats_json, "colour statistics")
    lighting = lighting_from_stats(stats) if settings.augment.pca_lighting > 0 else None

    arch, width = model["arch"], model["width"]
    options = loading.weight_options(arch, None)   # from scratch: e.g. MobileNetV2's batch norm
    net = loading.build(model, num_classes, seed=settings.seed, **options)
    log(f"pretrain {arch} width {width}: {len(train)} train / {len(val)} val images, "
        f"{num_classes} classes, stored {train.image_size}px -> crops {settings.image_size}px, "
        f"{jax.device_count()} x {jax.devices()[0].platform}")
    run_dir = None
    if checkpoint_dir is not None:
        distributed.on_main("pretrain-claimed", lambda: claim(checkpoint_dir, fingerprint(
            {"model": dict(model), "train_settings": settings.to_dict()},
            {"train_index": train_index, "val_index": val_index, "stats": stats_json,
             "classes": classes}), log))
        run_dir = Path(checkpoint_dir) / "run"
    history = fit(net, train, val, settings, log_fn=log, lighting=lighting,
                  checkpoint_dir=run_dir, label="pretrain").history
    if not main:
        distributed.barrier("pretrain-done")
        return {}

    recipe = {"pixels": "RGB uint8 or float 0..255, NHWC",
              "normalisation": net.input_recipe.name,
              "train_image_size": settings.image_size, "stored_image_size": train.image_size,
              "eval_crop_fraction": settings.eval_crop_fraction}
    metadata = weights_metadata(
        arch=arch, num_classes=num_classes, class_names=class_names,
        input_recipe=net.input_recipe.name, source="pretrain",
        **loading.model_metadata(model, None),
        image_size=str(settings.image_size), input=json.dumps(recipe),
        train_settings=json.dumps(settings.to_dict()))
    save_weights(out_weights, flatten_state(net), metadata=metadata)

    wall = time.perf_counter() - t0
    later = [h["images_per_second"] for h in history[1:]] or \
            [h["images_per_second"] for h in history]
    metrics = {
        "arch": arch, "width": width, "num_classes": num_classes,
        "num_train": len(train), "num_val": len(val),
        "final_val_top1": history[-1].get("val_top1") if history else None,
        "best_val_top1": max((h.get("val_top1", 0.0) for h in history), default=None),
        "wall_seconds": wall,
        # after the first epoch, which includes compilation
        "train_images_per_second": float(np.median(later)),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "processes": jax.process_count(),
        "settings": settings.to_dict(),
        "history": history,
    }
    write_json(out_metrics, metrics)
    if checkpoint_dir is not None and not keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    distributed.barrier("pretrain-done")
    log(f"wrote {out_weights} and {out_metrics}: val top-1 {metrics['final_val_top1']:.4f}, "
        f"{wall:.1f}s")
    return metrics
