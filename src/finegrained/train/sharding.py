"""Data parallelism, declared: a 1-D mesh with axis ``data``; batches split along their
leading axis, parameters and optimizer state replicated. ``jax.jit`` with these
``NamedSharding``s inserts the gradient all-reduce itself (no pmap, no psum by hand)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all when None), axis ``data``."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"global batch size {batch_size} is not divisible by the "
                         f"{n} devices of the '{DATA_AXIS}' mesh axis; pick a multiple of {n}")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put every array of ``batch`` (a pytree) on the mesh, split along its leading axis."""
    leaves = jax.tree_util.tree_leaves(batch)
    if leaves:
        sizes = {int(np.shape(x)[0]) for x in leaves}
        if len(sizes) != 1:
            raise ValueError(f"batch arrays disagree on the leading (batch) size: {sorted(sizes)}")
        check_batch_size(sizes.pop(), mesh)
    return jax.device_put(batch, data_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree (parameters, optimizer state) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
