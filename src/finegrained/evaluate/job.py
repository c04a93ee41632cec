"""One `evaluate` job: a trained model over the test split, every view, metrics and predictions.

Writes, atomically (the metrics last)::

    <out_dir>/predictions.parquet  one row per test image: image_id, label, and per view
                                   <view>_top5_labels / <view>_top5_probs (list columns)
    <out_dir>/metrics.json         the contract other tools read (see :func:`run_evaluation`)

The test split is read here and nowhere else in the workflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finegrained.data.manifest import excluded_classes, read_classes
from finegrained.data.shards import ShardReader
from finegrained.errors import DataError
from finegrained.evaluate import metrics as M
from finegrained.evaluate.views import VIEWS, average_scores, make_view_logits, view_boxes
from finegrained.fileio import atomic_output, check_sha256, read_json, sha256_file, write_json
from finegrained.locks import exclusive
from finegrained.models.loading import trained_model
from finegrained.provenance import SOURCE_DIR, provenance

TOP_K = 5
#: The view the per-level, calibration, per-class and confusion figures are computed on.
SUMMARY_VIEW = "ten_crop"


def predict_views(model, reader: ShardReader, views: Mapping[str, list], *, image_size: int,
                  average: str, batch_size: int, log: Callable[[str], None]) -> dict:
    """For every named view, ``(top labels [N, k], top probabilities [N, k])`` of the scores
    averaged over its windows. A window shared by several views runs once per batch."""
    unique = list(dict.fromkeys(v for boxes in views.values() for v in boxes))
    members = {name: [unique.index(v) for v in boxes] for name, boxes in views.items()}
    view_logits = make_view_logits(model, image_size)
    n = len(reader)
    out = {name: ([], []) for name in views}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        images = reader.gather(idx)
        pad = batch_size - len(idx)
        if pad:     # one compiled shape for every batch
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
        logits = np.stack([np.asarray(view_logits(images, box, flip))[:len(idx)]
                           for box, flip in unique])
        for name, which in members.items():
            labels, probs = M.top_k(average_scores(logits[which], average), TOP_K)
            out[name][0].append(labels)
            out[name][1].append(probs)
        log(f"evaluate: {start + len(idx)}/{n} images, {len(unique)} windows each")
    return {name: (np.concatenate(labels), np.concatenate(probs))
            for name, (labels, probs) in out.items()}


def _json_float(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


@exclusive("out_dir")
def run_evaluation(settings: Mapping, *, test_index, weights, classes, train_summary, out_dir,
                   source_dir=SOURCE_DIR, log_fn: Callable[[str], None] | None = print) -> dict:
    """Evaluate the trained ``weights`` on the test split; write predictions and metrics.

    ``metrics.json``: ``regime``, ``variant``, ``train_variant`` (the train job evaluated: with a
    sweep, the chosen grid point of this replicate), ``n_test``, ``excluded_classes`` (the
    classes with test photos but no training photo that the manifests left out, with their
    photo counts: ``dataset.test_only_classes``), ``views`` ({view: {top1, top5}},
    fractions), ``summary_view`` (the view the rest is computed on: ``ten_crop``),
    ``per_level`` ({level1.., leaf: top1}, see :func:`metrics.taxonomy_accuracy`), ``ece``
    (15 bins, top-1 confidence), ``per_class`` ({class name: top1}), ``confused_pairs``
    ([true, predicted, count], 20 most frequent), ``protocol`` (select_by, refit, trained_on,
    train_count: the images the model was trained on), ``provenance`` (config_hash of the
    train job, package versions, git revision of ``source_dir``, device, sha256 of the test
    shard index, of the weights and of the predictions written beside it).

    The weights must be those the train job recorded in ``train_summary`` (their sha256).
    """
    log = log_fn or (lambda _: None)
    label = settings["regime"] + settings.get("variant", "")
    summary = read_json(train_summary, "train summary")
    check_sha256(weights, summary.get("weights_sha256"), train_summary,
                 f"rerun the job that wrote both (delete {train_summary} and rerun snakemake)")
    protocol = settings["protocol"]
    if bool(summary.get("refit")) != protocol["refit"] or (
            summary.get("select_by", "val_top1") != protocol["select_by"]):
        raise DataError(train_summary, f"the model was made under select_by "
                        f"{summary.get('select_by')}, refit {bool(summary.get('refit'))}; the "
                        f"run asks for select_by {protocol['select_by']}, refit "
                        f"{protocol['refit']}: rerun its train job")
    table = read_classes(classes)
    names = table.column("common_name").to_pylist()
    model = trained_model(weights, names)
    reader = ShardReader(test_index, verify=settings.get("verify_shards", True))
    n = len(reader)
    if n == 0:
        raise DataError(test_index, "the test split is empty")
    size = reader.image_size
    views = {name: view_boxes(name, size, size, crop_fraction=settings["eval_crop_fraction"],
                              multi_scale_fractions=settings["multi_scale_fractions"])
             for name in VIEWS}
    log(f"{label}: {n} test images, views {', '.join(f'{k} ({len(v)})' for k, v in views.items())}"
        f", {jax.device_count()} x {jax.devices()[0].platform}")
    predictions = predict_views(model, reader, views, image_size=settings["image_size"],
                                average=settings["average"], batch_size=settings["batch_size"],
                                log=log)
    labels = reader.labels

    meta = reader.meta
    image_ids = (meta.column("image_id").to_pylist() if "image_id" in meta.column_names
                 else [str(i) for i in range(n)])
    columns = {"image_id": pa.array(image_ids, pa.string()),
               "label": pa.array(labels, pa.int32())}
    for name, (top_labels, top_probs) in predictions.items():
        columns[f"{name}_top{TOP_K}_labels"] = pa.array(list(top_labels), pa.list_(pa.int32()))
        columns[f"{name}_top{TOP_K}_probs"] = pa.array(list(top_probs.astype(np.float32)),
                                                       pa.list_(pa.float32()))
    out_dir = Path(out_dir)
    with atomic_output(out_dir / "predictions.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
        predictions_sha256 = sha256_file(tmp)

    top_labels, top_probs = predictions[SUMMARY_VIEW]
    predicted = top_labels[:, 0]
    train_variant = (summary["settings"]["refit"]["train_variant"] if summary.get("refit")
                     else summary.get("variant", ""))
    result = {
        "regime": settings["regime"], "variant": settings.get("variant", ""),
        "train_variant": train_variant, "n_test": n,
        "excluded_classes": excluded_classes(table),
        "protocol": {**protocol, "trained_on": summary.get("trained_on", "train"),
                     "train_count": summary.get("train_count")},
        "views": {name: {"top1": M.top_k_accuracy(tl, labels, 1),
                         "top5": M.top_k_accuracy(tl, labels, TOP_K)}
                  for name, (tl, _) in predictions.items()},
        "summary_view": SUMMARY_VIEW,
        "average": settings["average"],
        "per_level": M.taxonomy_accuracy(predicted, labels,
                                         table.column("ancestor_ids").to_pylist()),
        "ece": _json_float(M.expected_calibration_error(top_probs[:, 0], predicted == labels)),
        "per_class": M.per_class_accuracy(predicted, labels, names),
        "confused_pairs": M.confused_pairs(predicted, labels, names),
        "provenance": {
            **provenance(config_hash=summary.get("config_hash"), shard_indexes={"test": test_index},
                         source_dir=source_dir, weights=weights),
            "shard_index_sha256": sha256_file(test_index),
            "predictions_sha256": predictions_sha256,
        },
    }
    write_json(out_dir / "metrics.json", result)
    tops = ", ".join(f"{k} {v['top1']:.4f}" for k, v in result["views"].items())
    log(f"{label}: test top-1 {tops}")
    return result
