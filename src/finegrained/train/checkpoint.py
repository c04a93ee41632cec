"""Checkpoints of a training run with orbax: arrays + a JSON of the loop's bookkeeping.

A checkpoint holds everything that makes a resumed run continue bit-identically: the
trainable parameters, the non-parameter state (BatchNorm statistics), the optimizer state,
the step, the best-on-validation weights so far, and (as JSON) the history, the current
epoch's per-step metrics and the best record. Frozen parameters are not saved: they never
change, and the job rebuilds them from its initial weights. Arrays go to the host before
saving and come back as numpy, so a checkpoint does not depend on the device mesh.

Orbax writes each step into a temporary directory and renames it when complete (atomic);
the newest ``keep`` checkpoints are kept, and leftover temporary directories of a killed
save are removed when the manager opens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _to_host(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


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

    def close(self) -> None:
        self.manager.close()
