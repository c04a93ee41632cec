"""One `train` job: resolved settings in, the best model, its history and a summary out.

The job builds the target model (pretrained init or random), runs the settings' phases in
order (SGD through :func:`finegrained.train.loop.fit`, the L-BFGS probe, or the probe job's
head read from its weights), each phase starting from the previous one's final state, and
writes, atomically::

    <out_dir>/weights.safetensors   the model that was best on the validation split
                                    (``protocol.select_by``; a refit: the final model)
    <out_dir>/history.parquet       one row per epoch (per L2 strength for L-BFGS)
    <out_dir>/summary.json          best epoch, its validation figures, wall time, hashes

A refit (``settings["refit"]``, made by :func:`finegrained.protocol.refit_settings` from a
train job's summary) trains the same phases on train + validation for the epochs that job
chose, without validation, and writes the final model under ``refit/<regime>/``.

Checkpoints go to ``checkpoint_dir/<phase>/``; a finished phase leaves ``done.json`` and
``done.safetensors`` there, so a rerun after a kill skips it. ``checkpoint_dir`` records the
settings and input hashes it was made from, and a rerun with others sets it aside rather
than resuming it (:func:`finegrained.train.checkpoint.claim`). The directory is removed when
the job succeeds unless the settings keep it.

With several processes (:mod:`finegrained.distributed`) every process runs the job and only
process 0 logs and writes files.
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
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx

from finegrained import distributed
from finegrained.data.manifest import class_names as manifest_class_names
from finegrained.data.shards import ShardReader
from finegrained.errors import DataError
from finegrained.fileio import atomic_output, check_sha256, read_json, sha256_file, write_json
from finegrained.locks import exclusive
from finegrained.models import build_model, flatten_state
from finegrained.models.convert import to_flat
from finegrained.models.params import assign_state
from finegrained.models.transfer import model_options
from finegrained.models.weights import (read_metadata, read_tensors, save_weights,
                                        weights_metadata)
from finegrained.provenance import provenance
from finegrained.train.augment import lighting_from_stats
from finegrained.train.checkpoint import claim, fingerprint, read_finished_phase
from finegrained.selection import better
from finegrained.train.features import FeatureReader
from finegrained.train.input_pipeline import ConcatSource
from finegrained.train.loop import fit
from finegrained.train.settings import TrainSettings
from finegrained.train.probe import fit_probe
from finegrained.train.regimes import cache_index
from finegrained.train.validation import require_examples


def runtime_options(arch: str, settings: Mapping) -> dict:
    """Constructor options that change how a model runs, not its parameters."""
    if arch == "mobilenet_v2":
        return {"depthwise_impl": settings.get("depthwise_impl", "auto")}
    return {}


def load_init_model(arch: str, num_classes: int, init_weights: str | os.PathLike, *,
                    width: int, stage_depths=None, **runtime):
    """The model a weights file holds whole (the init rule's target model, a trained model):
    built abstractly, then every parameter and statistic set from the file (a missing or
    extra tensor is an error). No random initialisation runs, which on a CPU compiles one
    small program per tensor shape (ResNet-50: about 14 s of a job's start)."""
    meta = read_metadata(init_weights)
    options = {"batch_norm": json.loads(meta["batch_norm"])} if "batch_norm" in meta else {}
    options.update(runtime)
    model = nnx.eval_shape(lambda: build_model(arch, num_classes, width=width,
                                               stage_depths=stage_depths, rngs=nnx.Rngs(0),
                                               **options))
    assign_state(model, to_flat(read_tensors(init_weights), arch))
    return model


def build_start_model(settings: Mapping, init_weights: str | os.PathLike | None,
                      num_classes: int):
    """The model a job starts from: ``init_weights`` (the target init with its new head)
    for ``init: pretrained``, the architecture's random initialisation otherwise."""
    arch, width, stage_depths = settings["arch"], settings["width"], settings["stage_depths"]
    if settings["init"] == "random":
        return build_model(arch, num_classes, width=width, stage_depths=stage_depths,
                           rngs=nnx.Rngs(settings["seed"]), **model_options(arch, None),
                           **runtime_options(arch, settings))
    if init_weights is None:
        raise DataError("init weights", f"regime {settings['regime']} starts pretrained "
                        f"but no init weights were given")
    return load_init_model(arch, num_classes, init_weights, width=width,
                           stage_depths=stage_depths, **runtime_options(arch, settings))


def _sources(phase: Mapping, train_index, val_index, features_dir, verify: bool,
             init_weights=None, refit: bool = False):
    """The phase's train and val sources: the shards, or the feature cache (checked against
    the init weights and shard indexes this job was given, and with ``verify`` its files
    against its index). A refit trains on both splits and validates on none; otherwise an
    empty validation split is an error."""
    inp = phase["input"]
    if inp["kind"] == "cache":
        if features_dir is None:
            raise DataError("features", f"phase {phase['name']} reads the feature cache, "
                            f"but no features directory was given")
        train, val = (FeatureReader(Path(features_dir) / cache_index(split, inp["layer"]),
                                    inp["layer"], weights=init_weights, shard_index=index,
                                    verify=verify)
                      for split, index in (("train", train_index), ("val", val_index)))
    else:
        train, val = ShardReader(train_index, verify=verify), ShardReader(val_index, verify=verify)
    if refit:
        return ConcatSource(train, val), None
    require_examples(len(val), val_index, "val")
    return train, val


def _write_history(path: Path, rows: list[dict]) -> None:
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    table = pa.table({key: [row.get(key) for row in rows] for key in columns})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def _finished_phase(directory: Path, model, log) -> dict | None:
    """A phase finished by an earlier attempt: load its final state, return its record."""
    finished = read_finished_phase(directory, log)
    if finished is None:
        return None
    record, weights = finished
    assign_state(model, weights)
    return record


def _mark_finished(directory: Path, model, record: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory / "done.safetensors", flatten_state(model))
    write_json(directory / "done.json", record)


def recipe_hash(summary: Mapping) -> str:
    """The config hash of the train job a summary's model comes from (for a refit: the
    train job whose recipe it repeated)."""
    settings = summary["settings"]
    return (settings.get("refit") or {}).get("train_config_hash", settings["config_hash"])


def probe_head(phase: Mapping, model, probe: Mapping | None, init_weights) -> dict:
    """A ``probe_head`` phase: the linear probe job's solved head, set on ``model``.

    ``probe``: ``{"weights", "summary"}`` paths of that job. Refused unless the summary is
    of the probe recipe the settings name (its config hash), on the same init weights, and a
    refit exactly when this job is one, and unless every tensor but the head equals the
    model's: the probe trained the head alone, so nothing else may differ.
    """
    want = phase["probe"]
    if probe is None:
        raise DataError("probe", f"phase {phase['name']} starts from the "
                        f"{want['regime']}{want['variant']} job's head, but no probe "
                        f"weights were given")
    summary = read_json(probe["summary"], "probe summary")
    check_sha256(probe["weights"], summary.get("weights_sha256"), probe["summary"],
                 f"rerun the {want['regime']}{want['variant']} job that writes both")
    refit = bool(want.get("refit", False))
    problems = []
    if recipe_hash(summary) != want["config_hash"]:
        problems.append(f"it was trained with other settings (config hash "
                        f"{recipe_hash(summary)[:12]}, expected {want['config_hash'][:12]})")
    if bool(summary["settings"].get("refit")) != refit:
        problems.append("it is " + ("not " if refit else "") + "a refit on train + validation")
    if init_weights is not None and summary.get("init_weights_sha256") != sha256_file(init_weights):
        problems.append("it started from other init weights")
    tensors = read_tensors(probe["weights"])
    current = flatten_state(model)
    if set(tensors) != set(current):
        problems.append("its tensors are not this model's")
    else:
        changed = [k for k in current if not k.startswith("head/")
                   and not np.array_equal(np.asarray(current[k]), np.asarray(tensors[k]))]
        if changed:
            problems.append(f"its backbone differs from the init weights ({changed[:3]})")
    if problems:
        raise DataError(probe["summary"], f"cannot start {phase['name']} from this probe: "
                        + "; ".join(problems))
    current["head/kernel"], current["head/bias"] = tensors["head/kernel"], tensors["head/bias"]
    assign_state(model, current)
    source = f"{want['regime']}{want['variant']}" + (" (refit)" if refit else "")
    row = dict(summary["best"] if summary.get("best") else summary["final"])
    row.update(head_from=source, head_weights_sha256=sha256_file(probe["weights"]))
    log_row = {k: v for k, v in row.items() if k in ("val_top1", "val_loss", "l2")}
    validated = bool(summary.get("best"))
    return {"history": [row], "best": row if validated else None,
            "best_weights": current if validated else None,
            "source": source, "log": f"head from {source}: {log_row}"}


def run_phase(phase: Mapping, model, train, val, *, lighting, checkpoint_dir: Path,
              label: str, log: Callable[[str], None]) -> dict:
    """Run one SGD or L-BFGS phase on ``model`` (updated in place); its history, best row
    and weights (None without validation)."""
    if phase["kind"] == "lbfgs":
        tx, ty = train.load_all()
        vx, vy = val.load_all() if val is not None else (None, None)
        probe = fit_probe(tx, ty, vx, vy, model.num_classes, l2_grid=phase["l2_grid"],
                          max_iter=phase["max_iter"], select_by=phase["select_by"], log_fn=log)
        flat = flatten_state(model)
        flat["head/kernel"], flat["head/bias"] = probe["kernel"], probe["bias"]
        assign_state(model, flat)
        return {"history": probe["history"], "best": probe["best"],
                "best_weights": flat if probe["best"] is not None else None}
    result = fit(model, train, val, TrainSettings.from_dict(phase["train_settings"]),
                 log_fn=log, lighting=lighting, checkpoint_dir=checkpoint_dir, label=label,
                 stop_after_epochs=phase.get("stop_after_epochs"))
    return {"history": result.history, "best": result.best,
            "best_weights": result.best_weights, "stopped_early": result.stopped_early}


@exclusive("checkpoint_dir")
def run_job(settings: Mapping, *, train_index, val_index, stats, classes, out_dir,
            checkpoint_dir, init_weights=None, features_dir=None, probe=None,
            log_fn: Callable[[str], None] | None = print) -> dict:
    """Run the phases of ``settings`` and write weights, history and summary.

    ``probe``: ``{"weights", "summary"}`` of the linear probe job a ``probe_head`` phase
    reads. With ``settings["refit"]`` (:func:`finegrained.protocol.refit_settings`) every
    phase trains on train + validation for the epochs chosen before, and the model written
    is the final one. One copy of a job runs at a time (:func:`finegrained.locks.exclusive`
    on ``checkpoint_dir``).
    """
    t0 = time.perf_counter()
    main = distributed.is_main_process()
    log = (log_fn if main else None) or (lambda _: None)
    label = settings["regime"] + settings.get("variant", "")
    refit = bool(settings.get("refit"))
    select_by = settings["select_by"]
    names = manifest_class_names(classes)
    model = build_start_model(settings, init_weights, len(names))
    stats_dict = read_json(stats, "colour statistics")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    cached = {p["input"]["layer"] for p in settings["phases"] if p["input"]["kind"] == "cache"}
    cache_indexes = {f"features_{split}_{layer}": Path(features_dir, cache_index(split, layer))
                     for layer in sorted(cached) for split in ("train", "val")}
    probe_files = {f"probe_{k}": v for k, v in (probe or {}).items()}
    if main:
        claim(checkpoint_dir, fingerprint(settings, {
            "init_weights": init_weights, "train_index": train_index, "val_index": val_index,
            "stats": stats, "classes": classes, **cache_indexes, **probe_files}), log)
    distributed.barrier(f"claimed/{label}")

    rows, best, phase_epochs, head_from = [], None, {}, None
    for i, phase in enumerate(settings["phases"]):
        phase_dir = checkpoint_dir / f"{i}-{phase['name']}"
        record = _finished_phase(phase_dir, model, log)
        if record is None and phase["kind"] == "probe_head":
            result = probe_head(phase, model, probe, init_weights)
            log(f"{label} phase {phase['name']}: {result['log']}")
            record = {"history": result["history"], "best": result["best"],
                      "source": result["source"]}
        elif record is None:
            train, val = _sources(phase, train_index, val_index, features_dir,
                                  settings.get("verify_shards", True), init_weights, refit)
            log(f"{label} phase {phase['name']}: {len(train)} train / "
                f"{len(val) if val is not None else 0} val inputs "
                f"({phase['input']['kind']}), {jax.device_count()} x "
                f"{jax.devices()[0].platform}")
            augment = phase.get("train_settings", {}).get("augment", {})
            lighting = lighting_from_stats(stats_dict) if augment.get("pca_lighting") else None
            result = run_phase(phase, model, train, val, lighting=lighting,
                               checkpoint_dir=phase_dir, label=f"{label}/{phase['name']}",
                               log=log)
            record = {"history": result["history"], "best": result["best"]}
        else:
            result = None
        if result is not None and main:
            if result["best_weights"] is not None:
                save_weights(phase_dir / "best.safetensors", result["best_weights"])
            _mark_finished(phase_dir, model, record)
        head_from = record.get("source", head_from)
        phase_epochs[phase["name"]] = len(record["history"])
        for row in record["history"]:
            rows.append({"phase": phase["name"], **row})
        if record["best"] is not None and (best is None or better(record["best"], best[1],
                                                                   select_by)):
            best = (i, record["best"], phase_dir / "best.safetensors")

    if best is None and not refit:
        raise DataError("validation", f"{label}: no validation result to choose weights by")
    # Every process holds the same result; the others wait until process 0 has written it.
    if not main:
        distributed.barrier(f"job-done/{label}")
        return {}
    metadata = weights_metadata(
        arch=settings["arch"], num_classes=len(names), class_names=names,
        input_recipe=model.input_recipe.name, source=f"{'refit' if refit else 'train'}:{label}",
        width=str(settings["width"]), stage_depths=json.dumps(settings["stage_depths"]),
        **model_options(settings["arch"], init_weights if settings["init"] != "random" else None))
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = flatten_state(model) if refit else read_tensors(best[2])
    save_weights(out_dir / "weights.safetensors", weights, metadata=metadata)
    _write_history(out_dir / "history.parquet", rows)
    best_row = None if refit else best[1]
    summary = {
        "regime": settings["regime"], "variant": settings.get("variant", ""),
        "select_by": select_by, "refit": refit,
        "trained_on": "train+val" if refit else "train",
        "train_count": rows[-1].get("train_count") if rows else None,
        "best_phase": None if refit else settings["phases"][best[0]]["name"],
        "best_epoch": None if refit else best_row["epoch"],
        "best_val_top1": None if refit else best_row["val_top1"],
        "best_val_loss": None if refit else best_row["val_loss"],
        "best": best_row, "final": rows[-1] if rows else None,
        "weights_sha256": sha256_file(out_dir / "weights.safetensors"),
        "history_sha256": sha256_file(out_dir / "history.parquet"),
        "epochs_run": len(rows), "phase_epochs": phase_epochs, "head_from": head_from,
        "num_classes": len(names),
        "wall_seconds": time.perf_counter() - t0, "config_hash": settings["config_hash"],
        "init_weights_sha256": sha256_file(init_weights) if init_weights else None,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "provenance": provenance(
            config_hash=settings["config_hash"],
            shard_indexes={"train": train_index, "val": val_index},
            init_weights=init_weights if settings["init"] != "random" else None,
            **cache_indexes, **probe_files),
        "settings": settings,
    }
    write_json(out_dir / "summary.json", summary)
    if not settings.get("keep_checkpoints", False):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    distributed.barrier(f"job-done/{label}")
    if refit:
        log(f"{label}: refit on train + validation ({summary['train_count']} inputs), "
            f"{summary['wall_seconds']:.1f}s")
    else:
        log(f"{label}: best val top-1 {best_row['val_top1']:.4f}, val loss "
            f"{best_row['val_loss']:.4f} ({select_by}; phase {summary['best_phase']}, "
            f"epoch {best_row['epoch']}), {summary['wall_seconds']:.1f}s")
    return summary


@exclusive("out_dir")
def run_features_job(settings: Mapping, *, shard_index, init_weights, stats, classes, out_dir,
                     log_fn: Callable[[str], None] | None = print) -> dict:
    """The features rule: the frozen pretrained backbone over one split (see ``features``)."""
    from finegrained.train.augment import Augmentation
    from finegrained.train.features import extract_features

    names = manifest_class_names(classes)
    model = load_init_model(settings["arch"], len(names), init_weights,
                            width=settings["width"], stage_depths=settings["stage_depths"],
                            **runtime_options(settings["arch"], settings))
    augment = Augmentation.from_dict(settings["augment"])
    lighting = (lighting_from_stats(read_json(stats, "colour statistics"))
                if augment.pca_lighting > 0 else None)
    return extract_features(
        model, shard_index, out_dir, layers=settings["layers"],
        image_size=settings["image_size"], eval_crop_fraction=settings["eval_crop_fraction"],
        views=settings["views"], augment=augment, lighting=lighting, seed=settings["seed"],
        batch_size=settings["batch_size"], dtype=settings["dtype"],
        weights_sha256=sha256_file(init_weights), verify=settings["verify_shards"],
        log_fn=log_fn)
