"""One `train` job: resolved settings in, the best model, its history and a summary out.

The job builds the target model (pretrained init or random), runs the settings' phases in
order (SGD through :func:`finegrained.train.loop.fit`, the L-BFGS probe, or the probe job's
head read from its weights), each phase starting from the previous one's final state, and
writes, atomically::

    <out_dir>/weights.safetensors   the model that was best on the validation split
                                    (``protocol.select_by``; a refit: the final model)
    <out_dir>/history.parquet       one row per epoch (per L2 strength for L-BFGS)
    <out_dir>/summary.json          best epoch, its validation figures, wall time, hashes

A refit (``settings["refit"]``, made by :func:`finegrained.plan.protocol.refit_settings` from a
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

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finegrained import distributed
from finegrained.data.manifest import class_names as manifest_class_names
from finegrained.data.shards import ShardReader
from finegrained.errors import DataError
from finegrained.fileio import atomic_output, check_sha256, read_json, sha256_file, write_json
from finegrained.locks import exclusive
from finegrained.models import flatten_state, loading
from finegrained.models.params import assign_state
from finegrained.models.weights import read_tensors, save_weights, weights_metadata
from finegrained.plan.selection import better
from finegrained.provenance import provenance
from finegrained.train.augment import lighting_from_stats
from finegrained.train.checkpoint import claim, fingerprint, read_finished_phase
from finegrained.train.features import FeatureReader
from finegrained.train.input_pipeline import ConcatSource
from finegrained.train.loop import fit
from finegrained.train.probe import fit_probe
from finegrained.train.settings import TrainSettings
from finegrained.train.validation import require_examples


@dataclasses.dataclass
class Best:
    """The phase and epoch chosen on validation so far (``protocol.select_by``)."""

    phase: int                  # index into the settings' phases
    row: dict                   # its history row
    weights: Path               # <checkpoint_dir>/<phase>/best.safetensors


@dataclasses.dataclass
class Phases:
    """What the phases of a job produced, in order."""

    rows: list[dict] = dataclasses.field(default_factory=list)
    best: Best | None = None
    epochs: dict[str, int] = dataclasses.field(default_factory=dict)
    head_from: str | None = None

    def add(self, index: int, phase: Mapping, record: Mapping, phase_dir: Path,
            select_by: str) -> None:
        self.head_from = record.get("source", self.head_from)
        self.epochs[phase["name"]] = len(record["history"])
        self.rows += [{"phase": phase["name"], **row} for row in record["history"]]
        if record["best"] is not None and (self.best is None or better(
                record["best"], self.best.row, select_by)):
            self.best = Best(index, record["best"], phase_dir / "best.safetensors")


def _sources(phase: Mapping, train_index, val_index, feature_indexes, verify: bool,
             init_weights=None, refit: bool = False):
    """The phase's train and val sources: the shards, or the feature cache (checked against
    the init weights and shard indexes this job was given, and with ``verify`` its files
    against its index). A refit trains on both splits and validates on none; otherwise an
    empty validation split is an error."""
    inp = phase["input"]
    if inp["kind"] == "cache":
        indexes = (feature_indexes or {}).get(inp["layer"])
        if indexes is None:
            raise DataError("features", f"phase {phase['name']} reads the feature cache of "
                            f"{inp['layer']}, but no index of it was given")
        train, val = (FeatureReader(indexes[split], inp["layer"], weights=init_weights,
                                    shard_index=index, verify=verify)
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


def solve_probe(phase: Mapping, model, train, val, log: Callable[[str], None]) -> dict:
    """An ``lbfgs`` phase: the L-BFGS probe on the cached pooled features, its head set on
    ``model``."""
    tx, ty = train.load_all()
    vx, vy = val.load_all() if val is not None else (None, None)
    probe = fit_probe(tx, ty, vx, vy, model.num_classes, l2_grid=phase["l2_grid"],
                      max_iter=phase["max_iter"], select_by=phase["select_by"], log_fn=log)
    flat = flatten_state(model)
    flat["head/kernel"], flat["head/bias"] = probe["kernel"], probe["bias"]
    assign_state(model, flat)
    return {"history": probe["history"], "best": probe["best"],
            "best_weights": flat if probe["best"] is not None else None}


@exclusive("checkpoint_dir")
def run_job(settings: Mapping, *, train_index, val_index, stats, classes, out_dir,
            checkpoint_dir, init_weights=None, feature_indexes=None, probe=None,
            log_fn: Callable[[str], None] | None = print) -> dict:
    """Run the phases of ``settings`` and write weights, history and summary.

    ``feature_indexes``: ``{layer: {split: index.json}}`` of the caches the phases read.
    ``probe``: ``{"weights", "summary"}`` of the linear probe job a ``probe_head`` phase
    reads. With ``settings["refit"]`` (:func:`finegrained.plan.protocol.refit_settings`) every
    phase trains on train + validation for the epochs chosen before, and the model written
    is the final one. One copy of a job runs at a time (:func:`finegrained.locks.exclusive`
    on ``checkpoint_dir``).
    """
    t0 = time.perf_counter()
    main = distributed.is_main_process()
    log = (log_fn if main else None) or (lambda _: None)
    label = settings["regime"] + settings.get("variant", "")
    refit = bool(settings.get("refit"))
    names = manifest_class_names(classes)
    model = loading.start_model(settings["model"], init=settings["init"], seed=settings["seed"],
                                num_classes=len(names), init_weights=init_weights)
    stats_dict = read_json(stats, "colour statistics")
    checkpoint_dir = Path(checkpoint_dir)
    inputs = {"init_weights": init_weights, "train_index": train_index, "val_index": val_index,
              "stats": stats, "classes": classes,
              **{f"features_{split}_{layer}": path
                 for layer, by_split in sorted((feature_indexes or {}).items())
                 for split, path in by_split.items()},
              **{f"probe_{k}": v for k, v in (probe or {}).items()}}
    distributed.on_main(f"claim/{label}",
                        lambda: claim(checkpoint_dir, fingerprint(settings, inputs), log))

    phases = Phases()
    for i, phase in enumerate(settings["phases"]):
        phase_dir = checkpoint_dir / f"{i}-{phase['name']}"
        record = _finished_phase(phase_dir, model, log)
        if record is None:
            if phase["kind"] == "probe_head":
                result = probe_head(phase, model, probe, init_weights)
                log(f"{label} phase {phase['name']}: {result['log']}")
            else:
                train, val = _sources(phase, train_index, val_index, feature_indexes,
                                      settings.get("verify_shards", True), init_weights, refit)
                log(f"{label} phase {phase['name']}: {len(train)} train / "
                    f"{len(val) if val is not None else 0} val inputs "
                    f"({phase['input']['kind']}), {jax.device_count()} x "
                    f"{jax.devices()[0].platform}")
                if phase["kind"] == "lbfgs":
                    result = solve_probe(phase, model, train, val, log)
                else:
                    recipe = TrainSettings.from_dict(phase["train_settings"])
                    lighting = (lighting_from_stats(stats_dict) if recipe.augment.pca_lighting
                                else None)
                    fitted = fit(model, train, val, recipe, log_fn=log, lighting=lighting,
                                 checkpoint_dir=phase_dir, label=f"{label}/{phase['name']}",
                                 stop_after_epochs=phase.get("stop_after_epochs"))
                    result = {"history": fitted.history, "best": fitted.best,
                              "best_weights": fitted.best_weights}
            record = {k: result[k] for k in ("history", "best", "source") if k in result}
            if main:
                if result["best_weights"] is not None:
                    save_weights(phase_dir / "best.safetensors", result["best_weights"])
                _mark_finished(phase_dir, model, record)
        phases.add(i, phase, record, phase_dir, settings["select_by"])

    if phases.best is None and not refit:
        raise DataError("validation", f"{label}: no validation result to choose weights by")
    # Every process holds the same result; the others wait until process 0 has written it.
    if not main:
        distributed.barrier(f"job-done/{label}")
        return {}
    summary = write_outputs(settings, model, phases, out_dir=Path(out_dir), names=names,
                            inputs=inputs, seconds=time.perf_counter() - t0)
    if not settings.get("keep_checkpoints", False):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    distributed.barrier(f"job-done/{label}")
    if refit:
        log(f"{label}: refit on train + validation ({summary['train_count']} inputs), "
            f"{summary['wall_seconds']:.1f}s")
    else:
        log(f"{label}: best val top-1 {summary['best_val_top1']:.4f}, val loss "
            f"{summary['best_val_loss']:.4f} ({settings['select_by']}; phase "
            f"{summary['best_phase']}, epoch {summary['best_epoch']}), "
            f"{summary['wall_seconds']:.1f}s")
    return summary


def write_outputs(settings: Mapping, model, phases: Phases, *, out_dir: Path, names: list[str],
                  inputs: Mapping, seconds: float) -> dict:
    """Write the job's weights (the best phase's best epoch; a refit's final model), its
    history and its summary; return the summary."""
    refit = bool(settings.get("refit"))
    label = settings["regime"] + settings.get("variant", "")
    init_weights = inputs["init_weights"] if settings["init"] != "random" else None
    metadata = weights_metadata(
        arch=settings["model"]["arch"], num_classes=len(names), class_names=names,
        input_recipe=model.input_recipe.name, source=f"{'refit' if refit else 'train'}:{label}",
        **loading.model_metadata(settings["model"], init_weights))
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = flatten_state(model) if refit else read_tensors(phases.best.weights)
    save_weights(out_dir / "weights.safetensors", weights, metadata=metadata)
    _write_history(out_dir / "history.parquet", phases.rows)
    best = None if refit else phases.best
    rows = phases.rows
    summary = {
        "regime": settings["regime"], "variant": settings.get("variant", ""),
        "select_by": settings["select_by"], "refit": refit,
        "trained_on": "train+val" if refit else "train",
        "train_count": rows[-1].get("train_count") if rows else None,
        "best_phase": None if best is None else settings["phases"][best.phase]["name"],
        "best_epoch": None if best is None else best.row["epoch"],
        "best_val_top1": None if best is None else best.row["val_top1"],
        "best_val_loss": None if best is None else best.row["val_loss"],
        "best": None if best is None else best.row, "final": rows[-1] if rows else None,
        "weights_sha256": sha256_file(out_dir / "weights.safetensors"),
        "history_sha256": sha256_file(out_dir / "history.parquet"),
        "epochs_run": len(rows), "phase_epochs": phases.epochs, "head_from": phases.head_from,
        "num_classes": len(names),
        "wall_seconds": seconds, "config_hash": settings["config_hash"],
        "init_weights_sha256": (sha256_file(inputs["init_weights"]) if inputs["init_weights"]
                                else None),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "processes": jax.process_count(),
        "provenance": provenance(
            config_hash=settings["config_hash"],
            shard_indexes={"train": inputs["train_index"], "val": inputs["val_index"]},
            init_weights=init_weights,
            **{k: v for k, v in inputs.items() if k.startswith(("features_", "probe_"))}),
        "settings": settings,
    }
    write_json(out_dir / "summary.json", summary)
    return summary
