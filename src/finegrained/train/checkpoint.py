"""Checkpoints of a training run with orbax (arrays + a JSON of the loop's bookkeeping),
what stops a run for one (SIGTERM), and what a checkpoint folder was made from.

A checkpoint holds everything that makes a resumed run continue bit-identically: the
trainable parameters, the non-parameter state (BatchNorm statistics), the optimizer state,
the step, the best-on-validation weights so far, and (as JSON) the history, the current
epoch's per-step metrics and the best record. Frozen parameters are not saved: they never
change, and the job rebuilds them from its initial weights. Arrays go to the host before
saving and come back as numpy, so a checkpoint does not depend on the device mesh.

Orbax writes each step into a temporary directory and renames it when complete (atomic);
the newest ``keep`` checkpoints are kept, and leftover temporary directories of a killed
save are removed when the manager opens. A step that cannot be read whole later (a data
file or its metadata lost or torn) is set aside beside the folder, the log names it, and
the run resumes from the newest step that reads whole, or starts afresh when none does
(:func:`restore_checkpoint`); nothing of a step is used unless all of it was read. A
finished phase's record (``done.json`` and its weights) that cannot be read is likewise
set aside and the phase redone from its checkpoints (:func:`read_finished_phase`).

A job's checkpoint folder records what it was made from (:func:`claim`): the job's settings
and the sha256 of its input files. A rerun with other settings or inputs (a lowered ``lr``,
new weights) sets the old checkpoints aside instead of resuming them, so a resumed run is
always the run its settings describe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from finegrained import distributed
from finegrained.errors import ConfigError, DataError, Everywhere, WeightsError
from finegrained.fileio import read_json, sha256_file, write_json

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def _to_host(tree: Any) -> Any:
    """Every leaf as a whole numpy array on this process: an array split over devices of
    several processes (local SGD's per-device copies) is gathered from all of them first."""
    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(host, tree)


class Checkpointer:
    """Save and restore ``(arrays, meta)`` pairs by step under ``directory``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: dict, meta: dict) -> None:
        """Write checkpoint ``step`` (a second save of the same step is a no-op)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(_to_host(arrays)), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore_arrays(self, step: int, like: dict) -> dict:
        """The arrays of checkpoint ``step`` in the structure of ``like`` (numpy leaves)."""
        target = _to_host(like)
        return self.manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(target)))["arrays"]

    def set_aside(self, step: int) -> Path:
        """Move step ``step`` out of the folder, to ``<folder>.step-<step>.unreadable-<time>``
        beside it (only process 0 moves; every process then sees the folder without it)."""
        aside = _aside_name(self.directory, f"step-{step}.unreadable")
        if distributed.is_main_process():
            os.replace(self.directory / str(step), aside)
        distributed.barrier(f"set-aside/{self.directory}/{step}")
        self.manager.reload()
        return aside

    def restore_saved(self, step: int) -> dict:
        """The arrays of checkpoint ``step`` as they were saved (numpy), without a target."""
        return self.manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore()))["arrays"]

    def close(self) -> None:
        self.manager.close()


# ---------------------------------------------------------------------------- fingerprints

FINGERPRINT_FILE = "fingerprint.json"
#: Settings that change how a job runs, not what it computes: checkpoints made with other
#: values of these are resumed (the hash of the whole settings is not one of them either).
OPERATIONAL_KEYS = frozenset({"config_hash", "keep_checkpoints", "log_every_steps",
                              "checkpoint_every_steps", "prefetch_batches"})


def _strip(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _strip(v) for k, v in obj.items() if k not in OPERATIONAL_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    return obj


def fingerprint(settings: Mapping, inputs: Mapping[str, str | os.PathLike | None]) -> dict:
    """What a job's checkpoints are made from: its settings (JSON; the operational keys left
    out) and the sha256 of each input file (None for an input the job does not have)."""
    return {"settings": json.loads(json.dumps(_strip(settings))),
            "inputs": {name: sha256_file(path) if path is not None else None
                       for name, path in sorted(inputs.items())}}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(obj, list):
        out = {}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out if obj else {prefix[:-1]: []}
    return {prefix[:-1]: obj}


def describe_change(old: Mapping | None, new: Mapping, limit: int = 3) -> str:
    """The differences between two fingerprints, for one log line."""
    if old is None:
        return "no record of the settings they were made with"
    before, after = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    shown = []
    for key in changed[:limit]:
        if key.startswith("inputs."):
            shown.append(f"another {key[len('inputs.'):]} (sha256 {str(before.get(key))[:12]} -> "
                         f"{str(after.get(key))[:12]})")
        else:
            shown.append(f"{key[len('settings.'):]} {before.get(key)!r} -> {after.get(key)!r}")
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return "other settings or inputs: " + "; ".join(shown) + more


def _aside_name(directory: Path, what: str) -> Path:
    return directory.with_name(f"{directory.name}.{what}-{time.strftime('%Y%m%dT%H%M%S')}"
                               f"-{os.getpid()}")


def claim(directory: str | os.PathLike, expected: Mapping,
          log: Callable[[str], None] = print) -> Path | None:
    """Make ``directory`` the checkpoint folder of the job whose :func:`fingerprint` is
    ``expected``. Checkpoints there that were made from anything else (or that carry no
    record) are moved to ``<directory>.set-aside-<time>/``, never resumed, and the log says
    why in one line; returns where they went (None when nothing was set aside)."""
    directory = Path(directory)
    record = directory / FINGERPRINT_FILE
    aside = None
    if directory.is_dir() and any(directory.iterdir()):
        try:
            found = read_json(record, "checkpoint fingerprint")
        except DataError:            # none, or torn: not known to be this job's
            found = None
        if found != expected:
            aside = _aside_name(directory, "set-aside")
            os.replace(directory, aside)
            log(f"checkpoints in {directory} were made with {describe_change(found, expected)}: "
                f"set aside as {aside.name}, not resumed; training starts afresh")
    directory.mkdir(parents=True, exist_ok=True)
    write_json(record, expected)
    return aside


# ---------------------------------------------------------------------------- the loop's state

class Preempted(Everywhere, RuntimeError):
    """SIGTERM arrived (SLURM preemption or time limit); a checkpoint was written."""


class LayoutChanged(Everywhere, ConfigError):
    """A checkpoint written by another number of processes or devices than this run's."""


@dataclasses.dataclass
class Progress:
    """The loop's bookkeeping, saved as JSON in every checkpoint."""

    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    epoch_metrics: list = dataclasses.field(default_factory=list)   # [loss, acc] per step
    epoch_seconds: float = 0.0
    epoch_wait: float = 0.0
    best: dict | None = None        # the history row of the best validation epoch
    stale_epochs: int = 0           # epochs since the best (early stopping)
    done: bool = False
    processes: int | None = None    # the layout that wrote it (None: a checkpoint from
    devices: int | None = None      # before layouts were recorded)


def run_layout(mesh) -> dict[str, int]:
    """The processes and mesh devices of this run, as :class:`Progress` records them."""
    return {"processes": jax.process_count(), "devices": int(mesh.devices.size)}


def _describe_layout(layout: Mapping) -> str:
    processes, devices = layout["processes"], layout["devices"]
    return (f"{processes} process{'es' if processes != 1 else ''} with {devices} "
            f"device{'s' if devices != 1 else ''}{' in all' if processes != 1 else ''}")


def check_layout(meta: Mapping, layout: Mapping, directory: Path, step: int) -> None:
    """Refuse (:class:`LayoutChanged`) to resume checkpoint ``step`` (its JSON ``meta``) on
    another layout than the one that wrote it: local SGD keeps one copy of the model per
    device, and synchronous training on other devices would not continue bit-identically."""
    written = {"processes": meta.get("processes"), "devices": meta.get("devices")}
    if None in written.values() or written == dict(layout):
        return
    raise LayoutChanged(
        f"{directory}: checkpoint step {step} was written by {_describe_layout(written)}, this "
        f"run has {_describe_layout(layout)}; a run resumes only on the layout that wrote it "
        f"(local SGD keeps a copy of the model per device, and synchronous training would not "
        f"continue bit-identically): rerun with {written['processes']} process(es) "
        f"(resources.train.nodes x tasks_per_node) and {written['devices']} device(s) in all, "
        f"or remove {directory} to start afresh")


def state_arrays(state, best: dict | None) -> dict:
    """What a checkpoint holds of a ``TrainState`` (frozen parameters are rebuilt from the
    job's initial weights), and the best-on-validation weights so far."""
    arrays = {"step": state.step, "params": state.params, "stats": state.stats,
              "opt_state": state.opt_state}
    if best is not None:
        arrays["best"] = best
    return arrays


def save_checkpoint(ckpt: Checkpointer | None, state, progress: Progress,
                    best_flat: dict | None) -> None:
    if ckpt is None:
        return
    ckpt.save(progress.step, state_arrays(state, best_flat), dataclasses.asdict(progress))


def restore_checkpoint(ckpt: Checkpointer, state, best_like: Callable[[], dict],
                       log: Callable[[str], None] = print, layout: Mapping | None = None):
    """``(state, progress, best)`` from the newest checkpoint that reads whole (the state's
    arrays on the host, in ``state``'s structure), or None when there is none. ``best_like``
    gives the structure of the best weights (called only when the checkpoint holds them).

    A step that fails to read (on any process) is set aside (:meth:`Checkpointer.set_aside`)
    and logged, and the next older one tried; when none is left the run starts afresh. A
    step written by another ``layout`` (:func:`run_layout`) than this run's is refused
    (:func:`check_layout`), before its arrays are read."""
    with _quiet_asyncio():
        return _restore_newest_readable(ckpt, state, best_like, log, layout)


@contextlib.contextmanager
def _quiet_asyncio():
    """Keep the echoes of a failed read out of the log while checkpoints are read: orbax's
    pending tasks log the same error again, as a long traceback, when they are collected
    (done here, before the logger is restored), and a read finishing after its event loop
    closed raises "Event loop is closed" where nothing can catch it. The log line of
    :func:`restore_checkpoint` says what failed, once."""
    logger, previous_hook = logging.getLogger("asyncio"), sys.unraisablehook
    level = logger.level

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous_hook(unraisable)

    logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous_hook
        logger.setLevel(level)


def _restore_newest_readable(ckpt: Checkpointer, state, best_like, log, layout):
    for step in sorted(ckpt.manager.all_steps(), reverse=True):
        read = _read_step(ckpt, step, state, best_like, layout)
        problem = read if isinstance(read, str) else None
        if distributed.any_process(problem is not None, f"restore/{ckpt.directory}/{step}"):
            aside = ckpt.set_aside(step)
            older = ckpt.latest_step()
            log(f"checkpoint step {step} in {ckpt.directory} cannot be read "
                f"({problem or 'on another process'}): set aside as {aside.name}; "
                + (f"trying step {older}" if older is not None else
                   "no readable checkpoint is left, training starts afresh"))
            continue
        arrays, progress = read
        state = state.replace(step=arrays["step"], params=arrays["params"],
                              stats=arrays["stats"], opt_state=arrays["opt_state"])
        return state, progress, arrays.get("best")
    return None


def _read_step(ckpt: Checkpointer, step: int, state, best_like, layout):
    """``(arrays, progress)`` of checkpoint ``step``, or why it cannot be read (a string).
    Its layout is checked once its JSON has been read, before its arrays are."""
    try:
        meta = ckpt.restore_meta(step)
        if layout is not None:
            check_layout(meta, layout, ckpt.directory, step)
        like = best_like() if meta.get("best") is not None else None
        arrays = ckpt.restore_arrays(step, state_arrays(state, like))
        return arrays, Progress(**meta)
    except (MemoryError, LayoutChanged):
        raise
    except Exception as exc:   # orbax and tensorstore raise many kinds for a lost file
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def read_finished_phase(directory: str | os.PathLike,
                        log: Callable[[str], None] = print) -> tuple[dict, dict] | None:
    """``(record, final weights)`` of a phase an earlier attempt finished (its ``done.json``
    and ``done.safetensors``), or None. A record that cannot be read whole, or whose best
    weights (``best.safetensors``) cannot, is set aside and logged (the phase is then redone
    from its checkpoints) rather than failing every rerun."""
    from finegrained.models.weights import read_tensors   # not needed by the loop's imports

    directory = Path(directory)
    files = [directory / name for name in ("done.json", "done.safetensors", "best.safetensors")]
    if not (files[0].exists() and files[1].exists()):
        return None
    problem = None
    try:
        record = read_json(files[0], "finished phase record")
        weights = read_tensors(files[1])
        if record.get("best") is not None:
            read_tensors(files[2])
    except (DataError, WeightsError) as exc:
        problem = exc
    if not distributed.any_process(problem is not None, f"finished/{directory}"):
        return record, weights
    aside = _aside_name(directory, "finished.unreadable")
    if distributed.is_main_process():
        aside.mkdir()
        for path in files:
            if path.exists():
                os.replace(path, aside / path.name)
    distributed.barrier(f"finished-aside/{directory}")
    log(f"{problem or 'unreadable on another process'}: the record of finished phase "
        f"{directory.name} is set aside as {aside.name}; the phase is redone from its checkpoints")
    return None


class StopFlag:
    """SIGTERM -> a flag the loop checks between steps (then checkpoint and stop).

    With several processes the signal may reach each at a different step, so the loop asks
    :meth:`agreed`: every process stops at the same step if any of them got it."""

    _fits = itertools.count()    # every process runs the same fits, in the same order

    def __init__(self):
        self.set = False
        self._previous = None
        self._fit = next(self._fits)

    def agreed(self, tag) -> bool:
        return distributed.any_process(self.set, f"stop/{self._fit}/{tag}")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
